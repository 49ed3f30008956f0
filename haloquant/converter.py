"""llama.cpp's own HF→GGUF converter, driven in-process to write haloquant's GGUF files.

Everything in the file except the quantized weights' bytes — hyper-parameters, RoPE scaling and
its factor tensors, the tokenizer of every kind llama.cpp knows (BPE with its pre-tokenizer,
SentencePiece, Gemma's), special tokens and their flags, the chat template, tensor names and each
family's tensor transforms — is written by the converter of the llama.cpp that judges the file:
`convert_hf_to_gguf.py`'s `conversion` package and the gguf-py it is written against, unpacked
by scripts/install.sh from the llama-cpp-python sdist that builds that llama.cpp.

How haloquant's bytes get into the file. The converter maps each HF tensor to GGUF tensors with
its `modify_tensors` (renames, q/k row permutations, row slices such as Gemma 3's trimmed
embedding, norm offsets). For a quantized weight haloquant runs that function on two probes, a
matrix holding each element's row index and one holding its column index, and reads off which
source row every GGUF row is. Rows are self-contained in every llama.cpp block format, so a row
gather of the encoded bytes is exact; a transform that mixes values, moves columns or joins
tensors is refused, naming the tensor. Float tensors (norms, biases) are haloquant's own values
run through the converter like a checkpoint's, so e.g. Gemma's (1 + w) norm offset applies to them.

A BPE vocabulary the converter does not recognise by its hash (a retrained tokenizer) is named by
its splitting rules instead (haloquant/pretokenizers.py); a byte-level BPE is never read as a
SentencePiece-style one (the converter's LlamaHfVocab guesses that from flags that folders made
by transformers' GGUF loader get wrong).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from haloquant import HaloquantError
from haloquant.hfcompat import model_view
from haloquant.pretokenizers import is_byte_level, pretokenizer_by_rules

ENV_DIR = "HALOQUANT_LLAMA_CONVERTER"


def converter_dir() -> Path:
    """Where scripts/install.sh put llama.cpp's converter (or $HALOQUANT_LLAMA_CONVERTER)."""
    return Path(os.environ.get(ENV_DIR) or Path(sys.prefix) / "share" / "haloquant" / "llama.cpp")


@functools.cache
def _conversion():
    d = converter_dir()
    if not (d / "conversion" / "__init__.py").is_file():
        raise HaloquantError(f"llama.cpp's converter is not installed in {d} (scripts/install.sh installs it, "
                             f"or set {ENV_DIR})")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    try:
        import conversion
    except (ImportError, AttributeError) as e:
        raise HaloquantError(f"llama.cpp's converter in {d} does not import ({e}); it needs the gguf-py it ships "
                             "with (scripts/install.sh installs both)") from e
    if Path(conversion.__file__).resolve().parent != (d / "conversion").resolve():
        raise HaloquantError(f"another package named 'conversion' ({conversion.__file__}) hides llama.cpp's converter")
    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)  # its pre-tokenizer banner: handled below
    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)  # keys the converter itself writes twice
    return conversion


