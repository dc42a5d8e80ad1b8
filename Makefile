# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The generated FunctionRpc classes, installed apart: see requirements-worker.txt.
FUNCPROTOS := azure-functions-runtime-v1==1.2.0

.PHONY: install run test lint format bench package deploy clean

install: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-worker.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python -r requirements-worker.txt
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python --upgrade \
		--target $(VENV)/funcprotos $(FUNCPROTOS)
	touch $@

# A node_modules that is a symbolic link is an install shared with other checkouts (git worktrees):
# npm ci would empty it under them, so it is left to be installed where it lives.
node_modules/.installed: package.json package-lock.json
	@if [ -L node_modules ]; then echo "node_modules links to a shared install: not reinstalled here"; \
	else npm ci --no-audit --no-fund --loglevel=error && touch $@; fi

run: install
	$(BIN)/python -m devtools.local.run

test: install lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	command -v wrk >/dev/null || apt-get install -y -q wrk || (apt-get update -q && apt-get install -y -q wrk) \
		|| { echo "make bench needs wrk: install it (apt-get install wrk, brew install wrk)"; exit 1; }
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.failover

package:
	$(PYTHON) -m devtools.deploy.package

# make deploy RG=my-event-rg LOCATION=eastus2 [PREFIX=evtproxy] [UNTIL=YYYY-MM-DD] [WHAT_IF=1] [ARGS=...]
deploy: install
	@test -n "$(RG)" -a -n "$(LOCATION)" || { echo "usage: make deploy RG=RESOURCE_GROUP LOCATION=REGION [PREFIX=P] [UNTIL=YYYY-MM-DD] [WHAT_IF=1]"; exit 2; }
	$(BIN)/python -m devtools.deploy --resource-group "$(RG)" --location "$(LOCATION)" \
		$(if $(PREFIX),--prefix "$(PREFIX)") $(if $(UNTIL),--until "$(UNTIL)") $(if $(WHAT_IF),--what-if) $(ARGS)

clean:
	rm -rf $(VENV) node_modules dist .azurite
