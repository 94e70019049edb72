# fused_lm: the two commands of README.md, plus the GPU check.
#   make test       install what is missing, build the extensions, run the whole suite, then the
#                   Triton-kernel tests again under each release in TRITON_COMPAT (the GPU's 3.6.0)
#   make bench      install what is missing, run the benchmark harness on the default device
#   make gpu-check  on a GPU machine with no network: device, CUDA tests, benchmarks, logs to $OUT
#   make report     README's performance tables from bench/results/results.csv
SHELL := /bin/bash
PY ?= $(shell tools/pick_python.sh)
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Triton releases tested next to the pinned one (tools/test_triton_version.sh); empty skips.
TRITON_COMPAT ?= $(if $(filter undefined,$(origin FUSED_LM_TRITON_COMPAT)),3.6.0,$(FUSED_LM_TRITON_COMPAT))

.PHONY: env build test test-main test-triton-compat bench plot report gpu-check info clean

env:
	@tools/ensure_env.sh "$(PY)"

build: env
	@tools/locked.sh /tmp/fused_lm_build.lock tools/build.sh "$(PY)"

# Both jobs run even when the first fails; make fails if either did.
test: build
	@rc=0; tools/run_tests.sh "$(PY)" $(PYTEST_ARGS) || rc=$$?; \
	for v in $(TRITON_COMPAT); do tools/test_triton_version.sh "$(PY)" $$v $(PYTEST_ARGS) || rc=$$?; done; \
	exit $$rc

test-main: build
	@tools/run_tests.sh "$(PY)" $(PYTEST_ARGS)

test-triton-compat: build
	@rc=0; for v in $(TRITON_COMPAT); do tools/test_triton_version.sh "$(PY)" $$v $(PYTEST_ARGS) || rc=$$?; done; exit $$rc

bench: build
	@tools/ensure_env.sh "$(PY)" bench
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/plot.py

plot: env
	$(PY) bench/plot.py

report: env
	$(PY) bench/report.py

info: build
	$(PY) -m fused_lm info

gpu-check:
	@bash tools/gpu_check.sh "$(PY)"

clean:
	rm -rf build fused_lm/*.so .build-stamp .triton-*/
