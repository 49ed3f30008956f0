"""Atomic artifact writing and content hashing.

Every file a stage produces goes through these helpers: it is written to a hidden temporary file
in the same folder (`.NAME.*.tmp`) and renamed into place, so a crash, a kill -9 or an error never
leaves a half-written artifact under its name and never clobbers the previous good one. A stage
whose output is a folder writes it whole under a hidden temporary name and swaps it in
(`atomic_dir`). Temporaries a killed process left behind are removed before the stage runs again
(`remove_leftovers`). A write that fails (disk full, folder not writable) is a `HaloquantError`
naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from haloquant import HaloquantError

TMP_SUFFIX = ".tmp"


def _write_error(path: Path, e: Exception) -> HaloquantError:
    return HaloquantError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}")


def _write_failures() -> tuple[type[Exception], ...]:
    """What a failed write raises: OSError, and safetensors' own error (it writes in Rust)."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(folder, e) from e


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    _mkdir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except _write_failures() as e:
        raise _write_error(path, e) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole.
    (Two renames: a kill between them leaves `path` absent, never mixed.)"""
    path = Path(path)
    _mkdir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(path: str | Path) -> None:
    """Delete the temporaries a killed writer of `path` left beside it."""
    path = Path(path)
    if path.parent.is_dir():
        for f in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise HaloquantError(f"{p} does not exist: run the stage that writes it first") from None
    except json.JSONDecodeError as e:
        raise HaloquantError(f"{p} is not valid JSON ({e}); re-run the stage that writes it") from None


def read_artifact(path: str | Path, schema):
    """A JSON artifact validated against its schema (a pydantic model class); a stale or edited
    file is named, with what does not fit."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(read_json(path))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "<root>"
        raise HaloquantError(f"{path} does not match the {schema.__name__} schema ({where}: {first['msg']}); re-run "
                             "the stage that writes it") from None


_HASHES: dict[tuple, str] = {}  # (file identity, size, mtime, ctime) → sha256, for this process
_SETTLED_S = 2.0  # a file modified more recently than this is hashed again every time


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's sha256. Every stage's fingerprint hashes the checkpoint and the files before it,
    and a flow computes fingerprints more than once; within a process a file is read once while
    its inode, size, mtime and ctime stay the same (any write changes ctime) — DVC's and git's
    rule, with git's guard for "racy" files: one modified in the last _SETTLED_S seconds, where
    a coarse file-system clock could hide a rewrite, is always read."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if time.time() - max(st.st_mtime, st.st_ctime) > _SETTLED_S:
        if len(_HASHES) > 100_000:
            _HASHES.clear()
        _HASHES[key] = digest
    return digest


def sha256_tree(path: str | Path) -> str:
    """Hash of a file, or of a folder's files (relative names and contents), in sorted order;
    hidden temporaries and __pycache__ are not part of it."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                    and not any(part.startswith(".") and part.endswith(TMP_SUFFIX) for part in p.relative_to(path).parts)):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
