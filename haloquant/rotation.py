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

The folder is rotated tensor by tensor, shard by shard (products in float64), so a model of any
size needs one shard in memory. Rotated tensors keep the source's dtype unless `dtype` says
otherwise: a bf16 checkpoint stays bf16 (rounding the rotated weights to bf16 costs 2⁻⁹ relative,
far below any 2–8-bit quantizer's error); float32 keeps the function to float32 rounding.

What it costs: a tied head must be untied (the head becomes E·diag(γ_final)·Q, the embedding E·Q),
so the file carries a second vocab × hidden matrix. What it cannot do: families that normalise a
sublayer's output before adding it to the stream (Gemma 2/3's post-norms: nothing after that norm
takes its weight) — `Family.post_norms`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from haloquant import HaloquantError
from haloquant.families import Family, family_of_architecture
from haloquant.families.base import head_dim
from haloquant.rewrite import read_source, rewrite_folder, safetensors_shards, tensor_locations


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


def check_rotatable(fam: Family, arch: str) -> None:
    if fam.post_norms:
        raise HaloquantError(f"rotation: {arch} normalises its sublayer outputs before the residual add "
                             "(post-norms), which no rotation of the stream preserves; rotate a family without")


@dataclass
class RotationPlan:
    """What happens to each named tensor of a family's checkpoint (HF parameter names)."""

    fam: Family
    q: torch.Tensor  # the stream's rotation, hidden × hidden
    seed: int
    hd: int
    n_kv: int
    n_rep: int
    readers: dict[str, str] = field(default_factory=dict)  # linear weight → the norm weight folded into it
    writers: set[str] = field(default_factory=set)  # linear weights (and biases) whose outputs join the stream
    v_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # weight/bias → (layer, first v row); heads only
    o_cols: dict[str, int] = field(default_factory=dict)  # o weight → layer; heads only
    norms: set[str] = field(default_factory=set)

    def head_rotation(self, layer: int, kv_head: int) -> torch.Tensor:
        return randomized_hadamard(self.hd, self.seed + 1 + layer * self.n_kv + kv_head)

    def rotate(self, name: str, t: torch.Tensor, read) -> torch.Tensor:
        """The rotated tensor `name` (float64); `read(name)` gives any other source tensor."""
        off = self.fam.norm_offset
        w = t.to(torch.float64, copy=True)
        if name in self.norms:
            return torch.full_like(w, 1.0 - off)
        if name == f"{self.fam.embedding}.weight":
            return self._times_q(w)
        if name in self.readers:
            w = self._times_q(w, off + read(self.readers[name]).double())
        if name in self.writers:
            w = self.q.T @ w if w.ndim == 2 else w @ self.q
        if name in self.v_rows:
            layer, start = self.v_rows[name]
            for h in range(self.n_kv):
                r, rows = self.head_rotation(layer, h), slice(start + h * self.hd, start + (h + 1) * self.hd)
                w[rows] = r.T @ w[rows] if w.ndim == 2 else w[rows] @ r
        if name in self.o_cols:
            for h in range(self.n_kv):
                r = self.head_rotation(self.o_cols[name], h)
                for j in range(h * self.n_rep, (h + 1) * self.n_rep):
                    w[:, j * self.hd:(j + 1) * self.hd] = w[:, j * self.hd:(j + 1) * self.hd] @ r
        return w

    def _times_q(self, w: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
        """(w · diag(gamma)) Q, 8192 rows at a time (a vocabulary-sized embedding in float64 is large)."""
        g = torch.ones(w.shape[1], dtype=w.dtype) if gamma is None else gamma
        return torch.cat([(w[i:i + 8192] * g[None, :]) @ self.q for i in range(0, w.shape[0], 8192)])


def plan_for(fam: Family, cfg, seed: int = 0, heads: bool = True) -> RotationPlan:
    hd = head_dim(cfg)
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    plan = RotationPlan(fam, randomized_hadamard(cfg.hidden_size, seed), seed, hd, n_kv,
                        cfg.num_attention_heads // n_kv)
    for i in range(cfg.num_hidden_layers):
        p = fam.layer(i)
        for f in fam.norm_feeds:
            plan.norms.add(f"{p}.{f.norm}.weight")
            plan.readers.update({f"{p}.{t}.weight": f"{p}.{f.norm}.weight" for t in f.linears})
        plan.writers.update(f"{p}.{w}.{x}" for w in fam.residual_writers for x in ("weight", "bias"))
        for f in (f for f in fam.rows_feeds if f.per_kv_head and heads):
            start = f.rows(cfg).start or 0
            plan.v_rows.update({f"{p}.{f.source}.weight": (i, start), f"{p}.{f.source}.bias": (i, start)})
            plan.o_cols[f"{p}.{f.target}.weight"] = i
    plan.norms.add(f"{fam.final_norm}.weight")
    plan.readers[f"{fam.head}.weight"] = f"{fam.final_norm}.weight"
    return plan


@torch.no_grad()
def rotate_model(model, seed: int = 0, heads: bool = True) -> dict:
    """Rotate a loaded model in place (float32 afterwards), untying a tied head. Returns what was done."""
    from haloquant.families import architecture_of

    arch = architecture_of(model)
    fam = family_of_architecture(arch)
    check_rotatable(fam, arch)
    model.float()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = head.weight is embed.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    if untied:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    plan = plan_for(fam, model.config, seed, heads)
    source = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.copy_(plan.rotate(name, source[name], source.__getitem__))
    return {"hidden": model.config.hidden_size, "seed": seed, "untied_head": untied, "heads": heads}


def write_rotated(src: str | Path, out: str | Path, seed: int = 0, heads: bool = True,
                  dtype: torch.dtype | None = None) -> dict:
    """A rotated copy of the HF folder `src` in `out`, shard by shard (`dtype`: of the rotated
    tensors; None: each source tensor's own). Tokenizer and other files are copied as they are; `out`
    is whole or absent (haloquant/rewrite.py)."""
    from haloquant.modelio import read_config

    src, cfg, arch, fam = read_source(src, "rotation")
    out = Path(out)
    check_rotatable(fam, arch)
    plan = plan_for(fam, cfg, seed, heads)
    where = tensor_locations(safetensors_shards(src, "rotation"))
    embed_name, head_name = f"{fam.embedding}.weight", f"{fam.head}.weight"
    if embed_name not in where:
        raise HaloquantError(f"rotation: {src} has no tensor {embed_name!r} (the {fam.name} family's embedding)")
    untie = head_name not in where

    def transform(name: str, t: torch.Tensor, read) -> dict[str, torch.Tensor]:
        if not t.is_floating_point():
            return {name: t}
        out = {name: plan.rotate(name, t, read).to(dtype or t.dtype)}
        if untie and name == embed_name:
            out[head_name] = plan.rotate(head_name, t, read).to(dtype or t.dtype)
        return out

    config = read_config(src)
    config["tie_word_embeddings"] = False
    if "tie_word_embeddings" in config.get("text_config", {}):
        config["text_config"]["tie_word_embeddings"] = False
    report = {"source": src.name, "hidden": cfg.hidden_size, "seed": seed, "heads": heads, "untied_head": untie,
              "dtype": str(dtype).removeprefix("torch.") if dtype else "source"}
    rewrite_folder(src, out, transform, config, report, "rotation.json", "rotation")
    return report
