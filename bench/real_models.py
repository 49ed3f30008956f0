"""Issue 13's bench: real checkpoints of other families and widths, at llama.cpp's own preset sizes.

    python ../shared/models/fetch_real.py /work/models/real          # once (a separate venv: see its doc)
    python bench/real_models.py --model /work/models/real/smollm2-135m --chunks 100
    python bench/real_models.py --model /work/models/real/qwen2.5-coder-0.5b --chunks 100

For the model: the F16 GGUF's llama.cpp perplexity; then for each preset (Q3_K_M, Q4_K_M by
default) llama.cpp's type map and file size for *this* model (llama_model_quantize on the F16
file: at widths that are not a multiple of 256 it falls back to block-32 types), that map
quantized by llama.cpp's quantizer with the calibration imatrix ("llama.cpp+imatrix", what
llama-quantize --imatrix writes), and haloquant at exactly that file's tensor bytes (--metric
sensitivity, auto by default as in params.yaml, with the GPTQ quantizer → MILP → GPTQ, llama.cpp's fallback types among the
candidates). Every file is scored by llama.cpp: WikiText-2 test, ctx 512, the first --chunks
chunks; perplexity, the 95 % paired interval of haloquant vs llama.cpp+imatrix, and KL from the
F16 file. Then a chat completion through llama-cpp-python with the file's own chat template, and
(--default-pipeline) `haloquant run` with the default params.yaml, only model.path changed.
With --autoround, AutoRound's GGUF of each preset (bench/autoround_gguf.py: its default 200
iterations, the same calibration text; at these widths it falls back to Q5_0/Q8_0 where a k-quant
does not fit, so its file is not the preset's size) and haloquant at exactly that file's tensor
bytes, paired against each other and against llama.cpp+imatrix.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from haloquant.llamacpp import llama_cpp_perplexity, scored_slice
from haloquant.modelio import load_model, quantizable_tensors
from haloquant.presets import preset_type_map, tensor_data_bytes
from haloquant.schemas.params import SensitivitySpec
from haloquant.tasks.sensitivity import score_sensitivity

from autoround_gguf import autoround_gguf  # noqa: E402
from common import REPO, journaled, plain, setup  # noqa: E402  (bench/ is on sys.path when run as a script)
from kquant_presets import KQUANTS, build, build_mixed  # noqa: E402
from paired_ppl import TOKENS_PER_CHUNK, paired, paired_ratio  # noqa: E402

PRESETS = ["Q3_K_M", "Q4_K_M"]
PROMPT = "What is the capital of France? Answer in one sentence."


def chat(gguf: Path, prompt: str = PROMPT) -> str:
    """A greedy chat completion formatted by the GGUF's own chat template (llama-cpp-python's
    Jinja formatter over tokenizer.chat_template)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=512, verbose=False, seed=0)
    assert llm.metadata.get("tokenizer.chat_template"), "the GGUF carries no chat template"
    out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=48, temperature=0.0)
    return out["choices"][0]["message"]["content"].strip()


def f16_reference(f16: Path, text: str, chunks: int, npy: Path) -> tuple[dict, np.ndarray]:
    """The F16 file's perplexity and its per-token log-probs (the KL reference), kept in `npy`.
    A complete `npy` from an earlier run is reused: the NLL is read from it at llama.cpp's own tokens."""
    meta = npy.with_suffix(".json")
    if npy.is_file() and meta.is_file() and json.loads(meta.read_text())["chunks"] == chunks:
        return json.loads(meta.read_text()), np.load(npy, mmap_mode="r")
    if npy.is_file() and np.load(npy, mmap_mode="r").shape[0] == chunks:
        import llama_cpp

        logprobs = np.load(npy, mmap_mode="r")
        vocab = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
        tokens = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        sl = scored_slice(512)
        nll = [float(-logprobs[c][np.arange(logprobs.shape[1]), tokens[c * 512 + sl.start + 1: c * 512 + sl.stop + 1]]
                     .astype(np.float64).sum()) for c in range(chunks)]
        ref = {"ppl": float(np.exp(sum(nll) / (chunks * logprobs.shape[1]))), "chunks": chunks}
    else:
        ref = llama_cpp_perplexity(f16, text, 512, chunks, keep_logprobs=npy)
        logprobs = ref.pop("logprobs")
        ref = {"ppl": ref["ppl"], "chunks": chunks}
    meta.write_text(json.dumps(ref))
    return ref, logprobs


