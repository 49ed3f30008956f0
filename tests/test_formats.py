"""Codecs: real storage cost, exact agreement with gguf's reference decoder, affine views."""

import numpy as np
import pytest
from gguf import quants as gq
from safetensors.numpy import load_file

from haloquant import HaloquantError
from haloquant.formats import FORMATS, get_format
from tests.conftest import TINY

QUANT = [f for f in FORMATS.values() if not f.is_float]
AFFINE = [f for f in QUANT if f.lattice is None]  # the lattice i-quants: fields (tests/test_lattice.py)


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
    # lossy, with error shrinking by about half per extra bit of storage
    rel_rmse = np.sqrt(((ref - w) ** 2).mean() / (w**2).mean())
    assert 0 < rel_rmse < 2.0 ** -(fmt.bits_per_weight - 1.5)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_importance_lowers_weighted_error(name):
    """With per-column importance the fit trades error on unimportant columns for important ones."""
    w = real_weight()
    imp = np.random.default_rng(1).lognormal(0, 1.5, w.shape[1]).astype(np.float32)
    fmt = get_format(name)
    err = lambda q: float((((q - w) ** 2) * imp).sum())  # noqa: E731
    assert err(fmt.roundtrip(w, imp)) < err(fmt.roundtrip(w))


def test_kquant_edge_blocks():
    """All-zero, constant and single-spike super-blocks encode to valid bytes and decode sanely."""
    w = np.zeros((4, 512), np.float32)
    w[1] = 0.5
    w[2, 7] = 3.0
    w[3, :256] = -np.linspace(0, 1, 256)
    for name in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
        fmt = get_format(name)
        out = fmt.roundtrip(w)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0], 0)
        assert np.abs(out - w).max() < 0.35, name


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
@pytest.mark.parametrize("weighted", [False, True])
def test_iq4_encoder_follows_llama_cpp(name, weighted):
    """haloquant's own IQ4 encoder (before the per-block best-of with llama.cpp's) is ggml's
    algorithm: nearly the same bytes, the same weighted error within 0.1 %."""
    from haloquant.iquants import encode_iq4
    from haloquant.llamacpp import ggml_quantize

    w = real_weight()
    imp = np.random.default_rng(2).lognormal(0, 1, w.shape[1]).astype(np.float32) if weighted else None
    fmt = get_format(name)
    ours, theirs = encode_iq4(name, w, imp), ggml_quantize(fmt, w, imp)
    assert (ours == theirs).mean() > 0.99  # bytes; differences: indices chosen against the stored fp16 scale
    weight = np.ones(w.shape[1]) if imp is None else imp
    err = lambda b: float((((fmt.decode(b, w.shape) - w) ** 2) * weight).sum())  # noqa: E731
    assert err(ours) == pytest.approx(err(theirs), rel=1e-3)
    # the best of both, block by block; IQ4_NL skips llama.cpp's (it never wins: within 1e-5)
    assert err(fmt.encode(w, imp)) <= min(err(ours), err(theirs)) * (1 if fmt.llama_cpp_candidate else 1 + 1e-5)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_encoder_fits_to_importance(name):
    """The block-32 types' own encoder (before the best-of with llama.cpp's): without importance
    llama.cpp's exact bytes; with importance far better than the importance-blind reference fit,
    within a few % of llama.cpp's imatrix fit, and the best of both, block by block, better than
    llama.cpp's alone."""
    from haloquant.legacyquants import encode_legacy
    from haloquant.llamacpp import ggml_quantize

    w = real_weight()
    fmt = get_format(name)
    assert np.array_equal(encode_legacy(name, w), ggml_quantize(fmt, w, None))
    imp = np.random.default_rng(2).lognormal(0, 1.5, w.shape[1]).astype(np.float32)
    err = lambda b: float((((fmt.decode(b, w.shape) - w) ** 2) * imp).sum())  # noqa: E731
    ours, theirs, blind = err(encode_legacy(name, w, imp)), err(ggml_quantize(fmt, w, imp)), err(encode_legacy(name, w))
    assert ours < 0.9 * blind
    assert ours < 1.05 * theirs
    assert err(fmt.encode(w, imp)) < min(ours, theirs)


