"""The torch decoders give gguf's reference decoder's values bit for bit (CPU here; CUDA on a GPU)."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import quants as gq

from haloquant.decoders import DECODERS, decode_torch
from haloquant.formats import FORMATS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _same_bits(ref: np.ndarray, got: np.ndarray) -> bool:
    """Equal bit for bit where finite; NaN exactly where gguf gives NaN (payloads may differ)."""
    nan = np.isnan(ref)
    return np.array_equal(np.isnan(got), nan) and np.array_equal(ref[~nan].view(np.int32), got[~nan].view(np.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ggml_type", list(DECODERS), ids=lambda t: t.name)
def test_random_bytes_decode_as_gguf(ggml_type, device):
    """Arbitrary bytes exercise every bit of every field (scales, signs, high bits, f16 extremes)."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    rows, cols = 48, 4 * 256
    data = np.random.default_rng(int(ggml_type)).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gq.dequantize(data, ggml_type).astype(np.float32)
    got = decode_torch(data, ggml_type, (rows, cols), device).cpu().numpy()
    assert got.shape == (rows, cols)
    assert _same_bits(ref, got)


@pytest.mark.parametrize("device", DEVICES)
def test_every_format_decodes_its_encodings_as_decode(device):
    """Real encodings of a real-looking matrix, every haloquant format (the lattice i-quants and
    floats too, which go through gguf or a view): decode_torch = decode."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(5, (16, 512)) * 0.02).astype(np.float32)
    for fmt in FORMATS.values():
        data = fmt.encode(w, np.abs(rng.standard_normal(512)).astype(np.float32) + 0.1)
        got = fmt.decode_torch(data, w.shape, device)
        assert got.dtype == torch.float32 and got.device.type == device
        assert _same_bits(fmt.decode(data, w.shape), got.cpu().numpy()), fmt.name