def default_pipeline(model: Path, out: Path) -> dict:
    """`haloquant run` with the repository's params.yaml, only model.path changed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["path"] = str(model.resolve())
    for section in ("calibration", "validate"):
        params[section]["text"] = str(REPO / params[section]["text"])
    params["allocation"]["policy"] = str(REPO / params["allocation"]["policy"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "haloquant.flows.cli", "run", "--params", str(out / "params.yaml")],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        return {"returncode": r.returncode, "stderr": r.stderr[-2000:]}
    metrics = json.loads((out / "artifacts" / "validate" / "metrics.json").read_text())
    return {"returncode": 0, "seconds": time.perf_counter() - t0, "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--default-pipeline", action="store_true")
    ap.add_argument("--metric", default="auto", help="sensitivity.metric (auto: as the default params.yaml)")
    ap.add_argument("--autoround", action="store_true", help="also AutoRound's GGUF of each preset, and haloquant "
                    "at its bytes")
    args = ap.parse_args()
    out = args.out or Path(f"/tmp/haloquant-real-{args.model.name}")
    spec, calib, text = setup(args.model, out)
    infos = quantizable_tensors(load_model(spec.path, "cpu"))
    t0 = time.perf_counter()
    sens = out / "sensitivity"
    if not (sens / "sensitivity.json").is_file():
        sens_spec, quant_spec = SensitivitySpec(formats=KQUANTS + ["Q8_0"], metric=args.metric), plain(method="gptq")
        with journaled(out, "sensitivity", spec.model_dump(mode="json"), sens_spec.model_dump(mode="json"),
                       quant_spec.model_dump(mode="json")):  # an interrupted run resumes here
            score_sensitivity(spec, sens_spec, quant_spec, calib, sens)
    metric = json.loads((sens / "sensitivity.json").read_text())["metric"]
    print(f"sensitivity ({metric}, GPTQ quantizer, fallbacks where needed): {time.perf_counter() - t0:.0f} s",
          flush=True)

    f16 = out / "F16" / "gguf" / "model.gguf"
    if not f16.is_file():
        f16, _ = build(spec, infos, {t.gguf_name: "F16" for t in infos}, "rtn", calib, out / "F16")
    ref, f16_logprobs = f16_reference(f16, text, args.chunks, out / "f16_logprobs.npy")
    print(f"F16: {f16.stat().st_size:,} bytes, ppl {ref['ppl']:.4f}", flush=True)
    result = {"model": args.model.name, "chunks": args.chunks, "metric": metric,
              "f16": {"bytes": f16.stat().st_size, "ppl": ref["ppl"]}, "rows": []}

    def scored(path: Path) -> dict:
        """llama.cpp's perplexity and KL of one file, cached beside it (a rerun resumes where it stopped)."""
        cache = path.with_name(f"{path.stem}.score-{args.chunks}.json")
        if cache.is_file() and json.loads(cache.read_text())["bytes"] == path.stat().st_size:
            return json.loads(cache.read_text())
        r = llama_cpp_perplexity(path, text, 512, args.chunks, reference=f16_logprobs)
        row = {"bytes": path.stat().st_size, "ppl": r["ppl"], "kl": r["kl"], "chunk_nll": r["chunk_nll"],
               "chunk_kl": r["chunk_kl"]}
        cache.write_text(json.dumps(row))
        return row

    for preset in args.presets:
        d = out / preset
        d.mkdir(parents=True, exist_ok=True)
        lc_file = d / "llama.cpp.gguf"
        type_map = preset_type_map(f16, preset, lc_file)
        imatrix, mixed = d / "llamacpp" / "gguf" / "model.gguf", d / "mixed" / "gguf" / "model.gguf"
        if not imatrix.is_file():  # a file exists only once written whole: a rerun resumes here
            build(spec, infos, type_map, "llamacpp", calib, d / "llamacpp")
        if not mixed.is_file():
            build_mixed(spec, sens, tensor_data_bytes(lc_file), calib, d / "mixed")
        row = {"preset": preset, "types": dict(sorted({v: list(type_map.values()).count(v)
                                                       for v in set(type_map.values())}.items())),
               "llama.cpp+imatrix": scored(imatrix), "haloquant": scored(mixed)}
        h, i = row["haloquant"], row["llama.cpp+imatrix"]
        row["ppl_vs_imatrix"] = paired(np.array(h["chunk_nll"]), np.array(i["chunk_nll"]), TOKENS_PER_CHUNK)
        row["kl_vs_imatrix"] = paired_ratio(np.array(h["chunk_kl"]), np.array(i["chunk_kl"]))
        if args.autoround:
            ar_file, ar_seconds = autoround_gguf(spec.path, preset.lower(), d / "autoround")
            same = d / "mixed-autoround" / "gguf" / "model.gguf"
            if not same.is_file():
                build_mixed(spec, sens, tensor_data_bytes(ar_file), calib, d / "mixed-autoround")
            a, s = scored(ar_file), scored(same)
            row["autoround"], row["haloquant at AutoRound's bytes"] = a | {"seconds": ar_seconds}, s
            for key, x, y in (("autoround_vs_imatrix", a, i), ("haloquant_vs_autoround", s, a)):
                row[key] = (paired(np.array(x["chunk_nll"]), np.array(y["chunk_nll"]), TOKENS_PER_CHUNK),
                            paired_ratio(np.array(x["chunk_kl"]), np.array(y["chunk_kl"])))
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("llama.cpp+imatrix", "haloquant")}
                         | {"imatrix": (i["bytes"], i["ppl"], i["kl"]), "haloquant": (h["bytes"], h["ppl"], h["kl"])}),
              flush=True)
    q4 = next((r for r in result["rows"] if r["preset"] == "Q4_K_M"), result["rows"][-1])
    result["chat"] = {"prompt": PROMPT, "haloquant " + q4["preset"]: chat(out / q4["preset"] / "mixed" / "gguf" / "model.gguf"),
                      "F16": chat(f16)}
    if args.default_pipeline:
        result["default_pipeline"] = default_pipeline(args.model, out / "default")
    (out / "results.json").write_text(json.dumps(result, indent=2))

    print(f"\n{args.model.name}: llama.cpp perplexity, WikiText-2 test, ctx 512, first {args.chunks} chunks; "
          f"F16 {ref['ppl']:.3f} ({result['f16']['bytes']:,} bytes)\n")
    print("| preset size | llama.cpp types | llama.cpp+imatrix bytes | ppl | KL | haloquant bytes | ppl | KL "
          "| ppl vs +imatrix (95 %) | KL vs +imatrix (95 %) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        i, h = r["llama.cpp+imatrix"], r["haloquant"]
        (p, plo, phi), (k, klo, khi) = r["ppl_vs_imatrix"], r["kl_vs_imatrix"]
        print(f"| {r['preset']} | {', '.join(f'{t} {n}' for t, n in r['types'].items())} | {i['bytes']:,} | "
              f"{i['ppl']:.3f} | {i['kl']:.4f} | {h['bytes']:,} | {h['ppl']:.3f} | {h['kl']:.4f} | "
              f"{100 * p:+.2f} % ({100 * plo:+.2f} … {100 * phi:+.2f}) | {100 * k:+.1f} % ({100 * klo:+.1f} … "
              f"{100 * khi:+.1f}) |")
    if args.autoround:
        print("\nAutoRound (its GGUF of the preset, default iterations, same calibration text) and haloquant at its "
              "bytes; changes 95 % paired")
        print("| preset | AutoRound bytes | ppl | KL | vs llama.cpp+imatrix | haloquant bytes | ppl | KL | "
              "haloquant vs AutoRound | AutoRound s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            a, h = r["autoround"], r["haloquant at AutoRound's bytes"]
            change = [f"{100 * p:+.2f} % ({100 * plo:+.2f} … {100 * phi:+.2f}), KL {100 * k:+.1f} % "
                      f"({100 * klo:+.1f} … {100 * khi:+.1f})"
                      for (p, plo, phi), (k, klo, khi) in (r["autoround_vs_imatrix"], r["haloquant_vs_autoround"])]
            print(f"| {r['preset']} | {a['bytes']:,} | {a['ppl']:.3f} | {a['kl']:.4f} | {change[0]} | {h['bytes']:,} | "
                  f"{h['ppl']:.3f} | {h['kl']:.4f} | {change[1]} | {a['seconds']:.0f} |")
    print(f"\nChat ({PROMPT!r}, greedy, the file's own template):")
    for k, v in result["chat"].items():
        if k != "prompt":
            print(f"- {k}: {v!r}")
    if args.default_pipeline:
        print(f"\nDefault pipeline (params.yaml, only model.path changed): {json.dumps(result['default_pipeline'])}")


if __name__ == "__main__":
    main()
