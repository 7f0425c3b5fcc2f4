# natprints — `make help` lists the targets. Every target sets up .venv itself when missing.
CONFIG ?= configs/default.toml
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NP := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/natprints
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help all texts long families tokenizers test quick data zoo generate derive lineage likelihood reference experiments emergence report bench lint format clean venv

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  CONFIG=path   picks the run config (default: configs/default.toml)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install natprints with its pinned dependencies

all: $(STAMP) ## The whole pipeline on CONFIG: data, zoo, generate, derive, lineage, likelihood, reference, experiments, emergence, report
	$(NP) data --config $(CONFIG)
	$(NP) zoo --config $(CONFIG)
	$(NP) generate --config $(CONFIG)
	$(NP) derive --config $(CONFIG)
	$(NP) lineage run --config $(CONFIG)
	$(NP) likelihood --config $(CONFIG)
	$(NP) reference --config $(CONFIG)
	$(NP) experiments --config $(CONFIG)
	$(NP) emergence --config $(CONFIG)
	$(NP) report --config $(CONFIG)

texts: $(STAMP) ## More training texts (configs/texts.toml): the seed condition at 1x, 4x and 16x the default's texts
	for stage in data zoo generate likelihood reference experiments emergence report; do \
		$(NP) $$stage --config configs/texts.toml || exit 1; done

long: $(STAMP) ## Training 4x longer (configs/long.toml): the seed condition to step 960, the fingerprint at every saved step
	$(MAKE) all CONFIG=configs/long.toml

families: $(STAMP) ## Model families on identical data (configs/families.toml): Llama, GPT-2, GPT-NeoX, Qwen2 at matched sizes
	$(MAKE) all CONFIG=configs/families.toml

tokenizers: $(STAMP) ## Tokenizers on identical text (configs/tokenizers.toml): BPE of 1024, 4096, 16384 and a unigram
	$(MAKE) all CONFIG=configs/tokenizers.toml

test: $(STAMP) ## Run the test suite (includes the smoke pipeline end to end; tests/run_all.sh)
	bash tests/run_all.sh

quick: $(STAMP) ## The quick inner loop: every test that needs no smoke pipeline (pytest -m 'not slow')
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/pytest -q -n 2 --dist loadfile -m 'not slow and not process_faults'

data: $(STAMP) ## Corpus split and shared BPE tokenizer
	$(NP) data --config $(CONFIG)

zoo: data ## Train the zoo (resumes interrupted training)
	$(NP) zoo --config $(CONFIG)

generate: zoo ## Generated corpora: every model on every held-out prompt, plus the null control
	$(NP) generate --config $(CONFIG)

derive: zoo ## Derived models: zoo models continued on the shift corpus (KJV)
	$(NP) derive --config $(CONFIG)

lineage: derive ## SeedPrints and weight-std lineage over inits, trained and derived models
	$(NP) lineage run --config $(CONFIG)

likelihood: generate ## Every test and calibration text scored under every model of its conditions (the ceiling)
	$(NP) likelihood --config $(CONFIG)

reference: likelihood ## The auditor's reference LM, fine-tuned per candidate model, scoring the texts (black-box)
	$(NP) reference --config $(CONFIG)

experiments: reference ## Attribution experiments per condition (ceiling included), saved attributors
	$(NP) experiments --config $(CONFIG)

emergence: experiments ## The text fingerprint over training: [emergence] condition's models at every saved step
	$(NP) emergence --config $(CONFIG)

report: $(STAMP) ## Render reports/<run>/index.md from records and manifests
	$(NP) report --config $(CONFIG)

bench: experiments ## Time each hot path against the plain alternative: reports/bench/bench.{json,md}
	$(NP) bench --config $(CONFIG)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP) ## ruff format and autofix
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean: $(STAMP) ## Remove CONFIG's run data, scores and models after asking (YES=1 skips the question; reports stay)
	$(NP) clean --config $(CONFIG) $(if $(YES),--yes,)
