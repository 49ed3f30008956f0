"""haloquant: declarative mixed-precision post-training quantization of causal LMs."""

__version__ = "0.1.0"


class HaloquantError(Exception):
    """A user-facing error: bad spec, bad input file, infeasible budget.

    The CLI prints its message (which names the field or file at fault) and exits non-zero.
    """
