from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors; values are not silently coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)
