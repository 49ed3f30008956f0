"""Input checks at the door: everything a user can get wrong about a model folder or a text is
found before a stage writes anything, and named — the field, the file, the tensor.

Cheap checks (`check_model_files`: config, tokenizer, safetensors headers against the config's
shapes, truncated files) run before every stage; those that read every weight or tokenize a whole
text run where the data is loaded anyway (calibrate, validate) and in `haloquant check`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from haloquant import HaloquantError
from haloquant.modelio import check_model_dir, load_config, read_config

SAFETENSORS_HEADER_LIMIT = 100 << 20


def safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, checked against the file's size (a truncated download
    is named, not met later as a library's 'incomplete metadata')."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HaloquantError(f"model.path: {path} is truncated ({size} bytes, not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise HaloquantError(f"model.path: {path} is truncated or not a safetensors file (header of {n} bytes "
                                 f"in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HaloquantError(f"model.path: {path} has an unreadable safetensors header") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise HaloquantError(f"model.path: {path} is truncated: its header describes {8 + n + end} bytes, the file "
                             f"has {size}")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from every .safetensors file's header."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        shapes.update({k: tuple(v["shape"]) for k, v in safetensors_header(f).items()})
    return shapes


def expected_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape the config describes (the model built on the meta device; a tied
    head is not listed: checkpoints need not hold it)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(model_dir))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def check_model_files(model_dir: str | Path) -> Path:
    """Folder, config, family, tokenizer, and every safetensors header against the config."""
    p = check_model_dir(model_dir)
    if not any(p.glob("*.safetensors")):
        return p  # *.bin checkpoints: transformers reads (and checks) them itself
    have = checkpoint_shapes(p)
    want = expected_shapes(p)
    for name, shape in want.items():
        if name not in have:
            raise HaloquantError(f"model.path: {p} has no tensor {name!r}, which config.json describes "
                                 f"(shape {list(shape)})")
        if have[name] != shape:
            raise HaloquantError(f"model.path: tensor {name!r} has shape {list(have[name])} in the checkpoint, "
                                 f"config.json describes {list(shape)}")
    check_tokenizer(p)
    return p


def check_tokenizer(model_dir: Path) -> None:
    """The tokenizer loads and has no token id the embedding lacks."""
    from haloquant.modelio import load_tokenizer

    vocab = read_config(model_dir).get("vocab_size")
    try:
        tok = load_tokenizer(model_dir)
    except HaloquantError:
        raise
    except Exception as e:  # transformers' errors for a broken tokenizer are of many types
        raise HaloquantError(f"model.path: the tokenizer in {model_dir} does not load ({type(e).__name__}: {e})") \
            from None
    if vocab is not None and len(tok) > vocab:
        raise HaloquantError(f"model.path: the tokenizer in {model_dir} has {len(tok)} tokens, more than "
                             f"config.json's vocab_size {vocab} (token ids beyond the embedding)")


def check_finite(model, where: str = "model.path") -> None:
    """Every weight finite: a NaN or Inf would pass calibration and poison every cost after it."""
    for name, p in model.named_parameters():
        bad = int((~torch.isfinite(p)).sum())
        if bad:
            raise HaloquantError(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf) of "
                                 f"{p.numel()}")


def check_enough_tokens(n_tokens: int, needed: int, field: str, what: str) -> None:
    if n_tokens < needed:
        raise HaloquantError(f"{field}: the text has {n_tokens} tokens, fewer than the {needed} {what}")
