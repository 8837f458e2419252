"""The course machinery: exercise checkers the notebooks call, and the authoring of students' notebooks."""
