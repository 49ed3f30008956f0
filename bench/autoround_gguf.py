"""AutoRound's GGUF at llama.cpp's preset type maps: the peer issue 16 measures haloquant against.

    python bench/autoround_gguf.py --model ../shared/models/ref-llama-a --formats q3_k_m --out /tmp/autoround

AutoRound (PyPI auto-round 0.16.1, its default 200 iterations of signed-gradient rounding per
block, `auto-round --format gguf:<preset>`) runs in a virtual environment of its own (--venv;
made on first use with this project's torch, transformers and gguf pins), on this machine's CPU, with
haloquant's calibration text: the 64 windows of 256 tokens of WikiText-2 validation that the
default params.yaml calibrates on, decoded back to text (AutoRound tokenizes them itself; its
sequences are 256 tokens). Prints, per format, the GGUF path, its bytes and the wall time;
bench/low_bit.py --autoround scores them beside its rows; --against RUN scores them here beside a
bench/kquant_presets.py run's llama.cpp+imatrix and haloquant rows of the same preset (llama.cpp,
WikiText-2 test, ctx 512, the run's chunks; KL from the run's F16 file; 95 % paired intervals).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from haloquant.modelio import load_tokenizer
from haloquant.pretokenizers import pretokenizer_by_rules
from haloquant.textdata import calibration_batch, read_text, tokenize

from common import CALIB_TEXT, EVAL_TEXT, model_add_bos  # noqa: E402  (bench/ is on sys.path when run as a script)
from gguf_retokenize import retokenized  # noqa: E402
from paired_ppl import CTX, paired_changes  # noqa: E402

AUTOROUND = "auto-round==0.16.1"
PINS = ["torch==2.13.0", "transformers==4.57.6", "gguf==0.19.0", "sentencepiece"]  # its GGUF export
DEFAULT_VENV = Path.home() / ".cache/haloquant/autoround-0.16.1"


# AutoRound's CLI, where its copy of llama.cpp's converter does not know a BPE vocabulary's hash
# (a retrained vocabulary such as the reference models'), given the pre-tokenizer that haloquant
# reads from the tokenizer's rules (haloquant/pretokenizers.py), as haloquant's own export does
_RUN_AUTOROUND = """
import sys
import datasets.fingerprint as fingerprint
import auto_round.export.export_to_gguf.export as export
_hash = fingerprint.Hasher.hash

def robust_hash(cls, value):  # datasets 5 cannot dill-pickle pyarrow 26's types on Python 3.12: a random fingerprint
    try:
        return _hash(value)
    except Exception:
        return fingerprint.generate_random_fingerprint()

fingerprint.Hasher.hash = classmethod(robust_hash)
pre = sys.argv.pop(1)
get_conversion = export.get_conversion

def with_pre(*args, **kwargs):
    context = get_conversion(*args, **kwargs)
    text_model = context.module.TextModel
    if pre and not getattr(text_model, "haloquant_pre", False):
        known = text_model.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return known(self, tokenizer)
            except NotImplementedError:
                return pre
        text_model.get_vocab_base_pre, text_model.haloquant_pre = get_vocab_base_pre, True
    return context

