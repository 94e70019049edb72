# fused_lm: the two commands of README.md, plus the GPU check.
#   make test       install what is missing, build the extensions, run the whole suite
#   make bench      install what is missing, run the benchmark harness on the default device
#   make gpu-check  on a GPU machine with no network: device, CUDA tests, benchmarks, logs to $OUT
#   make report     README's performance tables from bench/results/results.csv
SHELL := /bin/bash
PY ?= $(shell tools/pick_python.sh)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: env build test bench plot report gpu-check info clean

env:
	@tools/ensure_env.sh "$(PY)"

build: env
	@tools/locked.sh /tmp/fused_lm_build.lock tools/build.sh "$(PY)"

test: build
	@tools/run_tests.sh "$(PY)" $(PYTEST_ARGS)

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
	@tools/gpu_check.sh "$(PY)"

clean:
	rm -rf build fused_lm/*.so .build-stamp
