"""Issue 16 (3): what the kernel-free residual rotation (haloquant/rotation.py) does at 2–3.5 bits.

    python bench/rotation.py --model ../shared/models/ref-llama-a --presets Q2_K Q3_K_S --out /tmp/haloquant-rotation

A rotation needs an untied head (the final norm's weight folds into it, not into the embedding), so
both arms are untied copies of --model: `untied` (the head a copy of the embedding, nothing else
changed) and `rotated` (the same, rotated: haloquant.rotation.write_rotated). Each arm gets its own
calibration and sensitivity (kl_calibrated, GPTQ quantizer, k-quants + Q8_0), then at each preset's
size — the tensor bytes of llama.cpp's type map for the untied model — haloquant's allocation and
GPTQ (--quantize KEY=VALUE adds QuantizeSpec values to both arms). Scored by llama.cpp
(WikiText-2 test, ctx 512, --chunks chunks), KL from the untied model's F16 file, rotated against
untied with a 95 % paired bootstrap over chunks. llama.cpp+imatrix on the untied model's preset is
a row too. Every file and score is kept in --out (reused by a second call).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from haloquant.artifacts import write_json
from haloquant.llamacpp import llama_cpp_perplexity
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import preset_type_map_dry, tensor_data_bytes
from haloquant.rewrite import copy_side_files
from haloquant.rotation import write_rotated
from haloquant.schemas.params import SensitivitySpec
from haloquant.tasks.sensitivity import score_sensitivity

from common import REPO, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from kquant_presets import build, build_mixed  # noqa: E402
from paired_ppl import TOKENS_PER_CHUNK, cached_score, paired, paired_ratio  # noqa: E402

KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def untied_copy(src: Path, out: Path) -> Path:
    """`src` with its head stored apart from the embedding (same values), float32."""
    if (out / "config.json").is_file():
        return out
    model = load_model(src, "cpu").float()
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_side_files(src, tmp)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared/models/ref-llama-a")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-rotation"))
    ap.add_argument("--presets", nargs="+", default=["Q2_K", "Q3_K_S", "Q3_K_M"])
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize", nargs="*", default=[], metavar="KEY=VALUE", help="QuantizeSpec values, both arms")
    args = ap.parse_args()
    qspec = plain(method="gptq", **{k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in args.quantize)})
    name = args.model.resolve().name
    models = {"untied": untied_copy(args.model, args.out / "models" / f"{name}-untied")}
    rotated = args.out / "models" / f"{name}-rotated"
    t = time.perf_counter()
    if not (rotated / "config.json").is_file():
        write_rotated(models["untied"], rotated, seed=args.seed)
    models["rotated"] = rotated
    print(f"rotation: {time.perf_counter() - t:.1f} s", flush=True)

    arms = {}
    for arm, path in models.items():
        d = args.out / arm
        spec, calib, text = setup(path, d)
        if not (d / "sensitivity" / "sensitivity.json").is_file():
            t = time.perf_counter()
            score_sensitivity(spec, SensitivitySpec(formats=KQUANTS), plain(method="gptq"), calib, d / "sensitivity")
            print(f"{arm}: sensitivity {time.perf_counter() - t:.0f} s", flush=True)
        arms[arm] = (spec, calib, d)
    spec_u, calib_u, d_u = arms["untied"]
    infos = quantizable_tensors(load_model(spec_u.path, "cpu"))
    f16, _ = build(spec_u, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib_u, d_u / "F16")
    ref = llama_cpp_perplexity(f16, text, 512, args.chunks, keep_logprobs=True)
    f16_logprobs = ref.pop("logprobs")
    print(f"untied F16: {f16.stat().st_size:,} bytes, ppl {ref['ppl']:.3f}", flush=True)

    def scored(path: Path) -> dict:
        return cached_score(path, text, args.chunks, f16_logprobs)

    tag = "gptq" + "".join(f"+{i}" for i in args.quantize)
    rows = []
    for preset in args.presets:
        ref_file = d_u / preset / "llama.cpp+imatrix" / "gguf" / "model.gguf"
        if not ref_file.is_file():
            ref_file, _ = build(spec_u, infos, preset_type_map_dry(f16, preset), "llamacpp", calib_u,
                                d_u / preset / "llama.cpp+imatrix")
        total = tensor_data_bytes(ref_file)
        scores = {"llama.cpp+imatrix": scored(ref_file)}
        for arm, (spec, calib, d) in arms.items():
            out = d / preset / tag
            gguf = out / "gguf" / "model.gguf"
            if not gguf.is_file():
                gguf = build_mixed(spec, d / "sensitivity", total, calib, out, qspec)
            scores[arm] = scored(gguf)
        for row, s in scores.items():
            r = {"size": preset, "row": row, "bytes": s["bytes"], "ppl": s["ppl"], "kl": s["kl"]}
            if row == "rotated":
                b = scores["untied"]
                r["vs_untied"] = (*paired(np.array(s["chunk_nll"]), np.array(b["chunk_nll"]), TOKENS_PER_CHUNK),
                                  *paired_ratio(np.array(s["chunk_kl"]), np.array(b["chunk_kl"])))
            rows.append(r)
            print(json.dumps(r), flush=True)
    write_json(args.out / f"rotation_{tag}.json", {"model": str(args.model), "f16_ppl": ref["ppl"], "rows": rows})
    lines = [f"{name}, untied: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; F16 "
             f"{ref['ppl']:.3f}; haloquant rows: allocation + {tag}; Δ rotated against untied, 95 % paired", "",
             "| size | row | file bytes | ppl | KL | Δ ppl (95 %) | Δ KL (95 %) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("vs_untied")
        dp = f"{100 * v[0]:+.2f} % ({100 * v[1]:+.2f} … {100 * v[2]:+.2f})" if v else ""
        dk = f"{100 * v[3]:+.1f} % ({100 * v[4]:+.1f} … {100 * v[5]:+.1f})" if v else ""
        lines.append(f"| {r['size']} | {r['row']} | {r['bytes']:,} | {r['ppl']:.3f} | {r['kl']:.5f} | {dp} | {dk} |")
    (args.out / f"rotation_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
