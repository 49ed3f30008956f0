"""The model-family registry, by HF architecture name (config.json `architectures`).

Adding a family: one module here defining its `Family` (haloquant/families/base.py says what it
holds), its entry in `_MODULES`, and its entry in tests/test_families.py's conformance table.
"""

from __future__ import annotations

from haloquant import HaloquantError
from haloquant.families import gemma, llama, phi3, qwen2, qwen3
from haloquant.families.base import Family, NormFeeds, RowsFeed  # noqa: F401

_MODULES = (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma.GEMMA2, gemma.GEMMA3, phi3.FAMILY)
FAMILIES: dict[str, Family] = {arch: f for f in _MODULES for arch in f.architectures}


def family_of_architecture(arch: str, where: str = "model.path") -> Family:
    try:
        return FAMILIES[arch]
    except KeyError:
        raise HaloquantError(f"{where}: architecture {arch!r} is not supported; supported: "
                             f"{', '.join(sorted(FAMILIES))}") from None


def architecture_of(model) -> str:
    """The HF architecture of a loaded model: its config's (as saved), else its class's name."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return archs[0]


def family(model) -> Family:
    return family_of_architecture(architecture_of(model))
