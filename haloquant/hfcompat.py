"""Model folders written by transformers 5.x, read by the transformers 4.x haloquant pins.

haloquant pins transformers 4.57 (optimum-onnx, its ONNX exporter, caps it below 4.58). Folders
saved by transformers 5 differ in two ways that 4.x misreads:
- tokenizer_config.json names `"tokenizer_class": "TokenizersBackend"` (5.x's generic fast
  tokenizer over tokenizer.json), which 4.x cannot import; its 4.x equivalent is
  PreTrainedTokenizerFast, which reads the same tokenizer.json.
- config.json keeps RoPE settings only under `rope_parameters` ({rope_type, rope_theta, …}, or one
  such dict per attention type for Gemma 3), where 4.x reads `rope_theta` / `rope_scaling` and
  would silently fall back to its default θ.
And one way folders made by transformers' own GGUF loader differ: they hold the GGUF file itself
under the name tokenizer.model beside the real tokenizer.json, which llama.cpp's converter would
try to read as a SentencePiece model. Such a file is left out.
`model_view` gives a folder 4.x and the converter read correctly: the folder itself when nothing
needs changing, otherwise a temporary folder of links to every file, those JSON files rewritten.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

BACKEND_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _rope_keys(rp: dict) -> dict:
    """transformers-4 keys for one rope_parameters dict: rope_theta, and rope_scaling unless default."""
    out = {}
    if "rope_theta" in rp:
        out["rope_theta"] = rp["rope_theta"]
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        out["rope_scaling"] = scaling
    return out


def v4_config(cfg: dict) -> dict:
    """config.json as transformers 4.x expects it (unchanged where it already is)."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" in cfg:
        return cfg
    cfg = dict(cfg)
    if "full_attention" in rp or "sliding_attention" in rp:  # Gemma 3: per attention type
        cfg.update(_rope_keys(rp.get("full_attention", {})))
        if "rope_theta" in rp.get("sliding_attention", {}):
            cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    else:
        cfg.update(_rope_keys(rp))
    return cfg


def v4_tokenizer_config(tc: dict) -> dict:
    cls = tc.get("tokenizer_class")
    extra = tc.get("extra_special_tokens")
    if cls not in BACKEND_CLASSES and not isinstance(extra, list):
        return tc
    tc = dict(tc)
    if cls in BACKEND_CLASSES:
        tc["tokenizer_class"] = BACKEND_CLASSES[cls]
    if isinstance(extra, list):  # 5.x: a list of tokens; 4.x: a dict of named ones
        tc.pop("extra_special_tokens")
        tc.setdefault("additional_special_tokens", extra)
    return tc


_REWRITES = {"config.json": v4_config, "tokenizer_config.json": v4_tokenizer_config}


def _rewritten(model_dir: Path) -> dict[str, dict]:
    out = {}
    for name, fix in _REWRITES.items():
        p = model_dir / name
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            fixed = fix(data)
            if fixed is not data:
                out[name] = fixed
    return out


def not_sentencepiece(path: Path) -> bool:
    """A tokenizer.model that is not a SentencePiece model (e.g. a GGUF file under that name)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return True
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        return True
    return False


def _left_out(model_dir: Path) -> set[str]:
    spm = model_dir / "tokenizer.model"
    return {spm.name} if (model_dir / "tokenizer.json").is_file() and not_sentencepiece(spm) else set()


def written_by_v5(model_dir: str | Path) -> bool:
    return bool(_rewritten(Path(model_dir)))


@contextlib.contextmanager
def model_view(model_dir: str | Path) -> Iterator[Path]:
    """A folder with `model_dir`'s files that transformers 4.x reads correctly."""
    model_dir = Path(model_dir)
    fixed, left_out = _rewritten(model_dir), _left_out(model_dir)
    if not fixed and not left_out:
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="haloquant-v4view-") as tmp:
        view = Path(tmp) / model_dir.name
        view.mkdir()
        for f in model_dir.iterdir():
            if f.name not in fixed and f.name not in left_out:
                (view / f.name).symlink_to(f.resolve())
        for name, data in fixed.items():
            (view / name).write_text(json.dumps(data, indent=2), encoding="utf-8")
        yield view