def test_bits_per_weight_include_scales():
    assert FORMATS["Q4_0"].bits_per_weight == 4.5  # 16 bytes of nibbles + fp16 scale per 32
    assert FORMATS["Q4_1"].bits_per_weight == 5.0  # + fp16 min
    assert FORMATS["Q5_0"].bits_per_weight == 5.5
    assert FORMATS["Q8_0"].bits_per_weight == 8.5
    assert FORMATS["F16"].bits_per_weight == 16
    assert FORMATS["Q2_K"].bits_per_weight == 2.625
    assert FORMATS["Q3_K"].bits_per_weight == 3.4375
    assert FORMATS["Q4_K"].bits_per_weight == 4.5
    assert FORMATS["Q5_K"].bits_per_weight == 5.5
    assert FORMATS["Q6_K"].bits_per_weight == 6.5625
    assert FORMATS["IQ4_NL"].bits_per_weight == 4.5  # 16 bytes of table indices + fp16 scale per 32
    assert FORMATS["IQ4_XS"].bits_per_weight == 4.25  # + 6-bit block scales under an fp16 super-scale
    # lattice i-quants per 256: fp16 scale, 4-bit sub-scales, 8-bit grid indices (9 or 10 bits for _XS/_S), signs
    assert [FORMATS[n].bits_per_weight for n in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")] == \
        [2.0625, 2.3125, 2.5625, 3.0625, 3.4375]


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


@pytest.mark.parametrize("fmt", QUANT, ids=lambda f: f.name)
@pytest.mark.parametrize("with_importance", [False, True])
def test_never_worse_than_llama_cpp_quantizer(fmt, with_importance):
    """Weighted error of haloquant's encoding ≤ llama.cpp's quantizer (ggml_quantize_chunk) with
    the same importance, on a real tensor — and strictly better somewhere for the k-quants."""
    from haloquant.llamacpp import ggml_quantize

    w = real_weight()
    imp = np.random.default_rng(2).lognormal(0, 1, w.shape[1]).astype(np.float32) if with_importance else None
    wt = imp if with_importance else np.ones(w.shape[1], np.float32)
    err = lambda q: float((((q - w) ** 2) * wt).sum())  # noqa: E731
    ours = err(fmt.roundtrip(w, imp))
    theirs = err(fmt.decode(ggml_quantize(fmt, w, imp), w.shape))
    assert ours <= theirs * (1 + 1e-6)
    if fmt.is_kquant and fmt.name != "Q6_K":
        assert ours < theirs


@pytest.mark.parametrize("fmt", QUANT, ids=lambda f: f.name)
def test_encoding_on_threads_gives_the_same_bytes(fmt):
    """encode splits a tensor's rows over the process's threads: the bytes do not depend on how
    many (1, 3, or one chunk per 32 rows), with and without importance."""
    w = np.random.default_rng(3).standard_normal((200, 512)).astype(np.float32)
    imp = np.random.default_rng(4).lognormal(0, 1, 512).astype(np.float32)
    for importance in (None, imp):
        one = fmt.encode(w, importance, threads=1)
        for threads in (3, 64, None):
            assert np.array_equal(one, fmt.encode(w, importance, threads=threads)), (threads, importance is None)


def _torch_devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _torch_devices())
@pytest.mark.parametrize("fmt", [f for f in AFFINE if f.encoder is not None], ids=lambda f: f.name)
def test_torch_fits_give_numpy_bytes(fmt, device):
    """The scale searches run in torch (GPU encoders, issue 14) give exactly numpy's bytes — on a
    real weight, and on rows with zero, constant and outlier blocks, with and without importance."""
    w = np.concatenate([real_weight(), np.random.default_rng(3).standard_t(4, (512, 768)).astype(np.float32) * 0.02])
    w[-1], w[-2, :64], w[-3, 32:64] = 0.0, 0.01, -0.003
    rng = np.random.default_rng(4)
    for importance in (None, rng.lognormal(0, 1.5, w.shape[1]).astype(np.float32),
                       rng.gamma(1.0, size=w.shape[1]).astype(np.float32)):
        ref = fmt.encode_own(w, importance)
        np.testing.assert_array_equal(fmt.encode_own(w, importance, device=device), ref)


