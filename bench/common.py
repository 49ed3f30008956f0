"""What every bench script needs: the model spec, the evaluation text, one calibration, and an
allocation turned into a scored GGUF."""

from __future__ import annotations

from pathlib import Path

from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.textdata import read_text
from haloquant.schemas.params import CalibrationSpec, FoldSpec, GGUFSpec, ModelSpec, QuantizeSpec
from haloquant.tasks.calibrate import calibrate
from haloquant.tasks.export_gguf import export_gguf
from haloquant.tasks.quantize import quantize
from haloquant.tasks.scale_fold import scale_fold

REPO = Path(__file__).resolve().parent.parent
NO_CORRECTIONS = {"correct_row_scales": False, "correct_input_scales": False}


def plain(**kw) -> QuantizeSpec:
    """The quantizer alone: quantize's statistics corrections off unless `kw` turns them on, whatever the
    schema's defaults — the baseline the benches' ablations add parts to, as their recorded results were made."""
    return QuantizeSpec(**{**NO_CORRECTIONS, **kw})


def journaled(out: Path, stage: str, *key):
    """Around a bench's call of a long stage function (e.g. score_sensitivity): an interrupted call
    resumes with the items it finished, as the runner's stages do (haloquant/resume.py). The
    journal's key: `key` (the call's arguments, as strings or JSON) and the stage's code."""
    from haloquant.artifacts import sha256_file, sha256_json
    from haloquant.codedeps import project_modules
    from haloquant.resume import journal_for

    def fingerprint() -> str:
        code = {name: sha256_file(path) for name, path in project_modules([f"haloquant.tasks.{stage}"]).items()}
        return sha256_json([key, code])

    return journal_for(out / ".resume" / stage, fingerprint)
EVAL_TEXT = REPO / "data/wikitext-2-raw/wiki.test.raw"
CALIB_TEXT = REPO / "data/wikitext-2-raw/wiki.valid.raw"


def repo_params(model: Path, values: dict | None = None, sets=()) -> dict:
    """The repository's params.yaml for another model: model.path set, its relative paths made
    absolute, then `values` (dotted key → value) and `sets` ("KEY=VALUE", VALUE read as YAML) in that order."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["path"] = str(model)
    for section in ("calibration", "validate"):
        params[section]["text"] = str(REPO / params[section]["text"])
    params["allocation"]["policy"] = str(REPO / params["allocation"]["policy"])
    items = list((values or {}).items()) + [(k, yaml.safe_load(v)) for k, _, v in (s.partition("=") for s in sets)]
    for key, value in items:
        *path, last = key.split(".")
        section = params
        for k in path:
            section = section[k]
        section[last] = value
    return params


def model_add_bos(model: Path) -> bool | None:
    """model.add_bos for a bench model: the reference models (ref-llama-*, and the ones
    make_models.py trains like them) start sequences with <|endoftext|>, which their tokenizer does
    not add itself; any other model as its own tokenizer does."""
    return True if Path(model).resolve().name.startswith("ref-llama") else None


def setup(model: Path, out: Path, add_bos: bool | None = None,
          device: str = "cpu") -> tuple[ModelSpec, Path, str]:
    """(model spec, calibration dir, evaluation text); calibrates into out/calibrate once
    (64 × 256 tokens of WikiText-2 validation, as the default params.yaml). `add_bos`: model.add_bos
    (default: model_add_bos); `device`: model.device (a lent GPU runs the stages there)."""
    if add_bos is None:
        add_bos = model_add_bos(model)
    spec = ModelSpec(path=model.resolve(), device=device, add_bos=add_bos)
    calib = out / "calibrate"
    if not (calib / "calibration.json").is_file():
        calibrate(spec, CalibrationSpec(text=CALIB_TEXT, n_sequences=64, seq_len=256), calib)
    return spec, calib, read_text(EVAL_TEXT, "eval")


def build_and_score(spec, calib, alloc_dir: Path, out: Path, text: str, chunks: int) -> tuple[int, float]:
    """An allocation folder → RTN quantize (no folding) → GGUF; returns its bytes and llama.cpp's
    perplexity on `chunks` chunks of 512."""
    scale_fold(spec, FoldSpec(), calib, alloc_dir, out / "scale_fold")
    quantize(spec, plain(), calib, alloc_dir, out / "scale_fold", out / "quantize")
    export_gguf(spec, GGUFSpec(), out / "quantize", out / "gguf")
    gguf = out / "gguf" / "model.gguf"
    return gguf.stat().st_size, llama_cpp_perplexity(gguf, text, 512, chunks)["ppl"]
