"""Model folders as users have them: written by transformers 5.x or 4.x, retrained BPE
vocabularies llama.cpp's converter does not know by hash, unregistered families."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from gguf import GGUFReader

from haloquant import HaloquantError
from haloquant.hfcompat import model_view, written_by_v5
from haloquant.modelio import load_config, load_model, load_tokenizer
from haloquant.pretokenizers import pretokenizer_by_rules
from tests.conftest import REPO, TINY, small_params, write_params
from tests.modelzoo import CASES, make_model


def as_transformers_5(src, dst, rope_theta=None):
    """A copy of `src` as transformers 5.x saves it: TokenizersBackend, RoPE only in rope_parameters."""
    shutil.copytree(src, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "TokenizersBackend"
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((dst / "config.json").read_text())
    theta = cfg.pop("rope_theta", 10000.0)
    theta = theta if rope_theta is None else rope_theta
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    cfg["transformers_version"] = "5.23.0"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_transformers_5_folder_loads_as_the_same_model(tmp_path):
    v5 = as_transformers_5(TINY, tmp_path / "tiny-v5")
    assert written_by_v5(v5) and not written_by_v5(TINY)
    text = "The quick brown fox jumps over the lazy dog. 1234"
    assert load_tokenizer(v5)(text)["input_ids"] == load_tokenizer(TINY)(text)["input_ids"]
    ids = torch.tensor([load_tokenizer(TINY)(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(load_model(v5, "cpu")(ids).logits, load_model(TINY, "cpu")(ids).logits)
    with model_view(v5) as view:
        assert view != v5 and (view / "model.safetensors").resolve() == (v5 / "model.safetensors").resolve()
    assert not view.exists()  # the view is temporary


def test_rope_theta_of_a_transformers_5_folder_is_not_defaulted(tmp_path):
    """transformers 4.x would silently use θ = 10000 for a folder that has it only in rope_parameters."""
    v5 = as_transformers_5(TINY, tmp_path / "tiny-v5", rope_theta=500000.0)
    assert load_config(v5).rope_theta == 500000.0
    with torch.no_grad():
        ids = torch.arange(200)[None]
        assert not torch.allclose(load_model(v5, "cpu")(ids).logits, load_model(TINY, "cpu")(ids).logits)


def test_a_transformers_5_folder_gives_the_same_gguf(pipeline_run, tmp_path):
    from haloquant.schemas.params import GGUFSpec, ModelSpec
    from haloquant.tasks.export_gguf import export_gguf

    folder, _, _ = pipeline_run
    v5 = as_transformers_5(TINY, tmp_path / TINY.name)
    quant = folder / "artifacts" / "quantize"
    export_gguf(ModelSpec(path=v5, add_bos=True), GGUFSpec(), quant, tmp_path / "v5")
    export_gguf(ModelSpec(path=TINY, add_bos=True), GGUFSpec(), quant, tmp_path / "v4")
    a, b = GGUFReader(tmp_path / "v5" / "model.gguf"), GGUFReader(tmp_path / "v4" / "model.gguf")
    assert {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")} == \
           {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert all((x.data == y.data).all() for x, y in zip(a.tensors, b.tensors))


@pytest.mark.parametrize("tokenizer, expected", [("bpe-llama3", "llama-bpe"), ("bpe-qwen2", "qwen2")])
def test_retrained_bpe_vocabularies_are_named_by_their_rules(tokenizer, expected, tmp_path):
    case = next(c for c in CASES if c.tokenizer == tokenizer)
    assert pretokenizer_by_rules(make_model(case, tmp_path)) == expected
    assert pretokenizer_by_rules(TINY) == "gpt-2"  # GPT-2's ByteLevel split


def test_an_unknown_pre_tokenizer_is_refused_naming_the_file(pipeline_run, tmp_path):
    from haloquant.schemas.params import GGUFSpec, ModelSpec
    from haloquant.tasks.export_gguf import export_gguf

    folder, _, _ = pipeline_run
    odd = tmp_path / "odd"
    shutil.copytree(TINY, odd)
    tok = json.loads((odd / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": False}]}
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(HaloquantError, match="does not recognise the BPE pre-tokenizer of .*odd/tokenizer.json"):
        export_gguf(ModelSpec(path=odd), GGUFSpec(), folder / "artifacts" / "quantize", tmp_path / "out")
    assert not (tmp_path / "out" / "model.gguf").exists()


def test_an_unregistered_family_fails_in_check_naming_the_registered_ones(tmp_path):
    folder = tmp_path / "neox"
    shutil.copytree(TINY, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    params = write_params(tmp_path, small_params(**{"model.path": str(folder)}))
    r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "check", "--params", str(params)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "architecture 'GPTNeoXForCausalLM' is not supported; supported: Gemma2ForCausalLM" in r.stderr
    assert "Qwen3ForCausalLM" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("model_type, dropped", [("qwen2", True), ("llama", True), ("mistral", False)])
def test_the_converter_drops_transformers_false_mistral_regex_alarm(tmp_path, model_type, dropped):
    """transformers 4.57.3–4.57.6 warn of "an incorrect regex pattern" for any folder they saved (seen
    converting Qwen2.5-Coder-0.5B); while llama.cpp's converter loads a non-Mistral model's tokenizer
    the warning is dropped, for Mistral's own model types it stays."""
    import logging

    from haloquant.converter import _no_false_mistral_alarm

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    emitter = logging.getLogger("transformers.tokenization_utils_base")
    handler = Keep()
    emitter.addHandler(handler)
    try:
        with _no_false_mistral_alarm(tmp_path):
            emitter.warning("The tokenizer you are loading from 'x' with an incorrect regex pattern: https://...")
            emitter.warning("another warning")
        emitter.warning("after: with an incorrect regex pattern")
    finally:
        emitter.removeHandler(handler)
    assert seen == (["another warning"] if dropped else
                    ["The tokenizer you are loading from 'x' with an incorrect regex pattern: https://...",
                     "another warning"]) + ["after: with an incorrect regex pattern"]
