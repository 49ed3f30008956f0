"""Issue 14's scale bench: the default pipeline on a large random model, per-stage time and memory.

    python bench/scale.py --layers 1                      # Llama-3-8B widths, one decoder layer
    python bench/scale.py --stream true                   # all 32 layers, one block on the GPU at a time
    python bench/scale.py --hidden 8192 --ffn 28672 --heads 64 --layers 1 --stream true   # a 70B layer
    python bench/scale.py --hidden 2048 --ffn 5632 --layers 22 --heads 32 --kv-heads 4 --vocab 32000
    python bench/scale.py --model ../shared/models/ref-llama-a --add-bos true --runtimes llama_cpp onnxruntime

Makes a Llama model of the given widths (random weights in bf16, the reference tokenizer of
data/models/ref-llama-tiny with the vocabulary padded to --vocab), writes the repository's
params.yaml with only model.path, model.device and validate.runtimes changed, and runs the main
stages in order in this process: for each, wall time, peak GPU memory (torch's allocator), the
process's peak RSS so far, and the stage's peak anonymous RSS (sampled: RSS also counts the pages of
the checkpoint, which transformers maps from its shards and the kernel may drop again). --stages
limits the run (e.g. a machine without llama.cpp's converter
stops before export_gguf). Where llama-cpp-python is absent the per-block llama.cpp candidate of
the encoders is switched off (said in the output): the numbers are then a lower bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_model(out: Path, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    src = REPO / "data/models/ref-llama-tiny"
    cfg = json.loads((src / "config.json").read_text())
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                         bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    del model
    return out


def disable_llama_cpp_candidate(always: bool = False) -> bool:
    """True if the encoders' llama.cpp candidate was switched off: asked for, or llama-cpp-python
    is absent."""
    try:
        import llama_cpp  # noqa: F401
        if not always:
            return False
        raise ImportError
    except ImportError:
        from haloquant import formats

        for k, f in formats.FORMATS.items():
            formats.FORMATS[k] = dataclasses.replace(f, llama_cpp_candidate=False)
        return True


class AnonPeak:
    """The largest RssAnon of this process since `reset`, sampled every 50 ms by a daemon thread
    (the kernel keeps a peak of the whole RSS only, which includes mapped checkpoint pages)."""

    def __init__(self):
        self.peak = 0
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def reset(self) -> None:
        self.peak = self.now()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--stages", nargs="+", default=None, help="default: every main stage")
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-scale"))
    ap.add_argument("--stream", choices=["auto", "true", "false"], default="auto",
                    help="model.stream (auto: as params.yaml; true: one decoder block on the device at a time)")
    ap.add_argument("--model", type=Path, default=None,
                    help="an existing Hugging Face folder instead of a made model (the widths are then ignored)")
    ap.add_argument("--runtimes", nargs="*", default=[],
                    help="validate.runtimes (default none: torch only; e.g. llama_cpp onnxruntime)")
    ap.add_argument("--add-bos", choices=["null", "true", "false"], default="null",
                    help="model.add_bos (the ref-llama models were trained with BOS: true)")
    ap.add_argument("--metric", default=None, help="sensitivity.metric (default: params.yaml's)")
    ap.add_argument("--profile", action="store_true",
                    help="each stage under cProfile: its 30 costliest calls (cumulative) to OUT/profile_<stage>.txt")
    ap.add_argument("--no-llama-cpp-candidate", action="store_true",
                    help="switch off the encoders' per-block comparison with llama.cpp's quantizer (every stage)")
    ap.add_argument("--sensitivity-own-fit", action="store_true",
                    help="sensitivity.llama_cpp_candidate: false (quantize still keeps the better block)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="params.yaml values, e.g. quantize.correct_input_scales=true (VALUE read as YAML)")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)  # the child that makes the model
    ap.add_argument("--resume", action="store_true",
                    help="keep --out: reuse its model and skip the stages an earlier run finished (their rows are reprinted)")
    args = ap.parse_args()

    if args.make_only:
        make_model(args.out / "model", args.hidden, args.ffn, args.layers, args.heads, args.kv_heads, args.vocab)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for name in ("haloquant.tasks.sensitivity", "haloquant.tasks.quantize"):  # each tensor's seconds: per-block and head costs apart
        logging.getLogger(name).setLevel(logging.DEBUG)
    no_lc = disable_llama_cpp_candidate(args.no_llama_cpp_candidate)
    from tasks import STAGES
    from tasks.runner import artifacts_root, timed_line
    from haloquant.schemas.params import load_params

    rows_file = args.out / "rows.jsonl"
    if not args.resume:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = args.model.resolve() if args.model else args.out / "model"
    if not (model / "config.json").is_file():  # in a child process: its memory is not the stages' peak RSS
        subprocess.run([sys.executable, __file__, "--make-only", *sys.argv[1:]], check=True)
    made = time.perf_counter() - t0
    done = {r["stage"]: r for r in map(json.loads, rows_file.read_text().splitlines())} if rows_file.is_file() else {}
    from common import repo_params  # bench/ is on sys.path when run as a script

    params = repo_params(model, {
        "model.device": "cuda" if torch.cuda.is_available() else "cpu",
        "model.stream": {"auto": "auto", "true": True, "false": False}[args.stream],
        "model.add_bos": {"null": None, "true": True, "false": False}[args.add_bos],
        "validate.runtimes": args.runtimes,
        **({"sensitivity.metric": args.metric} if args.metric else {}),
        **({"sensitivity.llama_cpp_candidate": False} if args.sensitivity_own_fit else {})}, args.set)
    (args.out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = load_params(args.out / "params.yaml")
    root = artifacts_root(args.out / "params.yaml")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    shape = (f"{model}" if args.model else
             f"hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
             f"vocab {args.vocab}, bf16 ({made:.0f} s to make)")
    print(f"model: {shape}; model.stream {args.stream}; validate.runtimes {args.runtimes}; GPU {gpu}; "
          f"torch {torch.__version__}" + (f"; set {' '.join(args.set)}" if args.set else "")
          + ("; no llama.cpp block candidate (switched off, or llama-cpp-python absent)" if no_lc else
             "; encoders compare each block with llama.cpp's quantizer"), flush=True)
    print("\n| stage | seconds | peak GPU GiB | peak RSS GiB (process, so far) | peak anonymous RSS GiB (stage) | summary |"
          "\n|---|---|---|---|---|---|", flush=True)
    anon = AnonPeak()
    total = 0.0
    for stage in STAGES:
        if args.stages and stage.name not in args.stages:
            continue
        if stage.name in done:
            r = done[stage.name]
            total += r["seconds"]
            print(f"| {stage.name} | {r['seconds']:.1f} | {r['gpu']:.1f} | {r['rss']:.1f} | {r.get('anon', float('nan')):.1f} | "
                  f"{r['line']} (earlier call) |")
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        anon.reset()
        t = time.perf_counter()
        try:
            if args.profile:
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                _, line = prof.runcall(timed_line, stage, p, root)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
                (args.out / f"profile_{stage.name}.txt").write_text(text.getvalue())
            else:
                _, line = timed_line(stage, p, root)
        except Exception as e:  # a bench: say what stopped it and stop
            print(f"| {stage.name} | — | — | — | — | not run: {type(e).__name__}: {str(e)[:200]} |", flush=True)
            break
        s = time.perf_counter() - t
        total += s
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        own = max(anon.peak, anon.now()) / 2**30
        print(f"| {stage.name} | {s:.1f} | {peak:.1f} | {rss:.1f} | {own:.1f} | {line} |", flush=True)
        with rows_file.open("a") as f:
            f.write(json.dumps({"stage": stage.name, "seconds": s, "gpu": peak, "rss": rss, "anon": own,
                                "line": line}) + "\n")
    print(f"\nstages run: {total:.0f} s")


if __name__ == "__main__":
    main()
