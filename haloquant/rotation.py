"""Rotation preconditioning, kernel-free (QuaRot / SpinQuant's residual rotation; the model
invariances of InvarExplore).

An RMSNorm commutes with an orthogonal change of basis once its weight is folded into the linears
that read it: RMSNorm(x Q) = RMSNorm(x) Q, since ‖x Q‖ = ‖x‖. So with every pre-norm weight folded
into its readers (q/k/v and gate/up; the final norm into the head) the residual stream can be
carried in any orthonormal basis Q: embedding rows E Q, every linear that reads the stream W Q, every
linear that writes it (o, down) Qᵀ W and its bias b Q. Inside attention each kv head's v rows and
the o columns that read them take a per-head orthogonal H (attention mixes tokens, not channels).
The rotated model computes the same function; the quantizer sees weights whose outlier channels
are spread over all channels (incoherence), which block formats encode with less error. All of it
lands in ordinary weights and norm weights of one: unmodified llama.cpp runs the file.

Q is a randomized Hadamard matrix where the width allows (n = 2ᵏ·m: a Sylvester Hadamard of 2ᵏ
Kronecker a random orthogonal m × m, rows signed at random) — any orthogonal Q is exact, the
Hadamard part spreads a channel evenly over 2ᵏ others.

What it costs: a tied head must be untied (the head becomes E·diag(γ_final)·Q, the embedding E·Q),
so the file carries a second vocab × hidden matrix. What it cannot do: families that normalise a
sublayer's output before adding it to the stream (Gemma 2/3's post-norms: nothing after that norm
takes its weight) — `Family.post_norms`; LayerNorm families (mean removal is not rotation-invariant)
are not registered.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from haloquant import HaloquantError
from haloquant.families import family, architecture_of
from haloquant.families.base import head_dim

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random n × n orthogonal matrix (float64): QR of a Gaussian, signs fixed by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


def randomized_hadamard(n: int, seed: int) -> torch.Tensor:
    """An n × n orthogonal matrix (float64): diag(±1) · (H_{2ᵏ}/√2ᵏ ⊗ R_m) for n = 2ᵏ·m, m odd."""
    g = torch.Generator().manual_seed(seed)
    k = (n & -n).bit_length() - 1
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    m = n >> k
    rest = random_orthogonal(m, g) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(h / h.shape[0] ** 0.5, rest)


def check_rotatable(model) -> None:
    fam = family(model)
    if fam.post_norms:
        raise HaloquantError(f"rotation: {architecture_of(model)} normalises its sublayer outputs before the residual "
                             "add (post-norms), which no rotation of the stream preserves; rotate a family without")


@torch.no_grad()
def rotate_model(model, seed: int = 0, heads: bool = True) -> dict:
    """Rotate `model` in place (float32 afterwards; products in float64). Returns what was done."""
    check_rotatable(model)
    fam, cfg = family(model), model.config
    model.float()
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = head.weight is embed.weight or bool(getattr(cfg, "tie_word_embeddings", False))
    if untied:  # the head gets the final norm's weight folded in, the embedding does not
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        cfg.tie_word_embeddings = False
        if hasattr(cfg, "get_text_config"):
            cfg.get_text_config().tie_word_embeddings = False

    def fold_norm(norm: str, linears: list[str]) -> None:
        w = params[f"{norm}.weight"]
        gamma = fam.norm_offset + w.double()
        for lin in linears:
            mods[lin].weight.copy_(mods[lin].weight.double() * gamma[None, :])
        w.fill_(1.0 - fam.norm_offset)

    readers = []
    for i in range(cfg.num_hidden_layers):
        p = fam.layer(i)
        for f in fam.norm_feeds:
            fold_norm(f"{p}.{f.norm}", [f"{p}.{t}" for t in f.linears])
            readers += [f"{p}.{t}" for t in f.linears]
    head_name = next(n for n, m in mods.items() if m is head)
    fold_norm(fam.final_norm, [head_name])

    q = randomized_hadamard(cfg.hidden_size, seed)
    embed.weight.copy_(embed.weight.double() @ q)
    for name in readers + [head_name]:
        mods[name].weight.copy_(mods[name].weight.double() @ q)
    writers = [f"{fam.layer(i)}.{w}" for i in range(cfg.num_hidden_layers) for w in fam.residual_writers]
    for name in writers:
        lin = mods[name]
        lin.weight.copy_(q.T @ lin.weight.double())
        if lin.bias is not None:
            lin.bias.copy_(lin.bias.double() @ q)

    n_head_rot = 0
    if heads:
        hd = head_dim(cfg)
        n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
        n_rep = cfg.num_attention_heads // n_kv
        for i in range(cfg.num_hidden_layers):
            for f in (f for f in fam.rows_feeds if f.per_kv_head):
                src, tgt = mods[f"{fam.layer(i)}.{f.source}"], mods[f"{fam.layer(i)}.{f.target}"]
                start = f.rows(cfg).start or 0
                for h in range(n_kv):
                    r = randomized_hadamard(hd, seed + 1 + i * n_kv + h)
                    rows = slice(start + h * hd, start + (h + 1) * hd)
                    src.weight[rows] = r.T @ src.weight[rows].double()
                    if src.bias is not None:
                        src.bias[rows] = src.bias[rows].double() @ r
                    for j in range(h * n_rep, (h + 1) * n_rep):
                        cols = slice(j * hd, (j + 1) * hd)
                        tgt.weight[:, cols] = tgt.weight[:, cols].double() @ r
                n_head_rot += n_kv
    return {"hidden": cfg.hidden_size, "seed": seed, "untied_head": untied, "readers": len(readers) + 1,
            "writers": len(writers), "head_rotations": n_head_rot}


def write_rotated(src: str | Path, out: str | Path, seed: int = 0, heads: bool = True) -> dict:
    """A rotated copy of the HF folder `src` in `out` (float32 weights; tokenizer and other files
    copied as they are). Written to a temporary folder first, so `out` is whole or absent."""
    from haloquant.modelio import load_model

    src, out = Path(src), Path(out)
    model = load_model(src, "cpu")
    report = rotate_model(model, seed, heads)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name not in ("config.json",) \
                and not f.name.endswith(".index.json"):
            shutil.copy(f, tmp / f.name)
    model.save_pretrained(tmp)
    (tmp / "rotation.json").write_text(json.dumps({"source": str(src), **report}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report
