"""Which llama.cpp pre-tokenizer a byte-level BPE vocabulary needs, read from its rules.

llama.cpp's converter recognises a BPE pre-tokenizer by hashing the tokens of a fixed text, which
identifies the *published* vocabularies it was updated for. A vocabulary retrained with the same
rules (a domain tokenizer, or the reference models here) has another hash and the converter
refuses it. This table names the llama.cpp pre-tokenizer whose splitting rules equal the HF
`pre_tokenizer` of tokenizer.json; the export's token check (llama.cpp's tokens = the HF
tokenizer's) then confirms the choice on real text.
"""

from __future__ import annotations

import json
from pathlib import Path

# HF tokenizers' ByteLevel(use_regex=True) split, GPT-2's
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DIGITS = r"\p{N}"

# sequence of splitting regexes (HF order) → tokenizer.ggml.pre of llama.cpp (src/llama-vocab.cpp)
BY_RULES: dict[tuple[str, ...], str] = {
    (GPT2,): "gpt-2",
    (LLAMA3,): "llama-bpe",
    (QWEN2,): "qwen2",
    (DIGITS, GPT2): "smollm",
}
NORMALIZERS_WITHOUT_EFFECT = (None, "NFC")  # NFC: Qwen2's; a no-op on already composed text


def _steps(pre: dict) -> list[str] | None:
    """The splitting regexes of an HF pre_tokenizer, or None where a step is not a plain split."""
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    out = []
    for s in steps:
        kind = s.get("type")
        if kind == "ByteLevel":
            if s.get("add_prefix_space"):
                return None
            if s.get("use_regex", True):
                out.append(GPT2)
        elif kind == "Split":
            pattern = s.get("pattern", {})
            if "Regex" not in pattern or s.get("behavior") != "Isolated" or s.get("invert"):
                return None
            out.append(pattern["Regex"])
        elif kind == "Digits" and s.get("individual_digits"):
            out.append(DIGITS)
        else:
            return None
    return out


def is_byte_level(model_dir: Path) -> bool:
    """A BPE over GPT-2's byte alphabet (a ByteLevel pre-tokenizer step), whatever else its
    tokenizer.json says (folders rebuilt by transformers' GGUF loader also set byte_fallback)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "ByteLevel" for s in steps)


def pretokenizer_by_rules(model_dir: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer of `model_dir`/tokenizer.json, or None if unknown."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text(encoding="utf-8"))
    norm = tok.get("normalizer") or {}
    normalizer = None if norm.get("type") == "Sequence" and not norm.get("normalizers") else norm.get("type")
    if normalizer not in NORMALIZERS_WITHOUT_EFFECT or (tok.get("model") or {}).get("type") != "BPE":
        return None
    steps = _steps(tok.get("pre_tokenizer") or {})
    return None if steps is None else BY_RULES.get(tuple(steps))
