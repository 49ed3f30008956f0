"""Schemas of the artifacts stages write under artifacts/<stage>/ (JSON side of each).

An artifact is a function of its stage's inputs, spec, code and runtimes, so it holds nothing else:
no absolute paths (models and texts by name and content hash), no wall times (the runner keeps
those in artifacts/.timing/, outside every cache key). Two runs in two checkouts give the same
bytes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationReport(Artifact):
    model: str  # the model folder's name
    text_sha256: str
    n_sequences: int
    seq_len: int
    seed: int
    n_tokens: int
    stats_file: str
    # HF linear module name → key of its input statistics in the stats file (q/k/v share one)
    input_of: dict[str, str]
    output_head: str | None = "lm_head"  # the output head's module (its input is the tied embedding's)
    bos_id: int | None = None  # the token every calibration window starts with (None: none)
    device: str


class FormatCost(Artifact):
    bytes: int
    error: float  # estimated cost of storing this tensor in this format (lower is better)


class TensorSensitivity(Artifact):
    name: str
    gguf_name: str
    kind: str
    layer: int
    shape: tuple[int, int]
    n_weights: int
    candidates: dict[str, FormatCost]  # format name → cost; only formats the shape supports


class SensitivityTable(Artifact):
    metric: str
    formats: list[str]
    fixed_bytes: int  # tensors kept float32 (norms, biases), counted in every budget
    gguf_overhead_bytes: int = 0  # GGUF bytes beyond tensor data, upper bound (for file-size budgets)
    # checkpoint weights per weight of these tensors: < 1 for a widened copy, whose zero columns a
    # bits-per-weight budget does not count (haloquant/widening.py)
    source_weight_ratio: float = Field(1.0, gt=0, le=1)
    tensors: list[TensorSensitivity]

    @property
    def checkpoint_weights(self) -> float:
        """The weights a bits-per-weight budget and report count: the checkpoint's, not its widened copy's."""
        return sum(t.n_weights for t in self.tensors) * self.source_weight_ratio


class TensorEmbedding(Artifact):
    gguf_name: str
    values: list[float]  # haloquant.embedding.FEATURES, in that order


class LayerEmbeddings(Artifact):
    """RAMP's per-tensor embedding (haloquant/embedding.py documents each feature), in the
    sensitivity table's tensor order."""

    features: list[str]
    tensors: list[TensorEmbedding]


class TensorChoice(Artifact):
    name: str
    gguf_name: str
    format: str
    bytes: int
    bits_per_weight: float
    error: float
    onnx_bytes: int | None = None  # the ONNX export's initializers for it (haloquant/onnx_layout.py)


class AllocationResult(Artifact):
    solver: str
    budget_bytes: int  # for the quantizable tensors
    budget_spec: dict
    used_bytes: int
    total_bytes: int  # used_bytes + fixed_bytes: all tensor data in the GGUF
    bits_per_weight: float
    objective: float
    min_feasible_bits_per_weight: float
    tensors: list[TensorChoice]
    onnx_bytes: int | None = None  # Σ the tensors' onnx_bytes: the ONNX file's quantized weights
    onnx_budget_bytes: int | None = None  # allocation.onnx_budget × budget_bytes, where asked for
    refinement: dict | None = None  # allocation.refine: measured KL before/after, evaluations, kept moves


class PolicyCard(Artifact):
    """What a train_policy output folder holds besides policy.zip (the SB3 SAC model)."""

    algorithm: str  # "SAC (stable-baselines3 x.y)"
    features: list[str]
    obs_extra: list[str]
    bits_range: tuple[float, float]  # action [-1, 1] ↦ these bits per weight
    feature_mean: list[float]  # the training model's, standardising every model's embedding
    feature_std: list[float]
    formats: list[str]
    trained_on: list[dict]  # per training model: model path, metric, tensors
    budgets: list[float]
    timesteps: int
    seed: int
    net_arch: list[int]
    episodes: int
    seconds: float | None = None  # policies trained before wall times left the artifacts: SAC's learn()
    reward_evaluations: int  # reward lookups in the sensitivity table (one per step)
    final_proxy_regret: float  # cost / MILP optimum − 1 at the evaluation budgets, last curve point


class WideningPlan(Artifact):
    """The plan_widening stage's decision: whether `rotate` widens the stream (rotate.widen)."""

    widen: bool
    hidden: list[int] | None = None  # [checkpoint's hidden width, widened width] when widening
    reason: str
    smallest_bits: float | None = None  # rotate.widen auto: the smallest allocation's bits per checkpoint weight
    smallest_bits_widened: float | None = None  # … widened


class RotationRecord(Artifact):
    enabled: bool
    model: str  # the source model folder's name
    seed: int | None = None
    heads: bool | None = None
    untied_head: bool | None = None
    widened: list[int] | None = None  # [checkpoint's hidden width, widened width] (rotate.widen)
    files: dict[str, str] = {}  # the rotated folder's files → sha256: what the stages after it read


class FoldResult(Artifact):
    method: str
    scales_file: str | None
    groups: list[dict]


class QuantizedTensor(Artifact):
    name: str
    gguf_name: str
    format: str
    shape: tuple[int, int]
    bytes: int


class QuantizedManifest(Artifact):
    method: str
    model: str  # the model folder's name
    tensors_file: str
    quantized: list[QuantizedTensor]
    float_tensors: list[str]
    total_bytes: int
    n_weights: int
    bits_per_weight: float


class ExportReport(Artifact):
    format: str
    file: str
    bytes: int
    sha256: str
    tensor_types: dict[str, int]  # format → number of tensors
    writer: str | None = None  # GGUF: llama.cpp's converter release and code hash


class ValidationReport(Artifact):
    eval_text_sha256: str
    ctx: int
    n_chunks: int
    n_tokens_scored: int
    ppl_float: float
    ppl_quant: float
    ppl_ratio: float
    kl_mean: float
    gguf_bytes: int | None
    bits_per_weight: float
    runtimes: dict[str, dict]
    gate: dict
    passed: bool


class SweepPoint(Artifact):
    series: str  # "haloquant" or "llama.cpp+imatrix"
    label: str  # "3.5 bpw" or the preset name
    bits_per_weight: float  # over the quantized tensors
    gguf_bytes: int
    ppl: float  # llama.cpp's, on validate.text at validate.ctx, sweep.max_chunks chunks
    n_chunks: int
