# The README's two commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rsilora-installed
DATA := data/synthetic
TINY := models/tiny-instructblip
BLIP2 := models/tiny-blip2

.PHONY: install test demo bench clean-demo

# Re-installs only when the package metadata or the pins change.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

$(DATA)/RSICap/captions.json: | install
	$(BIN)/rsilora synth --out $(DATA) --train-images 200 --test-images 40 --seed 0

$(TINY)/config.json: | install
	$(BIN)/rsilora tiny-model --out $(TINY) --seed 0

$(BLIP2)/config.json: | install
	$(BIN)/rsilora tiny-model --kind blip2 --out $(BLIP2) --seed 0

# The main job: a local Ray head on loopback, stage 1 submitted with `ray job submit`, the best
# adapter evaluated against zero-shot baselines on the synthetic RSIEval set, and the report.
demo: install $(DATA)/RSICap/captions.json $(TINY)/config.json $(BLIP2)/config.json
	BIN=$(BIN) tune_jobs/demo.sh

bench: install
	mkdir -p runs/bench
	$(BIN)/python bench/loop_overhead.py --json runs/bench/loop_overhead.json
	$(BIN)/python bench/generation_speed.py --json runs/bench/generation_speed.json
	$(BIN)/python bench/metrics_speed.py --json runs/bench/metrics_speed.json
	$(BIN)/python bench/asha_vs_fifo.py --json runs/bench/asha_vs_fifo.json
	$(BIN)/python bench/feature_cache.py --json runs/bench/feature_cache.json
	$(BIN)/python -c 'import json, pathlib; d = pathlib.Path("runs/bench"); out = d / "all.json"; out.write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json")) if p != out}, indent=2)); print(out)'

clean-demo:
	rm -rf $(DATA) $(TINY) $(BLIP2) runs/tune/demo-* runs/eval/demo-* results/demo-*
