"""End-to-end tuning (haloquant/end_to_end.py) on top of a bench row: what it adds, at what settings.

    python bench/end_to_end.py tune --model ../shared/models/ref-llama-a --row RUN/Q3_K_S/tuned-200-corrected \\
        --calib RUN/calibrate --out /tmp/e2e --settings '{"iters": 200}' '{"iters": 200, "lr": 0.00125}'
    python bench/end_to_end.py score --model ../shared/models/ref-llama-a --row RUN/Q3_K_S/tuned-200-corrected \\
        --out /tmp/e2e --f16 RUN/F16/gguf/model.gguf --versus AutoRound=/path/autoround.gguf

`tune` applies the quantize stage's last step to the row's quantize artifact (its folds, its codes after
GPTQ, block tuning and statistics correction: exactly what `quantize` hands end-to-end tuning when
`quantize.end_to_end.iters` is set) once per setting, and stores each result as a delta from the row's
bytes (XOR of the block bytes, zlib-compressed, plus the float tensors: a few MB where the tensors are
tens), so a GPU machine's results come back whole. `score` rebuilds each variant's artifact, exports
the GGUF and scores it (where kept: a variant that did not lower the held-out KL is the row) with
llama.cpp (WikiText-2 test, ctx 512, first N chunks, KL from the F16 file),
against the row and the --versus files, 95 % paired.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from haloquant.calibstats import CalibrationStats
from haloquant.end_to_end import EndToEndSettings, tune_end_to_end
from haloquant.folding import load_folds
from haloquant.formats import get_format
from haloquant.modelio import load_model
from haloquant.quantized import MANIFEST_FILE, TENSORS_FILE, read_quantized
from haloquant.streaming import compute_device

from common import EVAL_TEXT, model_add_bos  # noqa: E402  (bench/ is on sys.path when run as a script)


def tag(settings: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(settings.items())) or "defaults"


def tune(model_path: Path, row: Path, calib: Path, out: Path, all_settings: list[dict], device: str) -> None:
    manifest, tensors = read_quantized(row / "quantize")
    encoded = {q.name: tensors[q.name] for q in manifest.quantized}
    formats = {q.name: get_format(q.format) for q in manifest.quantized}
    floats = {n: torch.from_numpy(tensors[n].copy()) for n in manifest.float_tensors}
    for settings in all_settings:
        dst = out / tag(settings)
        if (dst / "report.json").is_file():
            continue
        model = load_model(model_path, device)  # fresh: tuning leaves the model on the device, not changed
        load_folds(model, row / "scale_fold")
        ids = CalibrationStats(calib).tensor("calibration_ids")
        t0 = time.perf_counter()
        tuned, fl, report = tune_end_to_end(model, ids, encoded, formats, floats, EndToEndSettings(**settings),
                                            compute_device(model), log=print)
        report["wall_s"] = time.perf_counter() - t0
        dst.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(dst / "delta.npz", **{f"q:{n}": np.bitwise_xor(tuned[n].view(np.uint8),
                                                                           encoded[n].view(np.uint8))
                                                   for n in encoded},
                            **{f"f:{n}": v.float().numpy() for n, v in fl.items()})
        (dst / "report.json").write_text(json.dumps({"settings": settings, **report,
                                                     "device": str(compute_device(model))}, indent=1))
        print(tag(settings), json.dumps(report), flush=True)


def rebuild(row: Path, variant: Path) -> Path:
    """The variant's quantize artifact from the row's and its delta; returns its folder."""
    manifest, tensors = read_quantized(row / "quantize")
    delta = np.load(variant / "delta.npz")
    out = {n: np.bitwise_xor(tensors[n].view(np.uint8), delta[f"q:{n}"]).view(tensors[n].dtype)
           for n in (q.name for q in manifest.quantized)}
    out.update({n: delta[f"f:{n}"] for n in manifest.float_tensors})
    (variant / "quantize").mkdir(exist_ok=True)
    save_file(out, str(variant / "quantize" / TENSORS_FILE))
    shutil.copy(row / "quantize" / MANIFEST_FILE, variant / "quantize" / MANIFEST_FILE)
    return variant / "quantize"


def score(model_path: Path, row: Path, out: Path, f16: Path, versus_files: dict[str, Path], chunks: int) -> None:
    from haloquant.schemas.params import GGUFSpec, ModelSpec
    from haloquant.tasks.export_gguf import export_gguf
    from haloquant.textdata import read_text

    from low_bit import versus  # noqa: E402
    from paired_ppl import CTX, cached_score  # noqa: E402
    from real_models import f16_reference  # noqa: E402

    text = read_text(EVAL_TEXT, "evaluation")
    ref, f16_logprobs = f16_reference(f16, text, chunks, f16.parent / f"logprobs-{chunks}.npy")
    start = cached_score(row / "gguf" / "model.gguf", text, chunks, f16_logprobs)
    others = {name: cached_score(p, text, chunks, f16_logprobs) for name, p in versus_files.items()}
    lines = [f"{row} + end-to-end tuning: llama.cpp, WikiText-2 test, ctx {CTX}, first {chunks} chunks; F16 "
             f"{ref['ppl']:.3f}; 95 % paired", "",
             "| settings | held-out KL before → after | kept | codes changed | tuning s | ppl | KL | vs the row | "
             + " | ".join(f"vs {n}" for n in others) + " |", "|---" * (8 + len(others)) + "|",
             f"| (the row) | | | | | {start['ppl']:.3f} | {start['kl']:.5f} | | "
             + " | ".join(_change(start, o, versus) for o in others.values()) + " |"]
    for variant in sorted(p.parent for p in out.glob("*/report.json")):
        report = json.loads((variant / "report.json").read_text())
        if not report["kept"]:  # the row's own bytes: nothing to score
            lines.append(f"| {json.dumps(report['settings'])} | {report['kl_before']:.5f} → "
                         f"{report['kl_after']:.5f} | False | 0 | {report['wall_s']:.0f} ({report['device']}) | = the row | | | "
                         + " | ".join("" for _ in others) + " |")
            continue
        gguf_file = variant / "gguf" / "model.gguf"
        if not gguf_file.is_file():
            spec = ModelSpec(path=model_path, add_bos=model_add_bos(model_path))
            export_gguf(spec, GGUFSpec(), rebuild(row, variant), variant / "gguf")
        s = cached_score(gguf_file, text, chunks, f16_logprobs)
        lines.append(f"| {json.dumps(report['settings'])} | {report['kl_before']:.5f} → {report['kl_after']:.5f} | "
                     f"{report['kept']} | {report['codes_changed']:,} of {report['weights']:,} | "
                     f"{report['wall_s']:.0f} ({report['device']}) | {s['ppl']:.3f} | {s['kl']:.5f} | "
                     f"{_change(s, start, versus)} | " + " | ".join(_change(s, o, versus) for o in others.values())
                     + " |")
    (out / "end_to_end.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _change(s: dict, ref: dict, versus) -> str:
    v = versus(s, ref)
    return (f"{100 * v['ppl_rel']:+.2f} % ({100 * v['ppl_lo']:+.2f} … {100 * v['ppl_hi']:+.2f}), "
            f"KL {100 * v['kl_rel']:+.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["tune", "score"])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--row", type=Path, required=True, help="a bench row: quantize/, scale_fold/, gguf/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calib", type=Path, help="tune: the calibrate stage's folder the row was made with")
    ap.add_argument("--settings", nargs="+", type=json.loads, default=[{"iters": 200}],
                    help="tune: EndToEndSettings fields, one JSON object per variant")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--f16", type=Path, help="score: the F16 GGUF KL is measured from")
    ap.add_argument("--versus", nargs="*", default=[], help="score: NAME=GGUF files to compare with")
    ap.add_argument("--chunks", type=int, default=100)
    args = ap.parse_args()
    if args.phase == "tune":
        tune(args.model, args.row, args.calib, args.out, args.settings, args.device)
    else:
        score(args.model, args.row, args.out, args.f16,
              {k: Path(v) for k, v in (s.split("=", 1) for s in args.versus)}, args.chunks)


if __name__ == "__main__":
    main()
