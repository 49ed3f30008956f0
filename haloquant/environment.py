"""Versions of the third-party code that decides an artifact's bytes, for cache keys.

A stage's output depends on more than its spec, inputs and project code: the k-quant encoders keep,
block by block, the better of their own fit and llama.cpp's quantizer (ggml, compiled into
llama-cpp-python), llama.cpp judges every GGUF, its converter writes every GGUF's metadata, and
torch's kernels compute every statistic. Each such runtime has a name; a stage declares the ones it
runs (tasks/__init__.py), and its cache key — Prefect's fingerprint, DVC's deps through the
`environment` stage's files — holds their versions. A missing runtime is an error, not a
different result.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

from haloquant import HaloquantError


def _dist(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise HaloquantError(f"the Python package {name} is not installed (scripts/install.sh installs it)") from None


@functools.cache
def _llama_cpp() -> dict:
    """llama-cpp-python's release and the hashes of its ggml libraries: the build (its CPU flags)
    decides the quantizer's float arithmetic as much as the release does."""
    from haloquant.llamacpp import ggml_library_files

    by_hash: dict[str, str] = {}
    for p in ggml_library_files():  # wheels ship each library under several names: keep one
        h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        by_hash[h] = max(by_hash.get(h, ""), p.name, key=len)
    return {"llama-cpp-python": _dist("llama-cpp-python"), "libraries": {n: h for h, n in sorted(by_hash.items())}}


@functools.cache
def _converter() -> dict:
    from haloquant.converter import version

    return {"converter": version(), "gguf": _dist("gguf")}


@functools.cache
def _torch() -> dict:
    return {p: _dist(p) for p in ("torch", "transformers", "numpy", "safetensors")}


@functools.cache
def _onnx() -> dict:
    return {p: _dist(p) for p in ("optimum", "optimum-onnx", "onnx", "onnxruntime")}


RUNTIMES = {"torch": _torch, "llama.cpp": _llama_cpp, "converter": _converter, "onnx": _onnx}


def runtime_versions(names: tuple[str, ...]) -> dict[str, dict]:
    return {n: RUNTIMES[n]() for n in names}


def environment_file(root: Path, name: str) -> Path:
    """Where the `environment` stage writes a runtime's versions (a DVC dependency)."""
    return Path(root) / "environment" / f"{name.replace('.', '_')}.json"