@functools.cache
def version() -> str:
    """The converter's release and a hash of its code: part of the export's cache key."""
    d = converter_dir()
    h = hashlib.sha256()
    for f in sorted((d / "conversion").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    release = (d / "VERSION").read_text().strip() if (d / "VERSION").is_file() else "unknown"
    return f"{release} {h.hexdigest()[:16]}"


def architecture(model_dir: Path) -> str:
    """The HF architecture whose conversion writes this folder: its own, or for a widened copy
    (haloquant/widening.py) the one its family names where llama.cpp's own graph cannot take the width."""
    from haloquant.families import FAMILIES
    from haloquant.widening import REPORT

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        raise HaloquantError(f"model.path: {model_dir}/config.json names no architecture (\"architectures\")")
    fam = FAMILIES.get(archs[0])
    if fam is not None and fam.widened_gguf_architecture and (Path(model_dir) / REPORT).is_file():
        return fam.widened_gguf_architecture
    return archs[0]


def class_of(arch: str) -> type:
    """The converter's model class for an HF architecture name."""
    try:
        return _conversion().get_model_class(arch)
    except NotImplementedError:
        raise HaloquantError(f"model.path: llama.cpp's converter has no GGUF mapping for architecture {arch!r}") from None


def model_class(model_dir: Path) -> type:
    return class_of(architecture(model_dir))


def gguf_arch(arch: str) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture the converter writes an HF architecture as."""
    return class_of(arch).model_arch


@dataclass(frozen=True)
class EncodedTensor:
    """One quantized weight: llama.cpp block bytes, one row of blocks per weight row."""

    data: np.ndarray  # uint8 (rows, bytes per row)
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, int]


@dataclass
class GGUFPlan:
    """What the converter made of the tensors: GGUF name → (HF name, source rows or None), and
    the type of each written tensor."""

    sources: dict[str, tuple[str, np.ndarray | None]]
    types: dict[str, str]
    nbytes: dict[str, int] = field(default_factory=dict)  # (header_bytes) data bytes per GGUF tensor


def row_sources(out: torch.Tensor, out_cols: torch.Tensor, shape: tuple[int, int], hf_name: str,
                gguf_name: str) -> np.ndarray:
    """Source row of every row of a transformed weight, from the transformed row- and column-index
    probes; refuses anything that is not a gather of whole rows."""
    rows, cols = shape
    bad = HaloquantError(f"export_gguf: llama.cpp's converter writes {gguf_name} from {hf_name} by a transform "
                         "that is not a selection of whole rows; haloquant cannot apply it to quantized bytes")
    if out.ndim != 2 or out.shape[1] != cols or out_cols.shape != out.shape:
        raise bad
    first = out[:, :1]
    if out.stride(1) != 0 and not torch.equal(out, first.expand_as(out)):
        raise bad
    if not torch.equal(out_cols, torch.arange(cols, dtype=out_cols.dtype).expand_as(out_cols)):
        raise bad
    src = first[:, 0]
    if not torch.equal(src, src.round()) or src.min() < 0 or src.max() >= rows:
        raise bad
    return src.to(torch.int64).numpy()


def _driver(base: type, quantized: dict[str, EncodedTensor], floats: dict[str, np.ndarray], plan: GGUFPlan,
            header_only: bool) -> type:
    """The converter's model class, fed haloquant's tensors instead of the checkpoint's."""

    class HaloquantConversion(base):
        model_arch = base.model_arch

        def index_tensors(self, remote_hf_model_id=None):
            gens = {n: (lambda n=n: torch.zeros(1)) for n in quantized}
            gens.update({n: (lambda v=v: torch.from_numpy(np.ascontiguousarray(v, np.float32))) for n, v in floats.items()})
            out = {}
            for item in gens.items():
                if kept := self.filter_tensors(item):
                    if kept[0] != item[0] and item[0] in quantized:
                        raise HaloquantError(f"export_gguf: the converter renames {item[0]} to {kept[0]} before "
                                             "mapping it; unsupported for a quantized tensor")
                    out[kept[0]] = kept[1]
            return out

        def modify_tensors(self, data_torch, name, bid):
            q = quantized.get(name)
            if q is None:
                for new_name, t in super().modify_tensors(data_torch, name, bid):
                    plan.sources[new_name] = (name, None)
                    yield new_name, t
                return
            rows, cols = q.shape
            by_row = list(super().modify_tensors(
                torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, cols), name, bid))
            by_col = list(super().modify_tensors(
                torch.arange(cols, dtype=torch.float64)[None, :].expand(rows, cols), name, bid))
            if not by_row or [n for n, _ in by_row] != [n for n, _ in by_col]:
                raise HaloquantError(f"export_gguf: llama.cpp's converter joins {name} with other tensors; "
                                     "haloquant cannot write that from quantized bytes")
            for (new_name, r), (_, c) in zip(by_row, by_col):
                plan.sources[new_name] = (name, row_sources(r, c, q.shape, name, new_name))
                yield new_name, torch.zeros(1)  # a stand-in: add_tensor below writes the bytes

        def _set_vocab_llama_hf(self):
            if is_byte_level(self.dir_model):  # GPT-2's kind, not a SentencePiece-style BPE: next in the chain
                raise FileNotFoundError("a byte-level BPE vocabulary")
            return super()._set_vocab_llama_hf()

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                pre = pretokenizer_by_rules(self.dir_model)
                if pre is None:
                    raise HaloquantError(f"model.path: llama.cpp's converter does not recognise the BPE pre-tokenizer "
                                         f"of {self.dir_model}/tokenizer.json, nor does haloquant by its rules") from None
                return pre

    return HaloquantConversion


