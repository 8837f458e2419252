"""The lab's experiments: each runs requests against live servers and returns plain results.

One module per lesson or family of experiments. Results come back as
`{variant: [ChatResult, ...]}` wherever they can, so every plot and summary in
`sse_lab.plots` and `sse_lab.metrics` works on every experiment. Experiments use
the streaming stack, the instruments and the system parts; nothing in the stack
imports an experiment.
"""

DEFAULT_PROMPT = "Why should an LLM stream its answer?"
