# Every target sets itself up on a fresh clone: the venv and the model zoo are built on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ZOO    := .zoo
ONLY   ?=
REPEATS ?= 1

.PHONY: install test lint format run bench zoo protos clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: the CPU build that lies on disk (see pyproject.toml).
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

install: $(STAMP)

zoo: $(STAMP)
	$(PY) -m swiftd.zoo build --out $(ZOO) --only tiny-sd15 tiny-sdxl

protos: $(STAMP)
	$(PY) -m swiftd.protogen

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 tests

# The configured formatter and linter (pyproject.toml [tool.ruff]); CI runs this before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The trained shape-world model that ships in weights/ (docs/quality.md): no zoo needed.
run: $(STAMP)
	$(PY) -m swiftd.launcher demo --out out

bench: $(STAMP)
	$(PY) -m swiftd.zoo build --out $(ZOO) --only bench-sd15
	$(PY) -m bench.run --zoo $(ZOO) --repeats $(REPEATS) $(if $(ONLY),--only $(ONLY),)

clean:
	rm -rf $(VENV) $(ZOO) out
