# make setup | demo | test | stress | race | chaos | bench | clean    (see README.md)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STUBS  := daemon_pb2.py daemon_pb2_grpc.py

.PHONY: setup demo test stress race chaos bench clean
SECONDS ?= 120
SEED    ?= 1

# Cached bytecode for what buckd imports, even with PYTHONDONTWRITEBYTECODE: the stubs and
# the .py files of buck.SOURCES (the one list of the code's files).
setup: $(STUBS)
	@$(PY) -m compileall -q $(STUBS) \
	  $$($(PY) -c 'import buck; print(*(f for f in buck.SOURCES if f.endswith(".py")))')

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(STUBS): daemon.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. daemon.proto

# A short real session in this checkout (its daemon dir is under your $HOME/.buck): start
# buckd, then hash Python's standard library twice: cold, then reusing buckd's cache.
demo: setup
	@set -e; buck() { echo "\$$ buck $$*" >&2; $(PY) buck.py "$$@"; }; \
	ms() { $(PY) -c 'import time; print(time.time_ns() // 1000000)'; }; \
	lib=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])'); \
	buck kill; buck server; buck status --json; \
	echo "# hash $$lib ($$(find $$lib -type f | wc -l) files), cold then warm" >&2; \
	t0=$$(ms); buck hash $$lib | tail -1; t1=$$(ms); buck hash $$lib | tail -1; t2=$$(ms); \
	$(PY) -c "print(f'# cold: $$((t1 - t0)) ms, warm: $$((t2 - t1)) ms: warm is {($$t1 - $$t0) / ($$t2 - $$t1):.1f}x faster')"; \
	buck status; buck kill

# In parallel (pytest-xdist): the tests mostly wait on the processes they start, so more
# workers than cores; worksteal, as a few tests take seconds and most a fraction of one.
TEST_WORKERS ?= 4
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal test_buckd.py test_workload.py test_vendor.py

stress: setup
	@for i in $$(seq 20); do \
	  $(PY) -m pytest -q -x -k race test_buckd.py >/tmp/buckd-stress.log 2>&1 \
	    && echo "stress run $$i: passed" \
	    || { cat /tmp/buckd-stress.log; echo "stress run $$i: FAILED"; exit 1; }; \
	done

# 12 clients, half of them another version, start buckd from cold: the swimlanes and verdict
# (tools/lifecycle.py).
race: setup
	$(PY) tools/lifecycle.py race

# The randomized fault soak (tools/chaos.py): make chaos SECONDS=600 SEED=2
chaos: setup
	$(PY) tools/chaos.py --seconds $(SECONDS) --seed $(SEED)

bench: setup
	$(PY) tools/bench.py

clean:
	rm -rf $(VENV) $(STUBS) __pycache__ tools/__pycache__ .pytest_cache
