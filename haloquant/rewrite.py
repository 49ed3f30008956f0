"""Rewrite a Hugging Face model folder tensor by tensor, shard by shard: the one loop behind every
function-preserving copy of a checkpoint (rotation.py, widening.py).

A model of any size needs one shard in memory (and whatever single source tensors the transform reads
beside it). The copy is written to a temporary folder first, so the output folder is whole or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from haloquant import HaloquantError

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")

# (name, tensor, read) → the tensors written in its place: usually {name: new tensor}; more than one to
# add a tensor (an untied head), none to drop one. `read(other)` gives any source tensor.
Transform = Callable[[str, torch.Tensor, Callable[[str], torch.Tensor]], dict[str, torch.Tensor]]


def copy_side_files(src: Path, dst: Path) -> None:
    """Every file of the model folder `src` but its weights, their index and config.json (tokenizer, chat
    template, generation config, an earlier rewrite's report …): what a rewritten copy keeps as it is."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name != "config.json" \
                and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)


def read_source(src: str | Path, what: str) -> tuple[Path, object, str, object]:
    """(folder, transformers config, HF architecture, registered family) of a folder to rewrite; a bad
    folder's error names it as `what` source."""
    from haloquant.families import family_of_architecture
    from haloquant.modelio import check_model_dir, load_config, read_config

    try:
        src = check_model_dir(src)
    except HaloquantError as e:
        raise HaloquantError(str(e).replace("model.path:", f"{what} source:", 1)) from None
    arch = (read_config(src).get("architectures") or [None])[0]
    return src, load_config(src), arch, family_of_architecture(arch)


def safetensors_shards(src: Path, what: str) -> list[Path]:
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise HaloquantError(f"{what}: {src} holds no *.safetensors weights ({what} reads safetensors shards)")
    return shards


def tensor_locations(shards: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for s in shards:
        with safe_open(str(s), "pt") as f:
            where.update({k: s for k in f.keys()})
    return where


def rewrite_folder(src: Path, out: Path, transform: Transform, config: dict, report: dict, report_name: str,
                   what: str) -> None:
    """Write `transform` of every tensor of `src` (safetensors shards) to `out`, with `config` as its
    config.json and `report` as `report_name`; the other files of the folder are copied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = safetensors_shards(src, what)
    where = tensor_locations(shards)

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), "pt") as f:
            return f.get_tensor(name)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for s in shards:
        tensors = {}
        with safe_open(str(s), "pt") as f:
            for name in f.keys():
                tensors.update({k: v.contiguous() for k, v in transform(name, f.get_tensor(name), read).items()})
        save_file(tensors, str(tmp / s.name), metadata={"format": "pt"})
        weight_map.update({k: s.name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    copy_side_files(src, tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / report_name).write_text(json.dumps(report, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
