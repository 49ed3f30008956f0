"""A Hugging Face folder from a GGUF, dequantized to float32 by transformers' GGUF loader — the steps of
../shared/models/fetch_real.py after its download, for a machine with no package index (bench/device_low_bit.sh).

    python bench/gguf_to_hf.py MODEL.gguf OUT_DIR [--check sums.json]   # --sums writes sums.json from a folder

`--check` compares each tensor's float64 sum and sum of squares with the ones written here from the local copy,
so the rebuilt model is known to be the same weights."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def tensor_sums(folder: Path) -> dict[str, list[float]]:
    from safetensors import safe_open

    sums = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).double()
                sums[name] = [t.sum().item(), (t * t).sum().item()]
    return sums


def rebuild(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    target.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(target)
    tok.save_pretrained(target)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path, nargs="?")
    ap.add_argument("out", type=Path)
    ap.add_argument("--check", type=Path, help="sums.json written by --sums from the reference copy")
    ap.add_argument("--sums", action="store_true", help="print the folder OUT's per-tensor sums (JSON, for --check)")
    args = ap.parse_args()
    if args.sums:
        json.dump(tensor_sums(args.out), sys.stdout)
        return 0
    rebuild(args.gguf, args.out)
    if args.check:
        want, got = json.loads(args.check.read_text()), tensor_sums(args.out)
        bad = [n for n in want
               if n not in got or any(abs(a - b) > 1e-9 * max(1.0, abs(a)) for a, b in zip(want[n], got[n]))]
        if bad or set(got) != set(want):
            print(f"rebuilt weights differ from the reference copy: {bad[:5]} (+{max(0, len(bad) - 5)}), "
                  f"names {sorted(set(got) ^ set(want))[:5]}")
            return 2
        print(f"rebuilt {len(got)} tensors, identical sums to the reference copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
