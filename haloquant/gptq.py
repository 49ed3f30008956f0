"""GPTQ (Frantar et al., 2022) whose rounding grid is the chosen llama.cpp format's grid.

Columns are processed in order (or by decreasing Hessian diagonal with `act_order`); each
column's rounding error is compensated in the columns not yet quantized through the inverse
Hessian H = E[xxᵀ] + λI from calibration. When a column starts a new format block (32 columns
for the classic types, a 256-column super-block for k-quants), that block's scales and mins are
fitted by the format's own encoder on the *current*, error-compensated weights (on the GPU where
GPTQ runs there, the same bytes: haloquant.arrays) and then fixed; every column of the block is
rounded onto that grid (codes q ∈ [0, max], value (q − zero)·scale; for IQ4_NL / IQ4_XS the
nearest of the format's 16 table values times the block scale). The lattice i-quants (IQ1_S …
IQ3_S) round 8 columns at once: ggml fits the block's scales, then each group of 8 takes the grid
point and signs nearest to its compensated weights, weighted by 1/U_jj² (U the inverse Hessian's
Cholesky factor: what each column's error costs), and its error is compensated column by column
as in GPTVQ (act_order then orders whole groups by their Hessian diagonal).
The codes are written back into the fitted block bytes, so the result is ordinary llama.cpp data.
With act_order the blocks' grids are fitted up front on the original weights (static groups).
"""

from __future__ import annotations

import numpy as np
import torch

from haloquant.arrays import fit_device
from haloquant.formats import QuantFormat
from haloquant.latticequants import GROUP

BLOCK = 128  # columns per lazy batch update (rounded up to a multiple of the format's block)


def _grid(fmt: QuantFormat, data: np.ndarray, rows: int, cols: int):
    """Per-column (rows, cols) scale, zero and constant mask of fitted block bytes."""
    a = fmt.affine_blocks(data, (rows, cols))
    g = a.q.shape[-1]
    rep = lambda x: np.repeat(x, g, axis=1)  # noqa: E731
    const = rep(a.constant) if a.constant is not None else np.zeros((rows, cols), bool)
    return rep(a.scale), rep(a.zero), const


class _Rounding:
    """Nearest code of a format's grid: integers 0..max, or (IQ4 types) a table of values."""

    def __init__(self, fmt: QuantFormat, device):
        self.qmax = fmt.max_code
        self.values = None if fmt.code_values is None else torch.tensor(fmt.code_values, device=device)
        if self.values is not None:  # midpoints; ties go to the larger value, as ggml's best_index_int8
            self.mid = (self.values[1:] + self.values[:-1]) / 2
        self.level0 = 0.0 if self.values is None else float(self.values[0])  # the level of code 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x = w/scale + zero → (code, its level)."""
        if self.values is None:
            q = torch.clamp(torch.round(x), 0, self.qmax)
            return q, q
        q = torch.bucketize(x, self.mid, right=True)
        return q, self.values[q]


