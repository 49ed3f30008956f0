"""The spec: one pydantic model per section of params.yaml.

`load_params` turns any problem into a `HaloquantError` naming the key path (e.g.
`allocation.budget.bits_per_weight`) and what was expected, before any stage touches an artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from haloquant import HaloquantError
from haloquant.schemas.base import FilePath, Pair, Strict, read_yaml


def _known_names(values: list[str], known, what: str) -> list[str]:
    bad = [v for v in values if v not in known]
    if bad:
        raise ValueError(f"unknown {what}(s) {bad}; known: {list(known)}")
    return values


class ModelSpec(Strict):
    path: FilePath = Field(description="Hugging Face causal-LM folder (config.json, tokenizer.json, weights)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    add_bos: bool | None = Field(None, description="start every sequence with BOS (calibration, evaluation, the "
                                 "GGUF's tokenizer.ggml.add_bos_token); null: as the model's own tokenizer does")
    stream: bool | Literal["auto"] = Field("auto", description="keep the decoder blocks on the host in the "
                                           "checkpoint's dtype and run them on the device one at a time (the same "
                                           "numbers, a block's weights in memory at a time); auto: when the model in "
                                           "float32 would take more than half of the device's memory")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v


class CalibrationSpec(Strict):
    text: FilePath = Field(description="plain-text calibration file; never the evaluation text")
    n_sequences: PositiveInt = 64
    seq_len: int = Field(256, ge=8, le=32768)
    seed: int = 0


# llama.cpp tensor types haloquant encodes (each codec module registers its types in haloquant/codec.py; a
# test keeps the two equal): the spec's vocabulary, kept here so the schemas need no library code
FORMAT_NAMES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS",
                "IQ2_S", "IQ3_XXS", "IQ3_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                "F16", "F32")
FALLBACK_FORMATS = ["IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


class SensitivitySpec(Strict):
    formats: list[str] = Field(min_length=1, description="candidate storage formats")
    fallback_formats: list[str] = Field(
        FALLBACK_FORMATS, description="candidates too, for a tensor whose rows a listed format does not fit (the "
        "k-quants need rows that are a multiple of 256): llama.cpp's fallback types")
    metric: Literal["auto", "output_error", "kl_calibrated", "hessian_trace", "kl_end_to_end", "kl_fisher",
                    "none"] = Field("auto", description="auto: kl_calibrated where its probes cost at most "
                                    "probe_budget_tflop, else kl_fisher (tasks/sensitivity.py)")
    kl_sequences: PositiveInt = Field(8, description="calibration sequences for the kl_* metrics' measurements")
    probe_budget_tflop: float = Field(100.0, gt=0, description="metric auto: the most kl_calibrated's probes may "
                                      "cost, in 10¹² floating-point operations (about 13 min on 2 CPU cores)")
    llama_cpp_candidate: bool | Literal["auto"] = Field(
        "auto", description="measure each format as quantize writes it: per block the better of haloquant's fit "
        "and llama.cpp's (true); false: haloquant's fit alone — errors a few per cent higher, on a GPU half the "
        "stage's time (llama.cpp's blocks are made on the host's cores); auto: true on a CPU, false on a GPU "
        "(tasks/sensitivity.py)")

    @field_validator("formats", "fallback_formats")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        _known_names(v, FORMAT_NAMES, "format")
        if len(set(v)) != len(v):
            raise ValueError("formats are listed twice")
        return v


class Budget(Strict):
    """Exactly one of: bits per quantizable weight; total bytes of all tensor data; or the GGUF
    file's size, metadata and alignment included ("fits in N MB": file_mb, N × 10⁶ bytes)."""

    bits_per_weight: float | None = Field(None, gt=0, le=32)
    total_bytes: int | None = Field(None, gt=0)
    file_bytes: int | None = Field(None, gt=0)
    file_mb: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        given = [k for k in ("bits_per_weight", "total_bytes", "file_bytes", "file_mb") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of bits_per_weight, total_bytes, file_bytes or file_mb")
        return self

    @property
    def field(self) -> str:
        return next(k for k in ("bits_per_weight", "total_bytes", "file_bytes", "file_mb") if getattr(self, k) is not None)


class TensorRule(Strict):
    """Constrain the formats of tensors whose GGUF name matches `match` (a glob, e.g. "*attn_v*")."""

    match: str
    format: str | None = Field(None, description="pin these tensors to this format")
    min_bits: float | None = Field(None, gt=0, description="only formats of at least this many bits per weight")

    @model_validator(mode="after")
    def _one(self) -> "TensorRule":
        if (self.format is None) == (self.min_bits is None):
            raise ValueError("give exactly one of format or min_bits")
        if self.format is not None and self.format not in FORMAT_NAMES:
            raise ValueError(f"unknown format {self.format!r}")
        return self


class RefineSpec(Strict):
    """Refine the solver's formats with the whole model's measured KL (haloquant/refine.py)."""

    evaluations: int = Field(0, ge=0, description="forward passes of the local search; 0: off (the solver's "
                             "formats as they are)")
    sequences: int = Field(32, ge=2, description="calibration sequences the KL is measured on: the last ones "
                           "(sensitivity's kl_* metrics use the first)")
    time_limit_s: float = Field(600.0, gt=0, description="stop searching after this long")
    min_z: float = Field(2.0, ge=0, description="keep a move only if it lowers the KL by at least this many "
                         "standard errors of its per-sequence KL changes (paired over the sequences): a drop "
                         "within the noise of the sample is not a gain")


class AllocationSpec(Strict):
    budget: Budget
    solver: Literal["milp", "greedy", "lagrangian", "sac"] = "milp"
    rules: list[TensorRule] = []
    time_limit_s: float = Field(60.0, gt=0)
    onnx_budget: float | None = Field(None, gt=0, description="also fit the ONNX export's quantized weights in this "
                                      "multiple of the budget (e.g. 1.15: ONNX at most 15 % over); null: the budget "
                                      "counts the GGUF only (solver milp)")
    policy: FilePath = Field(Path("policies/sac-llama-family"),
                         description="solver sac: a train_policy output folder (policy.zip + policy.json)")
    refine: RefineSpec = Field(default_factory=RefineSpec)


class TrainPolicySpec(Strict):
    """RAMP's Soft Actor-Critic allocator, trained on this pipeline's sensitivity table (the reward's
    quality term) and layer embeddings (the policy's input)."""

    timesteps: PositiveInt = Field(20000, description="environment steps (one step = one tensor's format)")
    seed: int = 0
    budget_range: Pair = Field((3.0, 6.0), description="training budgets, bits per weight")
    eval_every: PositiveInt = Field(2000, description="steps between learning-curve evaluations")
    net_arch: list[PositiveInt] = Field([128, 128], min_length=1, description="hidden layers of actor and critics")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Adam step size of actor, critics and entropy")
    also_on: list[FilePath] = Field([], description="other runs' artifacts folders (each with calibrate/ and a measured "
                                "sensitivity/) to train on too: a policy meant for other models should see several")

    @model_validator(mode="after")
    def _range(self) -> "TrainPolicySpec":
        lo, hi = self.budget_range
        if not 0 < lo <= hi <= 32:
            raise ValueError("budget_range must be [low, high] bits per weight with 0 < low <= high <= 32")
        return self


class FoldSpec(Strict):
    method: Literal["identity", "scale"] = "identity"
    alpha_grid: list[float] = Field([0.0, 0.25, 0.5, 0.75], min_length=1,
                                    description="α candidates per group; 0 = leave the group unfolded")

    @field_validator("alpha_grid")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if any(a < 0 or a > 1 for a in v):
            raise ValueError("every α must be in [0, 1]")
        return v


class GPTQSpec(Strict):
    damp: float = Field(0.01, gt=0, lt=1, description="λ = damp · mean diag(H) added to the Hessian")
    act_order: bool = Field(True, description="columns by decreasing Hessian diagonal, grids fitted up front")
    sequential: bool = Field(False, description="each decoder block's Hessians from the inputs the already-"
                             "quantized blocks (and, inside a block, the already-quantized groups) produce, "
                             "instead of the float model's calibration statistics (haloquant/sequential.py)")
    tied_embedding_damp: float = Field(
        1.0, gt=0, le=100, description="damp for a tied embedding: its Hessian is the output head's E[xxᵀ], and "
        "its rows are also looked up, where error counts unweighted (identity Hessian, i.e. rounding): a larger "
        "damp leans toward that role")


class RotateSpec(Strict):
    """Rotation preconditioning (haloquant/rotation.py): the stages quantize a rotated copy of the model —
    norms folded into the linears after them, the residual stream in a randomized-Hadamard basis, each kv head's
    v → o pair rotated — which computes the same logits and runs in unmodified llama.cpp. A tied head is untied
    (its bytes count). Not Gemma 2/3 (their post-norms cannot take the rotation back). `widen` pads the stream
    to whole 256-blocks first (any family but Phi-3)."""

    enabled: bool = Field(False, description="quantize a rotated copy (artifacts/rotate/model, as large as the "
                          "model in its own dtype); off: on ref-llama-a it lowered perplexity at Q2_K's size "
                          "and raised KL at every size (bench/results/rotation_ref-llama-a.md)")
    seed: int = Field(0, description="the random signs and orthogonal factor of the randomized Hadamard matrices")
    heads: bool = Field(True, description="also rotate each kv head's v rows and o columns")
    widen: bool | Literal["auto"] = Field(
        "auto", description="pad the residual stream with zero channels to a multiple of 256 (haloquant/widening.py; "
        "the same function, rotated after if enabled) where it is not one (hidden 576, 896, 960, 1152 …), so that the "
        "stream-reading linears, embedding and head can take k-quants and i-quants instead of ≥ 4.5-bit block-32 "
        "formats; costs their bytes × new/old width. auto: exactly when allocation.budget is infeasible at the "
        "checkpoint's widths and feasible widened (below ~4.1–4.5 bits per weight); no-op at a multiple of 256")


class BlockTuningSpec(Strict):
    """Block-output reconstruction after the quantizer (haloquant/reconstruct.py): each decoder
    block's codes tuned by signed gradient against the float block's output; scales kept."""

    iters: int = Field(0, ge=0, description="signed-gradient steps per decoder block; 0 = off")
    lr: float | None = Field(None, gt=0, le=1, description="offset step per iteration, decayed linearly; "
                             "null = 1 / iters (AutoRound's default)")
    batch: PositiveInt = Field(8, description="calibration windows per step")
    seed: int = 0
    amp: bool = Field(True, description="on CUDA, tuning steps in bfloat16 autocast (the keep decision in float32)")


class EndToEndSpec(Strict):
    """End-to-end tuning, the quantizer's last step (haloquant/end_to_end.py): the decoder linears' codes
    and the float norm weights and biases tuned together against the float model's next-token
    distributions (KL) on calibration windows; kept only if it lowers the KL of held-out windows."""

    iters: int = Field(0, ge=0, description="steps over the whole model; 0 = off. Needs the whole model on one "
                       "device and about 25 bytes per decoder weight beside it")
    lr: float | None = Field(None, gt=0, le=1, description="code offset step per iteration, decayed linearly; "
                             "null = 1 / iters, where a code moves only if nearly all its steps agree (2 / iters "
                             "moves more; docs/stages.md)")
    float_lr: float = Field(1e-4, ge=0, description="Adam's step for the norm weights and biases; 0 = codes only")
    batch: PositiveInt = Field(8, description="calibration windows per step")
    holdout: PositiveInt = Field(8, description="calibration windows kept out of the steps for the keep decision")
    seed: int = 0
    amp: bool = Field(True, description="on CUDA, steps in bfloat16 autocast (targets and the keep decision in "
                      "float32)")


class QuantizeSpec(Strict):
    """The quantizer. The sensitivity stage reads this section too: costs are measured for it."""

    method: Literal["rtn", "gptq", "llamacpp"] = Field(
        "rtn", description="rtn: haloquant's encoders; gptq: GPTQ on the format's grid; llamacpp: llama.cpp's own "
        "quantizer (ggml_quantize_chunk, imatrix = calibration E[x²] when importance is on), as a baseline")
    gptq: GPTQSpec = GPTQSpec()
    importance: bool = Field(True, description="weight k-quant scale fits by calibration E[x²] (imatrix)")
    block_tuning: BlockTuningSpec = BlockTuningSpec()
    correct_row_scales: bool = Field(
        True, description="after encoding, rescale each output row's block scales by the least-squares factor of its "
        "output on calibration data (haloquant/row_scale.py); same bytes layout, a row is changed only where its "
        "output error drops")
    correct_input_scales: bool = Field(
        True, description="after encoding (and block tuning), rescale each linear group's input channels by least "
        "squares so the quantized outputs match the float model's on calibration data, block by block on the "
        "quantized model's own inputs (haloquant/input_scales.py): the factors go into the norm weights (q/k/v, "
        "gate/up) and the v and up rows' block scales (o, down); a group changes only where its output error drops")
    end_to_end: EndToEndSpec = EndToEndSpec()


class GateSpec(Strict):
    max_ppl_ratio: float | None = Field(None, gt=1.0, description="fail if quantized/float perplexity exceeds this")
    max_kl: float | None = Field(None, gt=0, description="fail if mean per-token KL (nats) exceeds this")
    max_runtime_ppl_gap: float | None = Field(
        None, gt=0, description="fail if llama.cpp's perplexity differs from torch's by more than this fraction"
    )


class ValidateSpec(Strict):
    text: FilePath = Field(description="held-out evaluation text (e.g. WikiText-2 test)")
    ctx: int = Field(512, ge=16)
    max_chunks: PositiveInt | None = Field(40, description="chunks of ctx tokens scored; null = all")
    batch_size: PositiveInt = 4
    runtimes: list[Literal["llama_cpp", "onnxruntime"]] = ["llama_cpp", "onnxruntime"]
    onnx_chunks: PositiveInt = Field(4, description="chunks on which onnxruntime's logits are compared with torch's")
    gate: GateSpec = GateSpec()


class GGUFSpec(Strict):
    name: str | None = Field(None, description="general.name written into the GGUF (default: folder name)")


class ONNXSpec(Strict):
    opset: int = Field(18, ge=14, le=21)
    accuracy_level: int = Field(0, ge=0, le=4, description="onnxruntime's MatMulNBits compute type: 0 = float32 "
                                "activations on the exact quantized weights (logits match torch's); 4 = int8 "
                                "activations (onnxruntime-genai's CPU default): faster decoding — much faster for "
                                "8-bit codes — but logits no longer match torch's (validate reports the perplexity)")


class ExportSpec(Strict):
    gguf: GGUFSpec = GGUFSpec()
    onnx: ONNXSpec = ONNXSpec()


LLAMA_CPP_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


class SweepSpec(Strict):
    """A size-vs-perplexity Pareto front: the pipeline at several budgets, with llama.cpp's presets
    (quantized by llama.cpp with the calibration imatrix) as reference points on the same plot."""

    bits_per_weight: list[float] = Field([3.0, 3.5, 4.0, 4.5, 5.0], min_length=1)
    presets: list[str] = ["Q3_K_M", "Q4_K_M", "Q5_K_M"]
    max_chunks: PositiveInt = Field(20, description="chunks of validate.ctx tokens scored by llama.cpp per point")

    @field_validator("bits_per_weight", mode="before")
    @classmethod
    def _float_literals(cls, v):
        if isinstance(v, list) and any(isinstance(b, int) and not isinstance(b, bool) for b in v):
            raise ValueError("write every budget as a float (4.0, not 4): DVC names each sweep stage after it")
        return v

    @field_validator("bits_per_weight")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(b <= 0 or b > 32 for b in v):
            raise ValueError("every budget must be in (0, 32] bits per weight")
        return v

    @field_validator("presets")
    @classmethod
    def _presets(cls, v: list[str]) -> list[str]:
        return _known_names(v, LLAMA_CPP_PRESETS, "llama.cpp preset")


class OrchestrationSpec(Strict):
    """Where the Prefect flows run their mapped tasks (the sweep's points and presets). No artifact
    depends on it: no stage fingerprint reads this section, so a point finished under one runner is
    a cache hit under another."""

    runner: Literal["local", "dask"] = Field(
        "local", description="local: one point at a time in this process; dask: points as tasks on a Dask cluster")
    address: str | None = Field(
        None, description="dask: the scheduler of an existing cluster (tcp://host:8786); null = a LocalCluster here")
    workers: PositiveInt = Field(2, description="dask with address null: worker processes of the LocalCluster")
    retries: int = Field(1, ge=0, le=10, description="re-runs of a task that raised (a task whose worker died is "
                                                     "re-run on another worker by Dask itself)")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError("a Dask scheduler address has a protocol, e.g. tcp://10.0.0.5:8786")
        return v


class Params(Strict):
    model: ModelSpec
    rotate: RotateSpec = RotateSpec()
    calibration: CalibrationSpec
    sensitivity: SensitivitySpec
    allocation: AllocationSpec
    fold: FoldSpec = FoldSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    validate_: ValidateSpec = Field(alias="validate")
    export: ExportSpec = ExportSpec()
    sweep: SweepSpec = SweepSpec()
    train_policy: TrainPolicySpec = TrainPolicySpec()
    orchestration: OrchestrationSpec = OrchestrationSpec()

    model_config = Strict.model_config | {"populate_by_name": True}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid spec"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the spec)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def parse_params(data: dict, source: str = "params.yaml", base_dir: Path | None = None) -> Params:
    """Validate a params mapping; relative paths are resolved against `base_dir`."""
    if not isinstance(data, dict):
        raise HaloquantError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        raise HaloquantError(_format_errors(e, source)) from None
    if base_dir is not None:
        params = _resolve_paths(params, base_dir)
    return params


def _resolve_paths(p: Params, base: Path) -> Params:
    def r(path: Path) -> Path:
        return path if path.is_absolute() else (base / path)

    return p.model_copy(
        update={
            "model": p.model.model_copy(update={"path": r(p.model.path)}),
            "calibration": p.calibration.model_copy(update={"text": r(p.calibration.text)}),
            "validate_": p.validate_.model_copy(update={"text": r(p.validate_.text)}),
            "allocation": p.allocation.model_copy(update={"policy": r(p.allocation.policy)}),
            "train_policy": p.train_policy.model_copy(update={"also_on": [r(x) for x in p.train_policy.also_on]}),
        }
    )


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    return parse_params(read_yaml(path, "params"), source=str(path), base_dir=path.resolve().parent)
