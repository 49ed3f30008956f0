"""An interrupted sensitivity stage resumes from its last finished tensor (haloquant/resume.py):
the same table as an uninterrupted run, only the unfinished tensors computed again, and a run
with another fingerprint never takes an old journal."""

from __future__ import annotations

import pytest

from haloquant.tasks import sensitivity as sensitivity_task
from haloquant.tasks.runner import RESUME_DIR, run_stage
from tests.conftest import small_params, write_params

OUTPUTS = ("sensitivity/sensitivity.json", "sensitivity/embeddings.json")


class Interrupt(Exception):
    pass


def _counting_encoder(monkeypatch, stop_at: int | None = None) -> list[str]:
    """Wraps the stage's encoder: records the tensors it encodes; raises on the `stop_at`-th new one."""
    seen: list[str] = []
    encode = sensitivity_task.encode_tensor

    def wrapped(t, *args, **kwargs):
        if t.name not in seen:
            if stop_at is not None and len(seen) == stop_at:
                raise Interrupt(t.name)
            seen.append(t.name)
        return encode(t, *args, **kwargs)

    monkeypatch.setattr(sensitivity_task, "encode_tensor", wrapped)
    return seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    params = write_params(tmp_path_factory.mktemp("resume-reference"), small_params(**{"sensitivity.metric": "kl_fisher"}))
    for stage in ("plan_widening", "rotate", "calibrate", "sensitivity"):
        run_stage(stage, params)
    return params.parent / "artifacts"


def test_an_interrupted_sensitivity_stage_resumes_where_it_stopped(uninterrupted, tmp_path, monkeypatch):
    params = write_params(tmp_path, small_params(**{"sensitivity.metric": "kl_fisher"}))
    for stage in ("plan_widening", "rotate", "calibrate"):
        run_stage(stage, params)
    with monkeypatch.context() as m:
        first = _counting_encoder(m, stop_at=10)
        with pytest.raises(Interrupt):
            run_stage("sensitivity", params)
    journals = list((tmp_path / "artifacts" / RESUME_DIR / "sensitivity").glob("*.jsonl"))
    assert len(journals) == 1 and len(journals[0].read_text().splitlines()) == 10
    assert not (tmp_path / "artifacts" / "sensitivity" / "sensitivity.json").exists()  # nothing half-written

    with journals[0].open("a") as f:
        f.write('{"key": "cut short by a ki')  # a kill in the middle of a line: ignored
    second = _counting_encoder(monkeypatch)
    run_stage("sensitivity", params)
    assert not set(first) & set(second) and len(first) == 10 and second  # only what was left
    for out in OUTPUTS:
        assert (tmp_path / "artifacts" / out).read_bytes() == (uninterrupted / out).read_bytes(), out
    assert not (tmp_path / "artifacts" / RESUME_DIR / "sensitivity").exists()  # done: the journal goes


def test_a_changed_spec_does_not_take_the_old_journal(tmp_path, monkeypatch):
    params = write_params(tmp_path, small_params(**{"sensitivity.metric": "kl_fisher"}))
    for stage in ("plan_widening", "rotate", "calibrate"):
        run_stage(stage, params)
    with monkeypatch.context() as m:
        _counting_encoder(m, stop_at=5)
        with pytest.raises(Interrupt):
            run_stage("sensitivity", params)
    write_params(tmp_path, small_params(**{"sensitivity.metric": "kl_fisher", "sensitivity.kl_sequences": 4}))
    again = _counting_encoder(monkeypatch)
    run_stage("sensitivity", params)
    assert len(again) > 10  # every tensor computed afresh
    assert not (tmp_path / "artifacts" / RESUME_DIR / "sensitivity").exists()
