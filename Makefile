# `make bench`: the benchmark suite (bench/__main__.py); BENCH_ARGS="--quick" or "--only throughput".
.PHONY: bench test demo

bench:
	bash scripts/bootstrap
	bash bench/install-tools
	.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
	.venv/bin/python -m bench $(BENCH_ARGS)

test:
	bash scripts/test
