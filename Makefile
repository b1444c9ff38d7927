# Every target creates .venv on first use, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit lint proto bench chaos clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvstore demo

# tests/unit: no processes, no sockets to other processes (well under a minute);
# tests/cluster: real node processes over gRPC and pysyncobj on loopback.
test: $(STAMP)
	$(BIN)/ruff check kvstore tests loadtests
	$(BIN)/python -m pytest -q tests/unit tests/cluster

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check kvstore tests loadtests

proto: $(STAMP)
	$(BIN)/python -m kvstore.proto.generate

bench: $(STAMP)
	$(BIN)/kvstore bench --etcd

chaos: $(STAMP)
	$(BIN)/kvstore chaos --shards 2 --duration 60 --nemesis kill,pause,partition,delay

clean:
	rm -rf $(VENV) .kvstore .pytest_cache
