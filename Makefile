# Developer entry points. `make test` is the whole check (what CI runs); `make run` runs the service locally.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

BIN := .venv/bin
# Extra pytest arguments, e.g. `make test PYTEST_ARGS='-k store -x'`.
PYTEST_ARGS ?=

section = printf '\n==> %s\n' '$(1)'

.PHONY: help venv test lint fmt run bench clean

help: ## list the targets
	@echo "usage: make TARGET"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-6s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: ## create .venv and install the project with its dev tools (again only when pyproject.toml changes)
	@bash scripts/ensure-venv.sh

lint: venv ## ruff format --check, ruff check, mypy
	@$(call section,ruff format --check)
	@$(BIN)/ruff format --check .
	@$(call section,ruff check)
	@$(BIN)/ruff check .
	@$(call section,mypy)
	@$(BIN)/mypy

test: lint ## lint, then pytest against a private PostgreSQL and Redis started for the run
	@# docker-compose validates docker-compose.yml; Chromium (with a font) runs the browser tests, which also draw
	@# Chinese, Japanese, Korean and emoji: WenQuanYi Micro Hei (1.6 MB) and Noto Color Emoji (9.9 MB) have them;
	@# HAProxy is the load balancer of tests/test_scale.py.
	@bash scripts/ensure-packages.sh docker-compose /usr/bin/chromium /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
		/usr/share/fonts/truetype/wqy/wqy-microhei.ttc /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf haproxy \
		-- docker-compose chromium fonts-dejavu-core fonts-wqy-microhei fonts-noto-color-emoji haproxy
	@$(call section,pytest (private PostgreSQL and Redis))
	@rc=0; bash scripts/with-services.sh $(BIN)/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [[ $$rc -eq 5 ]]; then echo "make test: pytest collected no tests; that counts as a failure" >&2; fi; \
	exit $$rc

fmt: venv ## format the code and apply ruff's safe fixes
	@$(BIN)/ruff format .
	@$(BIN)/ruff check --fix .

run: venv ## run the service here (and Redis and the worker); Ctrl-C stops it all
	@bash scripts/run.sh

bench: venv ## benchmark the relay against a private PostgreSQL and Redis (BENCH_ARGS='--idle 0' to skip parts)
	@bash scripts/with-services.sh $(BIN)/python -m bench $(BENCH_ARGS)

clean: ## remove .venv, caches and data/
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache data build test-artifacts *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
