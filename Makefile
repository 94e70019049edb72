# fused_lm: the two commands of README.md, plus the GPU check. Every target is one call of
# tools/dev.sh (the one way into the environment: interpreter, installs, build, runners).
#   make test       install what is missing, build the extensions, run the whole suite, then the
#                   Triton-kernel tests again under each release in TRITON_COMPAT (the GPU's 3.6.0)
#   make bench      install what is missing, run the benchmark harness on the default device
#   make gpu-check  on a GPU machine with no network: device, CUDA tests, benchmarks, logs to $OUT
#   make report     README's performance tables from bench/results/results.csv
SHELL := /bin/bash
PYTEST_ARGS ?=
BENCH_ARGS ?=
DEV := bash tools/dev.sh
# make test TRITON_COMPAT="3.6.0 ..." (or empty): the Triton releases tested next to the pinned
# one (default 3.6.0, or $FUSED_LM_TRITON_COMPAT); make ... PY=python: the interpreter.
ifeq ($(origin TRITON_COMPAT),command line)
export TRITON_COMPAT
endif
ifeq ($(origin PY),command line)
export FUSED_LM_PYTHON := $(PY)
endif

.PHONY: env build test test-main test-triton-compat bench plot report gpu-check info clean

env build info plot report gpu-check:
	@$(DEV) $@

test test-main test-triton-compat:
	@$(DEV) $@ $(PYTEST_ARGS)

bench:
	@$(DEV) bench $(BENCH_ARGS)

clean:
	rm -rf build fused_lm/*.so .build-stamp .build-headers .triton-*/
