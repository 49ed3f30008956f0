"""Small Llama models of chosen shapes, briefly trained, for issue 6's SAC allocator: the policy's
training family (`fam-*`) and the zero-shot test model (`gqa`), none of them a reference model.

    python bench/make_models.py prepare --out .device/models --shapes gqa fam-shallow ...  # tokens + configs
    python bench/make_models.py train --out .device/models --shape fam-shallow --weights W  # GPU or CPU
    python bench/make_models.py finish --out .device/models --shape fam-shallow --weights W --dest DIR

Shapes (ref-llama-tiny: 4 layers, hidden 256, 4:2 heads, tied; ref-llama-a: 8 layers, hidden 512,
8:8 heads, tied):
- `gqa` (test model, never trained on): 10 layers, hidden 512, 8 query heads on 2 KV heads, FFN 1024.
- `fam-shallow`: 2 layers, hidden 512, 8:8 heads, FFN 512 — the embedding is 53 % of the weights.
- `fam-mqa`: 8 layers, hidden 256, 4 query heads on one KV head, FFN 512 — embedding 32 %.
- `fam-deep`: 12 layers, hidden 256, 4:4 heads, FFN 512 — embedding 21 %.
- `fam-untied`: 4 layers, hidden 256, 4:4 heads, FFN 1024, a separate output matrix (25 % each).
Widths are multiples of 256, so every k-quant (256-weight blocks) is a candidate for every tensor.
All use the reference models' 8192-token tokenizer and are trained from scratch on the Python 3.11
standard library's source (close to the reference models' python3.11-doc corpus) plus WikiText-2
validation; WikiText-2 test is never trained on. Training is seeded; `train` needs only torch +
transformers, so it runs on the device machine's own image.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FROM = REPO / "data/models/ref-llama-tiny"
COMMON = dict(head_dim=64, vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=0,
              eos_token_id=0, rms_norm_eps=1e-5, rope_theta=10000.0)
SHAPES = {
    "gqa": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1024),
    "fam-shallow": dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                        intermediate_size=512),
    "fam-mqa": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
                    intermediate_size=512),
    "fam-deep": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=512),
    "fam-untied": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=1024, tie_word_embeddings=False),
}


def prepare(out: Path, shapes: list[str], stdlib: Path, max_tokens: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER_FROM)
    texts = [(REPO / "data/wikitext-2-raw/wiki.valid.raw").read_text()]
    texts += [p.read_text(errors="ignore") for p in sorted(stdlib.rglob("*.py")) if "test" not in p.parts]
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t)["input_ids"] + [tok.eos_token_id])
        if len(ids) >= max_tokens:
            break
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "tokens.npy", np.asarray(ids[:max_tokens], dtype=np.uint16))
    for name in shapes:
        cfg = LlamaConfig(**{**COMMON, **SHAPES[name]}).to_dict()
        cfg["architectures"] = ["LlamaForCausalLM"]
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"{len(ids[:max_tokens]):,} tokens, configs of {shapes} → {out}")


def train(out: Path, shape: str, steps: int, batch: int, seq: int, lr: float, seed: int, weights: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.from_numpy(np.load(out / "tokens.npy").astype(np.int64))
    model = LlamaForCausalLM(LlamaConfig(**json.loads((out / shape / "config.json").read_text()))).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:  # linear warm-up, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen)
        x = torch.stack([tokens[s:s + seq] for s in starts]).to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    weights.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    sd = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}  # tied: the embedding is the head
    shards, cur, size = [], {}, 0
    for k, v in sd.items():  # ≤ 15 MB per file (the device tool returns files up to 16 MiB)
        if cur and size + v.numel() * 2 > 15_000_000:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * 2
    shards.append(cur)
    index = {"metadata": {"total_size": sum(v.numel() * 2 for v in sd.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(weights / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in shard})
    (weights / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (weights / "train_card.json").write_text(json.dumps({"steps": steps, "batch": batch, "seq_len": seq, "lr": lr,
                                                         "seed": seed, "tokens_seen": steps * batch * seq,
                                                         "final_loss": loss.item(), "seconds": time.time() - t0}))


def finish(out: Path, shape: str, weights: Path, dest: Path) -> None:
    """Assemble the HF folder: config written here (this transformers), weights from `train`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / shape / "config.json", dest / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_FROM / f, dest / f)
    for f in weights.iterdir():
        shutil.copy(f, dest / f.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "train", "finish"])
    ap.add_argument("--out", type=Path, default=REPO / ".device/models")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--shape", choices=list(SHAPES), default="gqa")
    ap.add_argument("--stdlib", type=Path, default=Path("/usr/lib/python3.11"))
    ap.add_argument("--max-tokens", type=int, default=12_000_000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--dest", type=Path)
    a = ap.parse_args()
    if a.what == "prepare":
        prepare(a.out, a.shapes, a.stdlib, a.max_tokens)
    elif a.what == "train":
        train(a.out, a.shape, a.steps, a.batch, a.seq, a.lr, a.seed, a.weights)
    else:
        finish(a.out, a.shape, a.weights, a.dest or Path(f"/work/models/ref-llama-{a.shape}"))


if __name__ == "__main__":
    main()