def _add_tensor(writer, quantized: dict[str, EncodedTensor], plan: GGUFPlan, header_only: bool):
    """gguf_writer.add_tensor that writes haloquant's bytes for the quantized weights' stand-ins."""
    plain = writer.add_tensor

    def add_tensor(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
        hf_name, rows = plan.sources.get(name, (None, None))
        if rows is not None:
            q = quantized[hf_name]
            data = np.ascontiguousarray(q.data if np.array_equal(rows, np.arange(q.shape[0])) else q.data[rows])
            raw_shape, raw_dtype, tensor = data.shape, q.ggml_type, data
        plan.types[name] = gguf.GGMLQuantizationType(raw_dtype).name if raw_dtype is not None else \
            ("F16" if tensor.dtype == np.float16 else "F32")
        if header_only:  # shapes and types only: no data is kept
            shape = raw_shape if raw_shape is not None else tensor.shape
            return writer.add_tensor_info(name, shape, tensor.dtype, tensor.nbytes, raw_dtype=raw_dtype)
        return plain(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, tensor_endianess=tensor_endianess)

    return add_tensor


class _FalseMistralRegexAlarm(logging.Filter):
    """transformers 4.57.3–4.57.6 warn of "an incorrect regex pattern" in every local folder saved by
    those versions, whatever its model type (transformers#44031, fixed in 5.x). The converter's own
    AutoTokenizer call cannot say "not Mistral's" as haloquant.modelio.load_tokenizer does, so the
    false alarm is dropped while a non-Mistral model converts; the tokens are checked anyway (validate)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "with an incorrect regex pattern" not in record.getMessage()


@contextlib.contextmanager
def _no_false_mistral_alarm(model_dir: Path) -> Iterator[None]:
    from haloquant.modelio import MISTRAL_REGEX_MODEL_TYPES, read_config

    if read_config(model_dir).get("model_type") in MISTRAL_REGEX_MODEL_TYPES:
        yield
        return
    emitter, alarm = logging.getLogger("transformers.tokenization_utils_base"), _FalseMistralRegexAlarm()
    emitter.addFilter(alarm)
    try:
        yield
    finally:
        emitter.removeFilter(alarm)


@contextlib.contextmanager
def _converter(model_dir: Path, quantized: dict[str, EncodedTensor], floats: dict[str, np.ndarray],
               out: Path, name: str | None, file_type: gguf.LlamaFileType, add_bos: bool | None,
               header_only: bool) -> Iterator[tuple]:
    plan = GGUFPlan({}, {})
    with model_view(model_dir) as view, torch.inference_mode(), _no_false_mistral_alarm(view):
        cls = _driver(model_class(view), quantized, floats, plan, header_only)
        conv = cls(view, gguf.LlamaFileType.ALL_F32, out, model_name=name)
        conv.gguf_writer.add_tensor = _add_tensor(conv.gguf_writer, quantized, plan, header_only)
        conv.prepare_tensors()
        missing = set(quantized) - {hf for hf, rows in plan.sources.values() if rows is not None}
        if missing:
            raise HaloquantError(f"export_gguf: llama.cpp's converter wrote no GGUF tensor for {sorted(missing)[:3]}")
        conv.ftype = file_type
        conv.prepare_metadata(vocab_only=False)
        if add_bos is not None:  # the user's model.add_bos, as gguf-set-metadata would set it
            for kv in conv.gguf_writer.kv_data:
                kv.pop(gguf.Keys.Tokenizer.ADD_BOS, None)
            conv.gguf_writer.add_add_bos_token(add_bos)
        yield conv, plan


def write_gguf(path: Path, model_dir: Path, quantized: dict[str, EncodedTensor], floats: dict[str, np.ndarray],
               name: str | None, file_type: gguf.LlamaFileType, add_bos: bool | None = None) -> GGUFPlan:
    """Write the GGUF of these tensors (HF names) to `path` (not atomically: the caller renames)."""
    with _converter(Path(model_dir), quantized, floats, Path(path), name, file_type, add_bos, False) as (conv, plan):
        w = conv.gguf_writer
        w.write_header_to_file(path=Path(path))
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return plan


def header_bytes(model_dir: Path, quantized: dict[str, EncodedTensor], floats: dict[str, np.ndarray],
                 name: str | None, add_bos: bool | None = None) -> tuple[int, GGUFPlan]:
    """Bytes of the GGUF before its tensor data (header, metadata, tensor infos), and the plan;
    tensor infos do not depend on the types, so any `quantized` of the right shapes will do."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "header.gguf"
        with _converter(Path(model_dir), quantized, floats, path, name, gguf.LlamaFileType.ALL_F32, add_bos,
                        True) as (conv, plan):
            w = conv.gguf_writer
            w.write_header_to_file(path=path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            plan.nbytes = {n: ti.nbytes for part in w.tensors for n, ti in part.items()}
            w.close()
        return path.stat().st_size, plan
