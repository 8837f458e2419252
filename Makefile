# Two commands on a fresh machine, with nothing but Python 3.10+ and make:
#   make lab    JupyterLab on notebooks/   (the main job)
#   make test   lint, unit tests and every notebook under nbval
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
JUPYTER_PORT ?= 8888
# make serve PORT=8000 FLAGS='--max-streams 2 --access-log'
PORT ?= 8000
FLAGS ?=
# Jupyter refuses to run as root (containers, CI) unless told that is intended.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test lint demo serve handout model notebooks format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per extra: reinstalled whenever pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	touch $@

lab: $(VENV)/.installed-lab
	$(BIN)/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 --ServerApp.port=$(JUPYTER_PORT) $(ALLOW_ROOT)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers (the machine's cores), each taking whole files: a notebook's cells share one kernel, in order.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m sse_lab.course.authoring --check
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --nbval-lax --nbval-current-env --nbval-cell-timeout=120

# The real model of notebook 10 (optional): llama-cpp-python builds from source once per environment.
model: $(VENV)/.installed-model

demo: $(VENV)/.installed-lab
	$(BIN)/python -m sse_lab demo --output build/why_streaming.png

serve: $(VENV)/.installed-lab
	$(BIN)/python -m sse_lab serve --port $(PORT) $(FLAGS)

# The students' notebooks and the package, without notebooks/solutions: build/handout/ and its zip.
handout: $(VENV)/.installed-lab
	$(BIN)/python -m sse_lab.course.handout --output build

notebooks: $(VENV)/.installed-test
	$(BIN)/ruff format notebooks/solutions
	$(BIN)/python -m sse_lab.course.authoring

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis
