"""End-to-end tuning (haloquant/end_to_end.py): the tuned bytes are the format's own grid points (codes
move at most one step, scales and mins untouched), the float tensors it moves are the norm weights and
biases, the quantize stage's result equals the function applied to the artifact made without it (what
bench/end_to_end.py measures), and on the real tiny model it lowers the KL from the float model on
held-out text. A streamed model is refused before anything is encoded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from haloquant import HaloquantError
from haloquant.calibstats import CalibrationStats
from haloquant.end_to_end import EndToEndSettings, tune_end_to_end
from haloquant.evaluation import score
from haloquant.folding import load_folds
from haloquant.formats import get_format
from haloquant.modelio import load_model, load_tokenizer
from haloquant.quantized import load_quantized_model, read_quantized
from haloquant.schemas.params import EndToEndSpec, ModelSpec, QuantizeSpec
from haloquant.tasks.quantize import quantize
from haloquant.textdata import eval_chunks, read_text, sequence_bos, tokenize
from tests.conftest import EVAL_TEXT, TINY
from tests.typemap import q3k_with_iq3s_down, quantize_at_type_map

E2E = EndToEndSpec(iters=60, float_lr=1e-3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny model at Q3_K (Q6_K embedding, IQ3_S ffn_down: a lattice type that takes part with its
    decoded values), RTN with the default corrections, without and with end-to-end tuning."""
    out = tmp_path_factory.mktemp("e2e")
    spec = ModelSpec(path=TINY, device="cpu", add_bos=True)
    infos, _ = quantize_at_type_map(spec, out, q3k_with_iq3s_down,
                                    {"plain": QuantizeSpec(), "tuned": QuantizeSpec(end_to_end=E2E)},
                                    n_sequences=48, seq_len=128)
    return spec, out, infos


def test_codes_move_on_the_grid_and_only_norms_and_biases_change_among_floats(runs):
    _, out, infos = runs
    plain, tuned = (load_file(str(out / name / "tensors.safetensors")) for name in ("plain", "tuned"))
    changed = 0
    for t in infos:
        if t.layer < 0 or "ffn_down" in t.gguf_name:  # outside the decoder blocks, or IQ3_S: as they came
            assert np.array_equal(plain[t.name], tuned[t.name]), t.name
            continue
        fmt = get_format("Q3_K")
        a, b = fmt.affine_blocks(plain[t.name], t.shape), fmt.affine_blocks(tuned[t.name], t.shape)
        assert np.array_equal(a.scale, b.scale) and np.array_equal(a.zero, b.zero), t.name
        assert np.abs(a.q.astype(int) - b.q.astype(int)).max() <= 1, t.name
        changed += int((a.q != b.q).sum())
    assert changed > 0
    floats = [n for n in plain if plain[n].ndim == 1 and plain[n].dtype == np.float32]
    assert floats and any(not np.array_equal(plain[n], tuned[n]) for n in floats)


def test_the_stage_equals_the_function_on_the_artifact_made_without_it(runs):
    """bench/end_to_end.py applies tune_end_to_end to a finished artifact: that is what quantize does."""
    spec, out, _ = runs
    model = load_model(TINY, "cpu")
    load_folds(model, out / "scale_fold")
    manifest, tensors = read_quantized(out / "plain")
    encoded = {q.name: tensors[q.name] for q in manifest.quantized}
    formats = {q.name: get_format(q.format) for q in manifest.quantized}
    floats = {n: torch.from_numpy(tensors[n].copy()) for n in manifest.float_tensors}
    ids = CalibrationStats(out / "calibrate").tensor("calibration_ids")
    got, fl, report = tune_end_to_end(model, ids, encoded, formats, floats, EndToEndSettings(**E2E.model_dump()), "cpu")
    assert report["kept"] and report["kl_after"] < report["kl_before"]
    staged = load_file(str(out / "tuned" / "tensors.safetensors"))
    for n in encoded:
        assert np.array_equal(got[n], staged[n]), n
    for n, v in fl.items():
        np.testing.assert_allclose(v.numpy(), staged[n], rtol=0, atol=1e-6)


def test_it_lowers_the_kl_on_held_out_text(runs):
    _, out, _ = runs
    tok = load_tokenizer(TINY)
    chunks = eval_chunks(tokenize(tok, read_text(EVAL_TEXT, "eval")), 256, 8, sequence_bos(tok, True))
    ref = load_model(TINY, "cpu")
    kl = {name: score(load_quantized_model(TINY, out / name, "cpu"), chunks, ref)["kl_mean"]
          for name in ("plain", "tuned")}
    assert kl["tuned"] < 0.97 * kl["plain"], kl


def test_a_streamed_model_is_refused_before_encoding(runs, tmp_path):
    spec, out, _ = runs
    streamed = spec.model_copy(update={"stream": True})
    with pytest.raises(HaloquantError, match="quantize.end_to_end.iters"):
        quantize(streamed, QuantizeSpec(end_to_end=E2E), out / "calibrate", out / "allocate", out / "scale_fold",
                 tmp_path / "q")
    assert not (tmp_path / "q").exists()
