from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict
from pydantic import Strict as StrictMode


class Strict(BaseModel):
    """Unknown keys are errors; values are not coerced across types ("64" is not a number, "yes"
    not a bool); only the types YAML cannot write are taken from their YAML form (`FilePath`
    from a string, `Pair` from a list)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


FilePath = Annotated[Path, StrictMode(False)]  # a path, written in YAML as a string
Pair = Annotated[tuple[float, float], StrictMode(False)]  # written in YAML as a two-item list
