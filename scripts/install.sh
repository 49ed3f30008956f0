#!/usr/bin/env bash
# Create .venv and install haloquant with pinned dependencies (idempotent).
# torch goes first and alone: torch==2.13.0 is a local CPU wheel here; anything else pulls GBs.
# llama-cpp-python compiles llama.cpp on first install (10–40 min on 2 cores; pip caches the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
