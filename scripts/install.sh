#!/usr/bin/env bash
# Create .venv and install haloquant with pinned dependencies (idempotent).
# torch goes first and alone: torch==2.13.0 is a local CPU wheel here; anything else pulls GBs.
# llama-cpp-python compiles llama.cpp on first install (10–40 min on 2 cores; pip caches the wheel).
# llama.cpp's own HF→GGUF converter (convert_hf_to_gguf.py's `conversion` package) and the gguf-py
# it is written against come from the *same* llama-cpp-python sdist, so the metadata haloquant
# writes is the one the llama.cpp that judges the file expects. They go to
# .venv/share/haloquant/llama.cpp (haloquant/converter.py finds them there).
# llama.cpp is built for x86-64-v3 (AVX2/FMA), not -march=native: a native build on a CPU with AMX
# crashes in ggml's AMX matmul (seen here), and a portable build computes the same on every machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
if [ "$(uname -m)" = x86_64 ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
fi
LLAMA_CPP_PYTHON=0.3.36
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0

conv=.venv/share/haloquant/llama.cpp
if [ "$(cat "$conv/VERSION" 2>/dev/null)" != "llama-cpp-python==$LLAMA_CPP_PYTHON" ]; then
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
  top="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
  tar -xzf "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$tmp" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
  rm -rf "$conv" && mkdir -p "$conv"
  mv "$tmp/$top/conversion" "$tmp/$top/gguf-py" "$tmp/$top/LICENSE" "$conv/"
  echo "llama-cpp-python==$LLAMA_CPP_PYTHON" > "$conv/VERSION"
  rm -rf "$tmp"
fi
# gguf-py as it ships with that llama.cpp (it reports 0.19.0, the pin, but holds newer constants)
.venv/bin/python -m pip install -q --force-reinstall --no-deps "$conv/gguf-py"
.venv/bin/python -m pip install -q -e ".[dev]"
