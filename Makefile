# Two entry points: `make quickstart` (train + evaluate the embedded shapes demo on CPU) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[test,export]"
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(VPY) -m dino.quickstart

test: $(STAMP)
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
