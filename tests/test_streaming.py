"""Layer-streamed execution (haloquant/streaming.py): decoder blocks wait on the host in their
stored dtype and run on the device one at a time — with exactly the numbers of a resident model."""

from __future__ import annotations

import pytest
import torch

from haloquant import modelio
from haloquant.evaluation import score
from haloquant.fisher import output_fisher
from haloquant.modelio import decoder_layers, load_model
from haloquant.quantized import load_quantized_model
from haloquant.streaming import on_device, set_source
from tests.conftest import TINY, small_params, write_params
from tests.modelzoo import CASES, make_model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-streaming")


def _ids(vocab: int, shape=(3, 48), seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_streamed_model_computes_what_a_resident_one_does(case, zoo):
    """Every family: the same logits to the bit; one block on the device at a time; afterwards
    every block holds its stored tensors again, in the checkpoint's dtype."""
    folder = make_model(case, zoo)
    resident, streamed = load_model(folder, "cpu", stream=False), load_model(folder, "cpu", stream=True)
    layers = decoder_layers(streamed)
    stored = {n: (p.data_ptr(), p.dtype) for n, p in layers.named_parameters()}
    assert {d for _, d in stored.values()} == {getattr(torch, case.dtype)}
    at_once = []  # per block call: the block parameters not on their stored tensors
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: at_once.append(
            {n for n, p in layers.named_parameters() if p.data_ptr() != stored[n][0]}))
    ids = _ids(streamed.config.vocab_size)
    assert torch.equal(resident(ids).logits, streamed(ids).logits)
    names_of = [{n for n, _ in layers.named_parameters() if n.startswith(f"{i}.")} for i in range(len(layers))]
    assert len(at_once) == len(layers)
    for i, moved in enumerate(at_once):  # inside block i's call: its own weights and no other block's
        # (float32 storage needs no widening on a CPU: nothing moves there)
        assert moved == (names_of[i] if case.dtype != "float32" else set()), moved
    assert all((p.data_ptr(), p.dtype) == stored[n] for n, p in layers.named_parameters())


def test_on_device_gives_a_source_and_then_the_stored_tensor_back():
    model = load_model(TINY, "cpu", stream=True)
    block = decoder_layers(model)[1]
    stored = block.self_attn.q_proj.weight.data_ptr()
    value = torch.full(block.self_attn.q_proj.weight.shape, 0.25)
    set_source(block, "self_attn.q_proj.weight", lambda device: value.to(device))
    with on_device(block, "cpu"):
        assert torch.equal(block.self_attn.q_proj.weight, value)
        with on_device(block, "cpu"):  # reentrant: a block's own call inside an outer context
            assert torch.equal(block.self_attn.q_proj.weight, value)
        assert block.self_attn.k_proj.weight.dtype == torch.float32
    assert block.self_attn.q_proj.weight.data_ptr() == stored
    assert block.self_attn.k_proj.weight.dtype == torch.float16  # ref-llama-tiny is stored in fp16
    set_source(block, "self_attn.q_proj.weight", None)
    with on_device(block, "cpu"):
        assert torch.equal(block.self_attn.q_proj.weight, load_model(TINY, "cpu").model.layers[1].self_attn.q_proj.weight)


def test_fisher_and_perplexity_are_the_same_streamed():
    """The block-by-block backward (recomputing each block) and the block-major perplexity give
    the resident model's numbers exactly."""
    ids = _ids(8192, (2, 64))
    modules = ["model.layers.0.self_attn.v_proj", "model.layers.3.mlp.down_proj", "lm_head"]
    resident, streamed = load_model(TINY, "cpu", stream=False), load_model(TINY, "cpu", stream=True)
    a, b = output_fisher(resident, ids, modules), output_fisher(streamed, ids, modules)
    assert all(torch.equal(a.channels[m], b.channels[m]) for m in modules)
    assert torch.equal(a.block0, b.block0) and a.coherence == b.coherence
    reference = load_model(TINY, "cpu", stream=False)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1.01)
    chunks = _ids(8192, (6, 64), seed=1)
    a, b = score(resident, chunks, reference, batch_size=2), score(streamed, chunks, reference, batch_size=2)
    assert (a["ppl"], a["ref_ppl"], a["kl_mean"]) == (b["ppl"], b["ref_ppl"], b["kl_mean"])
    c = score(streamed, chunks, reference, batch_size=2, group=3)  # groups of whole batches: the same batches
    assert (a["ppl"], a["ref_ppl"], a["kl_mean"]) == (c["ppl"], c["ref_ppl"], c["kl_mean"])


def test_auto_streams_only_what_does_not_fit(monkeypatch):
    """model.stream auto: stream when the float32 model would take over half of the device's memory."""
    n = modelio._shard_dtypes_and_elements(TINY)[1]
    device = torch.device("cpu")
    monkeypatch.setattr(modelio, "memory_bytes", lambda _device: 8 * n + 2)
    assert not modelio.should_stream(TINY, device)
    monkeypatch.setattr(modelio, "memory_bytes", lambda _device: 8 * n - 2)
    assert modelio.should_stream(TINY, device)
    assert modelio.should_stream(TINY, device, True) and not modelio.should_stream(TINY, device, False)


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """The pipeline with Scale-Fold and GPTQ (both read and rewrite weights), resident and streamed."""
    from haloquant.tasks.runner import run_all

    runs = {}
    for stream in (False, True):
        folder = tmp_path_factory.mktemp(f"stream-{stream}")
        params = small_params(**{"model.stream": stream, "fold.method": "scale", "quantize.method": "gptq",
                                 "validate.runtimes": ["llama_cpp"]})
        run_all(write_params(folder, params))
        runs[stream] = folder / "artifacts"
    return runs


@pytest.mark.parametrize("artifact", ["calibrate/stats.safetensors", "sensitivity/sensitivity.json",
                                      "scale_fold/scales.safetensors", "quantize/tensors.safetensors",
                                      "export_gguf/model.gguf", "validate/metrics.json"])
def test_a_streamed_pipeline_writes_the_same_bytes(both_ways, artifact):
    resident, streamed = (both_ways[s] / artifact for s in (False, True))
    assert resident.read_bytes() == streamed.read_bytes()


def test_a_streamed_quantized_model_decodes_block_by_block(both_ways):
    """Streamed, the quantized model keeps its blocks' quantized bytes, not float copies; its
    logits are the resident quantized model's."""
    quant = both_ways[False] / "quantize"
    resident = load_quantized_model(TINY, quant, "cpu", stream=False)
    streamed = load_quantized_model(TINY, quant, "cpu", stream=True)
    in_blocks = [p for p in decoder_layers(streamed).parameters() if p.ndim == 2 or p.numel() == 0]
    assert in_blocks and all(p.numel() == 0 for p in in_blocks)
    ids = _ids(8192)
    assert torch.equal(resident(ids).logits, streamed(ids).logits)
