# Every target creates .venv on first use, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit lint proto bench chaos powerloss powerloss-long fuse clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvstore demo

# tests/unit: no processes, no sockets to other processes (well under a minute);
# tests/cluster: real node processes over gRPC and pysyncobj on loopback;
# tests/powerloss: power cuts on every replica of a shard (a FUSE filesystem, see `fuse`).
test: $(STAMP) fuse
	$(BIN)/ruff check kvstore tests loadtests
	$(BIN)/python -m pytest -q tests/unit tests/cluster tests/powerloss

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check kvstore tests loadtests

proto: $(STAMP)
	$(BIN)/python -m kvstore.proto.generate

# The power-loss filesystem for tests (FUSE): installs Debian's fuse3 when missing (as root).
fuse:
	tests/support/install-fuse

# The full power-cut cycle on every replica of a shard (tests/powerloss/): what was lost, printed.
powerloss: $(STAMP) fuse
	$(BIN)/python -m pytest -q -s tests/powerloss

# The long run (not in `make test`: about 5 minutes): 2 shards x 3 on the power-loss filesystem,
# 20 power cuts amid kill/pause/partition, the chaos checkers over the whole history
# (tests/powerloss/long_run.py; CUTS=, SEED=, DURABILITY=none for the control).
CUTS ?= 20
SEED ?= 1
DURABILITY ?= fsync
powerloss-long: $(STAMP) fuse
	$(BIN)/python -m tests.powerloss.long_run --cuts $(CUTS) --seed $(SEED) --durability $(DURABILITY)

bench: $(STAMP)
	$(BIN)/kvstore bench --etcd

chaos: $(STAMP)
	$(BIN)/kvstore chaos --shards 2 --duration 60 --nemesis kill,pause,partition,delay

clean:
	rm -rf $(VENV) .kvstore .pytest_cache
