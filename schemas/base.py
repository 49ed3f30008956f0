from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict
from pydantic import Strict as StrictMode

from haloquant import HaloquantError


class Strict(BaseModel):
    """Unknown keys are errors; values are not coerced across types ("64" is not a number, "yes"
    not a bool); only the types YAML cannot write are taken from their YAML form (`FilePath`
    from a string, `Pair` from a list)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


FilePath = Annotated[Path, StrictMode(False)]  # a path, written in YAML as a string
Pair = Annotated[tuple[float, float], StrictMode(False)]  # written in YAML as a two-item list


def read_yaml(path: Path, what: str) -> object:
    """A spec file's YAML (`what`: "params", "fleet"), or a HaloquantError naming the file."""
    if not path.is_file():
        raise HaloquantError(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HaloquantError(f"{path}: not valid YAML: {e}") from None