@torch.no_grad()
def gptq_quantize(weight: np.ndarray, fmt: QuantFormat, gram: torch.Tensor, damp: float = 0.01,
                  act_order: bool = False, device: str | torch.device = "cpu",
                  rounded: np.ndarray | None = None) -> np.ndarray:
    """Quantize `weight` (rows, cols) into `fmt` block bytes with GPTQ; `gram` is E[xxᵀ] (cols, cols).
    `rounded`, if given (rows, cols), receives the error-compensated weights GPTQ rounded — the
    codes are their nearest grid points (block tuning starts from there)."""
    rows, cols = weight.shape
    sb = fmt.block_size
    fmt.storage_bytes(weight.shape)  # refuses rows that do not fit the block
    W = torch.tensor(weight, dtype=torch.float32, device=device)
    H = gram.to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diagonal(H).float().cpu().numpy()
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, device=device, dtype=H.dtype)

    lattice = fmt.lattice
    unit = GROUP if lattice is not None else 1  # columns rounded together
    perm = torch.arange(cols, device=device)
    if act_order:  # dead columns (no input ever: a widened model's pad channels) last, whatever the others' scale
        key = torch.where(dead, -1.0, torch.diagonal(H)).reshape(-1, unit).sum(-1)
        order = torch.argsort(key, descending=True)
        perm = (order[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
    Hp = H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True).float()

    data = np.zeros((rows, cols // sb * fmt.type_size), dtype=np.uint8)
    scale = torch.zeros(rows, cols, device=device)
    zero = torch.zeros(rows, cols, device=device)
    const = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    codes = torch.zeros(rows, cols, dtype=torch.int16, device=device)
    if lattice is not None:
        grid = torch.from_numpy(lattice.grid).to(device)
        index = torch.zeros(rows, cols // unit, unit // lattice.vector, dtype=torch.int64, device=device)
        signs = torch.zeros(rows, cols // unit, dtype=torch.int32, device=device)
        offset = torch.zeros(rows, cols // unit, device=device)  # IQ1's kept per-group offsets
    compensated = None if rounded is None else torch.zeros(rows, cols, device=device)

    def fit(start: int, w_block: torch.Tensor) -> None:
        b = fmt.encode(w_block.cpu().numpy(), importance[start : start + sb], device=fit_device(device))
        data[:, start // sb * fmt.type_size : (start // sb + 1) * fmt.type_size] = b
        if lattice is not None and lattice.signed:
            kept = lattice.read(b, (rows, sb)).offset
            offset[:, start // unit : (start + sb) // unit] = torch.from_numpy(kept).to(device)
        s, z, c = _grid(fmt, b, rows, sb)
        scale[:, start : start + sb] = torch.from_numpy(s).to(device)
        zero[:, start : start + sb] = torch.from_numpy(z).to(device)
        const[:, start : start + sb] = torch.from_numpy(c).to(device)

    if act_order:  # static groups: every grid from the original weights, then into column order
        for start in range(0, cols, sb):
            fit(start, W[:, start : start + sb])
        scale, zero, const = scale[:, perm], zero[:, perm], const[:, perm]
    W = W[:, perm]

    block = -(-max(BLOCK, sb) // sb) * sb
    nearest = _Rounding(fmt, device) if lattice is None else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order and col % sb == 0:  # a new block is reached: fix its grid now
                fit(col, W1[:, i : i + sb])
            s, z, c = scale[:, col], zero[:, col], const[:, col]
            w = W1[:, i]
            if lattice is not None:
                if i % unit == 0:  # a group's grid point and signs, from its compensated weights
                    sg = scale[:, col : col + unit] * lattice.code_unit  # the decoder's multiplier of its levels
                    g_index, g_signs, values = lattice.nearest(W1[:, i : i + unit] / torch.where(sg == 0, 1.0, sg), grid,
                                                               torch.diagonal(Hinv)[col : col + unit] ** -2,
                                                               offset[:, perm[col] // unit])
                    index[:, perm[col] // unit], signs[:, perm[col] // unit] = g_index, g_signs
                    group_deq = values * sg
                deq = group_deq[:, i % unit]
            else:
                q, level = nearest(w / torch.where(c, 1.0, s) + z)
                q = torch.where(c, 0, q)
                deq = (torch.where(c, nearest.level0, level) - z) * s
                codes[:, perm[col]] = q.to(torch.int16)
            if compensated is not None:
                compensated[:, perm[col]] = w
            err = (w - deq) / Hinv[col, col]
            W1[:, i:] -= err[:, None] * Hinv[col, i1 + i : i2][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if rounded is not None:
        rounded[:] = compensated.cpu().numpy()
    if lattice is not None:
        return lattice.write(data, (rows, cols), index.cpu().numpy(), signs.cpu().numpy().astype(np.uint8))
    return fmt.with_codes(data, (rows, cols), codes.cpu().numpy().astype(np.uint8))