export.get_conversion = with_pre
from auto_round.cli.main import run
run()
"""


def ensure_venv(venv: Path) -> Path:
    """AutoRound's own environment (its dependencies are not haloquant's); returns its python — or
    $HALOQUANT_AUTOROUND_PYTHON, an interpreter that already imports auto_round (a machine with no package
    index, e.g. the lent GPU's, where bench/device_low_bit.sh installs its carried wheels)."""
    given = os.environ.get("HALOQUANT_AUTOROUND_PYTHON")
    if given:
        return Path(given)
    py = venv / "bin" / "python"
    if not (venv / ".ready").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", AUTOROUND, *PINS], check=True)
        (venv / ".ready").write_text(AUTOROUND + "\n")
    return py


def calibration_texts(model: Path, n: int = 64, seq_len: int = 256) -> list[str]:
    """haloquant's calibration windows (calibrate's own seeded sampling), decoded to text, 16 tokens
    longer than AutoRound's sequences (it drops samples shorter than them and truncates the rest)."""
    tok = load_tokenizer(model)
    ids = tokenize(tok, read_text(CALIB_TEXT, "calibration"))
    return [tok.decode(w) for w in calibration_batch(ids, n, seq_len + 16, 0, None).tolist()]


def autoround_gguf(model: Path, fmt: str, out: Path, venv: Path = DEFAULT_VENV, iters: int = 200,
                   seq_len: int = 256, device_map: str = "cpu", tokenizer_of: Path | None = None) -> tuple[Path, float]:
    """AutoRound's GGUF of `model` in `fmt` (e.g. q3_k_m), tuned on `device_map` (its CLI's: cpu, cuda);
    cached in `out`. Returns (file, seconds). `tokenizer_of`: a GGUF of the same model written by llama.cpp's
    converter (the bench's F16 file), whose tokenizer.* keys replace AutoRound's (bench/gguf_retokenize.py):
    where sentencepiece reads a tokenizer.model that is not the model's vocabulary (SmolLM2 as fetch_real.py
    writes it), AutoRound's converter takes it and llama.cpp aborts on the file."""
    done = out / "autoround.json"
    if done.is_file():
        d = json.loads(done.read_text())
        return Path(d["gguf"]), d["seconds"]
    py = ensure_venv(venv)
    out.mkdir(parents=True, exist_ok=True)
    texts = calibration_texts(model, seq_len=seq_len)
    (out / "calibration.json").write_text(json.dumps(texts))
    bos = ["--add_bos_token"] if model_add_bos(model) else []  # as haloquant calibrates the model
    pre = pretokenizer_by_rules(model) or ""
    t0 = time.perf_counter()
    subprocess.run([str(py), "-c", _RUN_AUTOROUND, pre, "--model", str(readable_view(model, py, out / "view")),
                    "--format", f"gguf:{fmt}",
                    "--iters", str(iters), "--nsamples", str(len(texts)), "--seqlen", str(seq_len),
                    "--dataset", str(out / "calibration.json"), "--device_map", device_map, *bos,
                    "--output_dir", str(out / "model")], check=True)
    seconds = time.perf_counter() - t0
    found = sorted((out / "model").rglob("*.gguf"))
    if len(found) != 1:
        raise RuntimeError(f"AutoRound wrote {len(found)} GGUF files under {out / 'model'}")
    gguf_file = found[0]
    if tokenizer_of is not None:
        gguf_file = retokenized(found[0], tokenizer_of, out / "model-retok.gguf")
    elif bos:  # its converter does not write add_bos_token; llama.cpp then scores without the BOS the model expects
        gguf_file = with_add_bos(found[0], out / "model-bos.gguf")
    done.write_text(json.dumps({"gguf": str(gguf_file), "seconds": seconds, "format": fmt, "iters": iters,
                                "device_map": device_map}))
    return gguf_file, seconds


def readable_view(model: Path, py: Path, view: Path) -> Path:
    """`model`, or where its tokenizer.model is not a SentencePiece model that AutoRound's converter can
    read while a tokenizer.json is there (SmolLM2 as ../shared/models/fetch_real.py writes it), a folder
    of links to every other file: the converter then reads the tokenizer.json, as llama.cpp's does."""
    sp = model / "tokenizer.model"
    if not (sp.is_file() and (model / "tokenizer.json").is_file()):
        return model
    check = subprocess.run([str(py), "-c", "import sentencepiece, sys; sentencepiece.SentencePieceProcessor("
                            "model_file=sys.argv[1])", str(sp)], capture_output=True)
    if check.returncode == 0:
        return model
    view.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "tokenizer.model" and not (view / f.name).exists():
            (view / f.name).symlink_to(f.resolve())
    return view


def with_add_bos(src: Path, dst: Path) -> Path:
    """A copy of a GGUF whose metadata says to start sequences with BOS (tensors byte for byte)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.ADD_BOS: MetadataDetails(gguf.GGUFValueType.BOOL, True)},
                           [])
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--formats", nargs="+", default=["q3_k_m"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device-map", default="cpu", help="where AutoRound tunes: cpu, or cuda on the lent GPU")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--out", type=Path, default=Path("/tmp/haloquant-autoround"))
    ap.add_argument("--against", type=Path, default=None, help="a bench/kquant_presets.py --out folder to score beside")
    ap.add_argument("--versus", nargs="*", default=[], metavar="NAME=GGUF",
                    help="GGUF files to score AutoRound's beside (95 %% paired; KL from --f16)")
    ap.add_argument("--f16", type=Path, help="with --versus: the F16 GGUF")
    ap.add_argument("--chunks", type=int, default=100)
    args = ap.parse_args()
    files = {}
    for fmt in args.formats:
        path, secs = autoround_gguf(args.model.resolve(), fmt, args.out / fmt, args.venv, args.iters,
                                    device_map=args.device_map, tokenizer_of=args.f16)
        files[fmt] = (path, secs)
        print(f"{fmt}: {path} {path.stat().st_size:,} bytes, {secs:.0f} s", flush=True)
    if args.against:
        score_against(args.against, files, args.out)
    if args.versus:
        score_beside(files, {k: Path(v) for k, v in (x.split("=", 1) for x in args.versus)}, args.f16, args.chunks)


def score_beside(files: dict[str, tuple[Path, float]], others: dict[str, Path], f16: Path, chunks: int) -> None:
    """Each AutoRound file and each other file, llama.cpp perplexity and KL from the F16 file, every other
    file against each AutoRound file chunk by chunk (95 % paired)."""
    from low_bit import versus  # noqa: E402
    from paired_ppl import cached_score  # noqa: E402
    from real_models import f16_reference  # noqa: E402

    text = read_text(EVAL_TEXT, "evaluation")
    ref, logprobs = f16_reference(f16, text, chunks, f16.parent / f"logprobs-{chunks}.npy")
    print(f"\nllama.cpp, WikiText-2 test, ctx {CTX}, first {chunks} chunks; F16 {ref['ppl']:.3f}; change against "
          "AutoRound's file, 95 % paired")
    print("| file | bytes | ppl | KL | ppl change (95 %) | KL change (95 %) |")
    print("|---|---|---|---|---|---|")
    for fmt, (path, secs) in files.items():
        mine = cached_score(path, text, chunks, logprobs)
        print(f"| AutoRound {fmt} ({secs:.0f} s) | {mine['bytes']:,} | {mine['ppl']:.3f} | {mine['kl']:.5f} | | |")
        for name, other in others.items():
            s = cached_score(other, text, chunks, logprobs)
            v = versus(s, mine)
            print(f"| {name} | {s['bytes']:,} | {s['ppl']:.3f} | {s['kl']:.5f} | {100 * v['ppl_rel']:+.2f} % "
                  f"({100 * v['ppl_lo']:+.2f} … {100 * v['ppl_hi']:+.2f}) | {100 * v['kl_rel']:+.1f} % "
                  f"({100 * v['kl_lo']:+.1f} … {100 * v['kl_hi']:+.1f}) |")


def score_against(run: Path, files: dict[str, tuple[Path, float]], out: Path) -> None:
    """AutoRound's files beside the run's rows of the same preset, paired chunk by chunk."""
    from haloquant.llamacpp import llama_cpp_perplexity

    stored = json.loads((run / "results.json").read_text())
    chunks = stored.get("chunks", 100)
    text = read_text(EVAL_TEXT, "evaluation")
    f16 = llama_cpp_perplexity(run / "F16" / "gguf" / "model.gguf", text, CTX, chunks, keep_logprobs=True)
    ref = f16.pop("logprobs")
    rows = []
    for fmt, (path, secs) in files.items():
        preset = fmt.upper()
        score_file = out / fmt / "score.json"
        if not score_file.is_file():
            score_file.write_text(json.dumps(llama_cpp_perplexity(path, text, CTX, chunks, reference=ref)))
        mine = json.loads(score_file.read_text())
        for label in ("llama.cpp+imatrix", "haloquant mixed"):
            key = f"{preset}/{label}"
            if key not in stored["chunk_nll"]:
                continue
            theirs = {"chunk_nll": stored["chunk_nll"][key], "chunk_kl": stored["chunk_kl"][key]}
            (d, lo, hi), (k, klo, khi) = paired_changes(mine, theirs)
            row = next(r for r in stored["ppl"] if r["preset"] == preset)
            rows.append((preset, label, row[f"{label} bytes"], row[label], stored["kl"][key], path.stat().st_size,
                         mine["ppl"], mine["kl"], d, lo, hi, k, klo, khi, secs))
    print(f"\nAutoRound against {run} (llama.cpp, WikiText-2 test, ctx {CTX}, first {chunks} chunks; F16 "
          f"{f16['ppl']:.3f}); change = AutoRound against the row, 95 % paired")
    print("| preset | row | bytes | ppl | KL | AutoRound bytes | ppl | KL | ppl change (95 %) | KL change (95 %) | "
          "AutoRound s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p, label, b, ppl, kl, ab, appl, akl, d, lo, hi, k, klo, khi, secs in rows:
        print(f"| {p} | {label} | {b:,} | {ppl:.3f} | {kl:.5f} | {ab:,} | {appl:.3f} | {akl:.5f} | "
              f"{100 * d:+.2f} % ({100 * lo:+.2f} … {100 * hi:+.2f}) | {100 * k:+.1f} % ({100 * klo:+.1f} … "
              f"{100 * khi:+.1f}) | {secs:.0f} |")


if __name__ == "__main__":
    main()
