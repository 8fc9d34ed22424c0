# Both targets build their own virtual environment first (.venv), so a fresh
# clone needs nothing but python3 (>= 3.10) and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: demo test test-min lint format venv clean cohort-data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The pinned CPU wheel first: anything looser pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,cohorts,onnx,ray]'
	$(MAKE) cohort-data
	touch $(STAMP)

venv: $(STAMP)

# The chest cohort's real annotations (lung masks, RSNA boxes, SIIM masks) are package data
# of the torchxrayvision wheel: fetched without its dependencies (torchvision is never
# installed) and read as a zip file, never installed or imported.
CXR_WHEEL := .cache/wheels/torchxrayvision-1.5.7-py3-none-any.whl

cohort-data: $(CXR_WHEEL)

$(CXR_WHEEL):
	$(BIN)/pip download --no-deps --quiet -d .cache/wheels torchxrayvision==1.5.7

demo: $(STAMP)
	$(BIN)/medexplain demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

# The fast tests against the oldest supported dependencies: a separate environment with
# torch pinned as above (never a looser torch spec) and every other runtime dependency at
# exactly the floor pyproject.toml declares (tools/floors.py), so a floor that lies fails here.
MIN_VENV := .venv-min
MIN_BIN := $(MIN_VENV)/bin
MIN_STAMP := $(MIN_VENV)/.installed
PYTEST_MIN_ARGS ?=

$(MIN_STAMP): pyproject.toml tools/floors.py
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/pip install --quiet --upgrade pip
	$(MIN_BIN)/pip install --quiet torch==2.13.0
	$(MIN_BIN)/pip install --quiet --only-binary :all: torch==2.13.0 \
		$$($(PYTHON) tools/floors.py pyproject.toml) "pytest>=8" "pytest-xdist>=3.5"
	$(MIN_BIN)/pip install --quiet --no-deps -e .
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not slow" $(PYTEST_MIN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(MIN_VENV) runs tests/.cache
