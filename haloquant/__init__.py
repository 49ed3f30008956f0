"""haloquant: declarative mixed-precision post-training quantization of causal LMs."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The stage, flow and schema packages live in the repository's top-level folders tasks/, flows/ and
# schemas/, installed as haloquant.tasks, haloquant.flows, haloquant.schemas (pyproject.toml). When
# this package is imported from a checkout (a copy of the project, or the working tree while an
# editable install points at another), they resolve from that same checkout, never from another.
_checkout = _Path(__file__).resolve().parent.parent
if all((_checkout / p / "__init__.py").is_file() for p in ("tasks", "flows", "schemas")):
    __path__.append(str(_checkout))  # noqa: F821  (a package's __path__)


class HaloquantError(Exception):
    """A user-facing error: bad spec, bad input file, infeasible budget.

    The CLI prints its message (which names the field or file at fault) and exits non-zero.
    """
