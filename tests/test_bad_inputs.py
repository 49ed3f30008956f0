"""Every user-reachable failure: exit code 2, a message naming the field, file or tensor at fault,
no traceback, and every earlier artifact byte-identical."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from haloquant.artifacts import sha256_tree
from tests.conftest import EVAL_TEXT, REPO, TINY, small_params, write_params


def cli(*args, limit_file_bytes: int | None = None):
    def limits():
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run([sys.executable, "-m", "haloquant.flows.cli", *args], capture_output=True, text=True,
                          cwd=REPO, preexec_fn=limits)


def model_copy(tmp: Path, edit=None) -> Path:
    folder = tmp / "model"
    shutil.copytree(TINY, folder)
    if edit:
        edit(folder)
    return folder


def edit_weights(fn):
    def edit(folder):
        w = load_file(str(folder / "model.safetensors"))
        fn(w)
        save_file(w, str(folder / "model.safetensors"))
    return edit


def edit_json(name, fn):
    def edit(folder):
        data = json.loads((folder / name).read_text())
        fn(data)
        (folder / name).write_text(json.dumps(data))
    return edit


def _set(w, key, index, value):
    t = w[key].clone()
    t.view(-1)[index] = value
    w[key] = t


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def overflow_activations(folder):  # finite (float32) weights whose activations overflow float32
    def edit(w):
        w.update({k: v.float() for k, v in w.items()})
        w["model.layers.0.input_layernorm.weight"].fill_(3e38)
    edit_weights(edit)(folder)


def extra_token(folder):
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 8192, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def drop_tensor(folder):
    edit_weights(lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))(folder)


def other_policy(tmp: Path) -> Path:
    pol = tmp / "policy"
    shutil.copytree(REPO / "policies" / "sac-llama-family", pol)
    card = json.loads((pol / "policy.json").read_text())
    card["features"] = card["features"][:-1]
    (pol / "policy.json").write_text(json.dumps(card))
    return pol


def short_text(tmp: Path, n_words: int) -> Path:
    p = tmp / f"short{n_words}.txt"
    p.write_text(" ".join(EVAL_TEXT.read_text().split()[:n_words]))
    return p


# case → (params overrides (a function of the tmp folder), stage, expected substrings, extra CLI settings)
CASES = {
    "truncated safetensors": (lambda t: {"model.path": str(model_copy(t, truncate))}, "calibrate",
                              ["model.path", "model.safetensors is truncated"]),
    "NaN in a weight": (lambda t: {"model.path": str(model_copy(t, edit_weights(
        lambda w: _set(w, "model.layers.2.mlp.down_proj.weight", 7, float("nan")))))}, "calibrate",
        ["tensor 'model.layers.2.mlp.down_proj.weight' holds 1 non-finite value"]),
    "Inf in a weight": (lambda t: {"model.path": str(model_copy(t, edit_weights(
        lambda w: [_set(w, "model.embed_tokens.weight", i, float("inf")) for i in (3, 5)])))}, "calibrate",
        ["tensor 'model.embed_tokens.weight' holds 2 non-finite value"]),
    "Inf in calibration activations": (lambda t: {"model.path": str(model_copy(t, overflow_activations))},
                                       "calibrate", ["calibration.text", "model.layers.0.self_attn.q_proj",
                                                     "non-finite"]),
    "unknown family": (lambda t: {"model.path": str(model_copy(t, edit_json("config.json", lambda c: c.update(
        architectures=["GPTNeoXForCausalLM"]))))}, "check", ["architecture 'GPTNeoXForCausalLM' is not supported"]),
    "shape against config": (lambda t: {"model.path": str(model_copy(t, edit_json("config.json", lambda c: c.update(
        intermediate_size=1024))))}, "calibrate", ["model.layers.0.mlp.gate_proj.weight", "[768, 256]",
                                                   "config.json describes [1024, 256]"]),
    "missing tensor": (lambda t: {"model.path": str(model_copy(t, drop_tensor))}, "calibrate",
                       ["has no tensor 'model.layers.1.mlp.up_proj.weight'"]),
    "tokenizer beyond the vocabulary": (lambda t: {"model.path": str(model_copy(t, extra_token))}, "calibrate",
                                        ["tokenizer", "8193 tokens", "vocab_size 8192"]),
    "no tokenizer": (lambda t: {"model.path": str(model_copy(t, lambda f: (f / "tokenizer.json").unlink()))},
                     "calibrate", ["model.path", "has no tokenizer"]),
    "eval text shorter than a chunk": (lambda t: {"validate.text": str(short_text(t, 40))}, "validate",
                                       ["validate.text", "fewer than validate.ctx=256"]),
    "calibration shorter than requested": (lambda t: {"calibration.text": str(short_text(t, 300))}, "calibrate",
                                           ["calibration.text", "fewer than the 1024 tokens"]),
    "empty calibration text": (lambda t: {"calibration.text": str(short_text(t, 0))}, "calibrate",
                               ["calibration.text", "is empty"]),
    "calibration is the eval text": (lambda t: {"calibration.text": str(EVAL_TEXT)}, "calibrate",
                                     ["calibration.text", "same text as validate.text"]),
    "budget given twice": (lambda t: {"allocation.budget": {"bits_per_weight": 4.5, "file_mb": 3.0}}, "allocate",
                           ["allocation.budget", "give exactly one of"]),
    "infeasible budget": (lambda t: {"allocation.budget": {"bits_per_weight": 3.0}}, "allocate",
                          ["allocation.budget.bits_per_weight", "needs 4.5000 bits per weight"]),
    "policy of another feature set": (lambda t: {"allocation.solver": "sac", "sensitivity.metric": "none",
                                                 "allocation.policy": str(other_policy(t))}, "allocate",
                                      ["allocation.policy", "was trained on other features"]),
    "a string for a number": (lambda t: {"calibration.n_sequences": "64"}, "calibrate",
                              ["calibration.n_sequences", "valid integer", "'64'"]),
    "yes for a bool": (lambda t: {"quantize.importance": "yes"}, "quantize",
                       ["quantize.importance", "valid boolean", "'yes'"]),
    "a string for a float": (lambda t: {"allocation.budget": {"bits_per_weight": "4.5"}}, "allocate",
                             ["allocation.budget.bits_per_weight", "valid number"]),
    "unknown key": (lambda t: {"quantize.mode": "rtn"}, "quantize", ["quantize.mode", "unknown key"]),
    "unknown format": (lambda t: {"sensitivity.formats": ["Q4_K", "Q9_K"]}, "sensitivity",
                       ["sensitivity.formats", "Q9_K"]),
}


@pytest.fixture
def guarded(pipeline_run):
    """The finished pipeline's artifacts, checked byte-identical after each case."""
    folder, _, _ = pipeline_run
    art = folder / "artifacts"
    before = {p: sha256_tree(p) for p in sorted(art.rglob("*")) if p.is_file() and ".timing" not in p.parts}
    yield folder
    after = {p: sha256_tree(p) for p in sorted(art.rglob("*")) if p.is_file() and ".timing" not in p.parts}
    assert after == before


