"""Issue 16 (6): the default pipeline with and without quantize's two corrections, on any model.

    python bench/default_corrections.py --model /work/models/real/smollm2-135m --out /tmp/dc-smollm2
    python bench/default_corrections.py --model ../shared/models/ref-llama-a --set quantize.method=gptq

The repository's params.yaml with model.path (and --set KEY=VALUE items) changed: calibrate,
sensitivity, allocate and scale_fold run once; quantize and export_gguf run once per variant —
`neither` (correct_row_scales and correct_input_scales false), `both` (true), and, with
--variants, each alone. Every GGUF is scored by llama.cpp (WikiText-2 test, ctx 512, the first
--chunks chunks) with KL from the model's F16 file, and each variant against `neither` with a 95 %
paired bootstrap over chunks. The files are the same size (only fp16 scale fields and float norm
weights change); quantize's seconds say what the corrections cost. Stage outputs and scores are
kept in --out, so a second call reuses them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from haloquant.artifacts import read_json, write_json
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.schemas.params import load_params
from haloquant.textdata import read_text

from common import EVAL_TEXT, REPO, model_add_bos, repo_params  # noqa: E402  (bench/ is on sys.path when run as a script)
from kquant_presets import build  # noqa: E402
from low_bit import versus  # noqa: E402
from paired_ppl import cached_score  # noqa: E402
from real_models import f16_reference  # noqa: E402

VARIANTS = {  # name → (correct_row_scales, correct_input_scales)
    "neither": (False, False),
    "correct_row_scales": (True, False),
    "correct_input_scales": (False, True),
    "both": (True, True),
}
SHARED = ("calibrate", "sensitivity", "allocate", "scale_fold")


def params_for(model: Path, sets: list[str], out: Path):
    """The repository's params.yaml with model.path, model.add_bos and `sets` changed, written to out."""
    params = repo_params(model.resolve(), {"model.add_bos": model_add_bos(model)}, sets)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(out / "params.yaml")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-default-corrections"))
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml values (VALUE read as YAML)")
    ap.add_argument("--variants", nargs="+", default=["neither", "both"], choices=VARIANTS)
    args = ap.parse_args()
    from haloquant.tasks import STAGES

    p = params_for(args.model, args.set, args.out)
    stages = {s.name: s for s in STAGES}
    seconds = {}
    for name in SHARED:
        done = args.out / name / ".done"
        if not done.is_file():
            t = time.perf_counter()
            stages[name].run(p, args.out)
            done.write_text(f"{time.perf_counter() - t:.1f}")
        seconds[name] = float(done.read_text())
    text = read_text(EVAL_TEXT, "eval")
    infos = quantizable_tensors(load_model(p.model.path, "cpu"))
    f16 = args.out / "F16" / "gguf" / "model.gguf"
    if not f16.is_file():
        f16, _ = build(p.model, infos, {t.gguf_name: "F16" for t in infos}, "rtn", args.out / "calibrate",
                       args.out / "F16")
    ref, f16_logprobs = f16_reference(f16, text, args.chunks, f16.parent / f"logprobs-{args.chunks}.npy")
    print(f"F16: {f16.stat().st_size:,} bytes, ppl {ref['ppl']:.3f}; shared stages (s): {seconds}", flush=True)

    scores = {}
    for name in args.variants:
        d = args.out / name
        gguf, timing = d / "export_gguf" / "model.gguf", d / "quantize_s.json"
        if not timing.is_file():  # written once the variant's GGUF is
            row, inp = VARIANTS[name]
            q = p.model_copy(update={"quantize": p.quantize.model_copy(
                update={"correct_row_scales": row, "correct_input_scales": inp})})
            for sub in ("calibrate", "sensitivity", "allocate", "scale_fold"):  # the shared stages' outputs
                if not (d / sub).exists():
                    d.mkdir(parents=True, exist_ok=True)
                    (d / sub).symlink_to((args.out / sub).resolve())
            t = time.perf_counter()
            stages["quantize"].run(q, d)
            quantize_s = time.perf_counter() - t
            stages["export_gguf"].run(q, d)
            write_json(timing, {"quantize_s": quantize_s})
        scores[name] = cached_score(gguf, text, args.chunks, f16_logprobs) | read_json(timing)
        print(json.dumps({k: v for k, v in scores[name].items() if not k.startswith("chunk_")}), flush=True)

    base = scores.get("neither")
    lines = [f"{args.model.name}: params.yaml with model.path" + (f" and {' '.join(args.set)}" if args.set else "")
             + f"; llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; F16 {ref['ppl']:.3f}; "
             "KL from the F16 file; Δ against `neither`, 95 % paired bootstrap over chunks", "",
             "| corrections | file bytes | ppl | Δ ppl (95 %) | KL | Δ KL (95 %) | quantize s |",
             "|---|---|---|---|---|---|---|"]
    for name, s in scores.items():
        dp = dk = ""
        if base is not None and name != "neither":
            v = versus(s, base)
            dp = f"{100 * v['ppl_rel']:+.2f} % ({100 * v['ppl_lo']:+.2f} … {100 * v['ppl_hi']:+.2f})"
            dk = f"{100 * v['kl_rel']:+.1f} % ({100 * v['kl_lo']:+.1f} … {100 * v['kl_hi']:+.1f})"
        lines.append(f"| {name} | {s['bytes']:,} | {s['ppl']:.3f} | {dp} | {s['kl']:.5f} | {dk} | {s['quantize_s']:.0f} |")
    (args.out / "default_corrections.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
