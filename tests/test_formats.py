"""Codecs: real storage cost, exact agreement with gguf's reference decoder, affine views."""

import numpy as np
import pytest
from gguf import quants as gq
from safetensors.numpy import load_file

from haloquant import HaloquantError
from haloquant.formats import FORMATS, get_format
from tests.conftest import TINY

QUANT = [f for f in FORMATS.values() if not f.is_float]


def real_weight() -> np.ndarray:
    w = load_file(str(TINY / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    return w.astype(np.float32)


@pytest.mark.parametrize("fmt", QUANT, ids=lambda f: f.name)
@pytest.mark.parametrize("source", ["random", "real"])
def test_decode_is_gguf_reference(fmt, source):
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.05 if source == "random" \
        else real_weight()
    data = fmt.encode(w)
    assert data.dtype == np.uint8 and data.nbytes == fmt.storage_bytes(w.shape)
    ref = gq.dequantize(data, fmt.ggml_type).reshape(w.shape)
    np.testing.assert_array_equal(fmt.decode(data, w.shape), ref)
    # quantization is lossy but bounded: error well under the weights' spread
    assert 0 < np.abs(ref - w).mean() < 0.2 * np.abs(w).mean()


def test_bits_per_weight_include_scales():
    assert FORMATS["Q4_0"].bits_per_weight == 4.5  # 16 bytes of nibbles + fp16 scale per 32
    assert FORMATS["Q4_1"].bits_per_weight == 5.0  # + fp16 min
    assert FORMATS["Q5_0"].bits_per_weight == 5.5
    assert FORMATS["Q8_0"].bits_per_weight == 8.5
    assert FORMATS["F16"].bits_per_weight == 16


@pytest.mark.parametrize("fmt", QUANT, ids=lambda f: f.name)
def test_affine_view_reproduces_decode(fmt):
    w = real_weight()
    w[0, :32] = 0.25  # a constant block: zero scale, everything in the min
    data = fmt.encode(w)
    blocks = fmt.affine_blocks(data, w.shape)
    assert blocks.q.max() < 2 ** blocks.bits
    np.testing.assert_allclose(blocks.dequantize(), fmt.decode(data, w.shape), rtol=0, atol=1e-6)


def test_row_length_must_fit_block():
    with pytest.raises(HaloquantError, match="multiple of 32"):
        get_format("Q4_0").encode(np.zeros((4, 40), np.float32))
    with pytest.raises(HaloquantError, match="unknown format"):
        get_format("Q3_X")