def run_case(folder: Path, tmp_path: Path, overrides: dict, stage: str, **kw):
    params = write_params(folder, small_params(**overrides), name="bad.yaml")  # the same artifacts root
    try:
        return cli("check", "--params", str(params), **kw) if stage == "check" else \
            cli("stage", stage, "--params", str(params), **kw)
    finally:
        params.unlink()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_naming_it(case, guarded, tmp_path):
    make, stage, expected = CASES[case]
    r = run_case(guarded, tmp_path, make(tmp_path), stage)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    for e in expected:
        assert e in r.stderr, (e, r.stderr)


def test_disk_full_while_writing_an_artifact(guarded, tmp_path):
    """The quantized tensors do not fit (the process may write no file over 200 kB, as on a full
    disk): exit 2 naming the file; the previous tensors file stays."""
    r = run_case(guarded, tmp_path, {}, "quantize", limit_file_bytes=200_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write" in r.stderr and "quantize/tensors.safetensors" in r.stderr and "File too large" in r.stderr


@contextlib.contextmanager
def read_only(folder: Path):
    """An output folder nobody may write to, root included (ext4's immutable flag)."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_output_folder_not_writable(guarded, tmp_path):
    with read_only(guarded / "artifacts" / "export_gguf"):
        r = run_case(guarded, tmp_path, {}, "export_gguf")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write" in r.stderr and "export_gguf" in r.stderr


def test_an_edited_artifact_is_named(guarded, tmp_path):
    """An allocation.json that no longer parses (hand-edited, half-copied) fails quantize naming it;
    restored afterwards (the guard checks every artifact)."""
    alloc = guarded / "artifacts" / "allocate" / "allocation.json"
    original = alloc.read_bytes()
    try:
        alloc.write_text(original.decode()[:100])
        r = run_case(guarded, tmp_path, {}, "quantize")
    finally:
        alloc.write_bytes(original)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "allocate/allocation.json is not valid JSON" in r.stderr


def test_invalid_yaml_and_missing_params_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed\n")
    r = cli("check", "--params", str(bad))
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr
    r = cli("stage", "calibrate", "--params", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2 and "absent.yaml: params file not found" in r.stderr



def test_a_stage_run_before_the_one_it_reads_names_it(tmp_path):
    """`haloquant stage rotate` before plan_widening has decided (by hand, out of order): exit 2 naming the
    missing decision and the stage that writes it; rotate writes nothing."""
    params = write_params(tmp_path, small_params())
    r = cli("stage", "rotate", "--params", str(params))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "plan_widening/widening.json: missing — the plan_widening stage has not run" in r.stderr, r.stderr
    assert not (tmp_path / "artifacts" / "rotate").exists()
    assert cli("stage", "plan_widening", "--params", str(params)).returncode == 0
    assert cli("stage", "rotate", "--params", str(params)).returncode == 0
    assert (tmp_path / "artifacts" / "rotate" / "rotation.json").is_file()
