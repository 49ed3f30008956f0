"""An interrupted stage resumes from its last finished item.

The sensitivity stage of a large model runs for many minutes (≈ 19 on Llama-3-8B's shape on an
H100), one tensor after another. As each tensor finishes, its result is appended to a journal;
run again, the stage takes the journal's results and computes only the tensors after them.

A journal belongs to one fingerprint of the stage — its spec, its input files' hashes, its code's
hashes and its runtimes' versions (tasks/runner.py) — so it is only ever resumed by a run that
would compute the very same results; any change starts afresh (and drops the old journal). It
lives in `artifacts/.resume/<stage>/<fingerprint>.jsonl`, beside the artifacts, never in a stage's
outputs (which are still written whole, at the end), and is deleted when the stage completes.

The runner opens it (`journal_for`, around every stage it runs: `haloquant stage|run`, `dvc repro`,
the Prefect flow); a stage function called directly (benches, tests, sweep points) records
nothing: `Journal` is then empty and forgets what it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

_CURRENT: ContextVar[Callable[[], Path] | None] = ContextVar("haloquant_journal", default=None)


@contextlib.contextmanager
def journal_for(folder: Path, fingerprint: Callable[[], str]) -> Iterator[None]:
    """A stage run inside the `with` journals into folder/<fingerprint>.jsonl; on success the
    folder goes. `fingerprint` is called only by a stage that journals (hashing a large model's
    files takes seconds); then the other fingerprints' journals in `folder`, stale, are removed."""
    folder = Path(folder)

    def path() -> Path:
        p = folder / f"{fingerprint()}.jsonl"
        if folder.is_dir():
            for old in folder.iterdir():
                if old != p:
                    old.unlink(missing_ok=True)
        return p

    token = _CURRENT.set(path)
    try:
        yield
    finally:
        _CURRENT.reset(token)
    shutil.rmtree(folder, ignore_errors=True)  # reached only when the stage returned


class Journal:
    """The current stage's finished items, by key (e.g. a tensor's name), and the recording of
    new ones. Each line is one item: {"key": ..., "value": ...}, written and flushed to disk
    before the stage moves on; a line cut short by a kill is ignored."""

    def __init__(self):
        where = _CURRENT.get()
        self.path = where() if where is not None else None
        self.done: dict[str, Any] = {}
        if self.path is None or not self.path.is_file():
            return
        kept = 0  # bytes of whole lines
        with self.path.open("rb") as f:
            for line in f:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: everything before it stands
                self.done[item["key"]] = item["value"]
                kept += len(line)
        os.truncate(self.path, kept)  # new lines follow the last whole one

    def record(self, key: str, value: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