@pytest.mark.parametrize("device", _torch_devices())
@pytest.mark.parametrize("fmt", [f for f in AFFINE if f.encoder is not None and f.llama_cpp_candidate],
                         ids=lambda f: f.name)
def test_device_encode_gives_cpu_bytes(fmt, device):
    """With a device, the own fit runs there, llama.cpp's blocks beside it on the CPU and the choice
    between them on the device: the bytes of the numpy path, which mixes both (else the test is void)."""
    w = np.concatenate([real_weight(), np.random.default_rng(3).standard_t(4, (256, 768)).astype(np.float32) * 0.02])
    imp = np.random.default_rng(4).lognormal(0, 1.5, w.shape[1]).astype(np.float32)
    for importance in (None, imp):
        ref = fmt.encode(w, importance)
        if importance is not None:  # (without, the legacy types' own fit is ggml's reference one)
            assert not np.array_equal(ref, fmt.encode_own(w, importance))  # llama.cpp's blocks won some
        np.testing.assert_array_equal(fmt.encode(w, importance, device=device), ref)


@pytest.mark.parametrize("device", _torch_devices())
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "IQ4_NL", "Q5_0"])
def test_device_encode_in_row_chunks_gives_the_same_bytes(name, device, monkeypatch):
    """A device encode takes a large tensor in row chunks (haloquant.arrays.row_chunks bounds its
    float intermediates); any chunking gives the whole tensor's bytes, with and without llama.cpp's
    per-block candidate."""
    import haloquant.arrays

    fmt = get_format(name)
    w = np.concatenate([real_weight(), np.random.default_rng(5).standard_t(4, (200, 768)).astype(np.float32) * 0.02])
    imp = np.random.default_rng(6).lognormal(0, 1.5, w.shape[1]).astype(np.float32)
    whole = fmt.encode(w, imp, device=device), fmt.encode_own(w, imp, device=device)
    monkeypatch.setattr(haloquant.arrays, "DEVICE_CHUNK_WEIGHTS", 37 * w.shape[1] + 5)  # 37-row chunks, the last short
    assert len(haloquant.arrays.row_chunks(*w.shape)) > 3
    np.testing.assert_array_equal(fmt.encode(w, imp, device=device), whole[0])
    np.testing.assert_array_equal(fmt.encode_own(w, imp, device=device), whole[1])
    np.testing.assert_array_equal(whole[0], fmt.encode(w, imp))  # and the CPU reference's bytes


def test_backend_sums_and_roots_are_numpys():
    """The two operations torch does not do as numpy does by default: last-axis float32 sums
    (another addition order) and √ (not correctly rounded in torch's CPU kernel)."""
    import torch

    from haloquant.arrays import sqrt32, sum_last

    rng = np.random.default_rng(5)
    for n in (3, 16, 32, 136, 256, 1000):
        a = (rng.standard_normal((4000, n)) * rng.gamma(1, size=(4000, 1))).astype(np.float32)
        np.testing.assert_array_equal(sum_last(torch.from_numpy(a)).numpy(), a.sum(-1))
    a = rng.gamma(1, size=1_000_000).astype(np.float32)
    np.testing.assert_array_equal(sqrt32(torch.from_numpy(a)).numpy(), np.sqrt(a))


def test_a_codec_registers_once_under_its_own_ggml_type():
    """The codec table (haloquant/codec.py) refuses a second codec for a type, and a codec filed
    under another type's name; a refused call leaves the table as it was."""
    from gguf import GGMLQuantizationType

    from haloquant.codec import CODECS, register

    before = dict(CODECS)
    with pytest.raises(ValueError, match="twice"):
        register("Q4_K", CODECS["Q4_K"])
    with pytest.raises(ValueError, match="ggml type Q4_K"):
        register("TQ1_0", CODECS["Q4_K"])
    assert CODECS == before and "TQ1_0" not in FORMATS
    assert all(FORMATS[n].codec is c and c.ggml_type == GGMLQuantizationType[n] for n, c in CODECS.items())


def test_the_spec_knows_every_format_and_no_other():
    from haloquant.schemas.params import FORMAT_NAMES

    assert sorted(FORMAT_NAMES) == sorted(FORMATS)
