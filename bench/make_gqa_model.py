"""A Llama model of a shape no allocator policy was trained on, for issue 6's zero-shot test.

    python bench/make_gqa_model.py prepare --out .device/gqa      # here: corpus tokens + config
    python bench/make_gqa_model.py train --out .device/gqa        # on a GPU (device tool) or CPU
    python bench/make_gqa_model.py finish --out .device/gqa --weights DIR --dest /tmp/ref-llama-gqa

Shape: 10 layers (ref-llama-tiny has 4, ref-llama-a 8), hidden 512, 8 query heads sharing 2 KV
heads (GQA 4:1; tiny is 2:1, a has none), FFN 1024, tied embeddings, the reference models'
8192-token tokenizer. Trained briefly from scratch on the Python 3.11 standard library's source
(close to the reference models' python3.11-doc corpus) plus WikiText-2 validation; WikiText-2 test
is never trained on. Training is seeded; `train` needs only torch + transformers, so it runs on
the device machine's own image.
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
SHAPE = dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1024, head_dim=64, vocab_size=8192, max_position_embeddings=1024,
             tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5, rope_theta=10000.0)


def prepare(out: Path, stdlib: Path, max_tokens: int) -> None:
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
    cfg = LlamaConfig(**SHAPE).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"{len(ids[:max_tokens]):,} tokens, config → {out}")


def train(out: Path, steps: int, batch: int, seq: int, lr: float, seed: int, weights: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.from_numpy(np.load(out / "tokens.npy").astype(np.int64))
    model = LlamaForCausalLM(LlamaConfig(**json.loads((out / "config.json").read_text()))).to(dev)
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
    sd = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}  # tied: the embedding is the head
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


def finish(out: Path, weights: Path, dest: Path) -> None:
    """Assemble the HF folder: config written here (this transformers), weights from `train`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "config.json", dest / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_FROM / f, dest / f)
    for f in weights.iterdir():
        shutil.copy(f, dest / f.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "train", "finish"])
    ap.add_argument("--out", type=Path, default=REPO / ".device/gqa")
    ap.add_argument("--stdlib", type=Path, default=Path("/usr/lib/python3.11"))
    ap.add_argument("--max-tokens", type=int, default=12_000_000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--dest", type=Path, default=Path("/tmp/ref-llama-gqa"))
    a = ap.parse_args()
    if a.what == "prepare":
        prepare(a.out, a.stdlib, a.max_tokens)
    elif a.what == "train":
        train(a.out, a.steps, a.batch, a.seq, a.lr, a.seed, a.weights)
    else:
        finish(a.out, a.weights, a.dest)


if __name__ == "__main__":
    main()
