"""The fleet spec (fleet.yaml): several models, each a complete params.yaml of its own, run as one.

A member is a folder with its own params.yaml (its model, budgets, rules, sweep) and so its own
artifacts/ and its own generated dvc.yaml; the fleet file names the members and where their
mapped tasks run. `load_fleet` checks every member's spec too, so a bad member is named before
anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from haloquant import HaloquantError
from haloquant.schemas.artifacts import Artifact, SweepPoint
from haloquant.schemas.base import FilePath, Strict, read_yaml
from haloquant.schemas.params import OrchestrationSpec, Params, _format_errors, load_params

MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FleetSpec(Strict):
    members: dict[str, FilePath] = Field(min_length=1, description="member name → its params.yaml (relative to "
                                         "fleet.yaml); each member's artifacts are written beside its params file")
    orchestration: OrchestrationSpec = Field(OrchestrationSpec(), description="where the fleet flow runs its tasks")

    @field_validator("members")
    @classmethod
    def _members(cls, v: dict[str, Path]) -> dict[str, Path]:
        bad = [k for k in v if not MEMBER_NAME.match(k)]
        if bad:
            raise ValueError(f"member names {bad}: use letters, digits, '.', '_' and '-' (a name labels stages and "
                             "plot series)")
        for name, path in v.items():
            if path.name != "params.yaml":
                raise ValueError(f"member {name!r}: expected a path to a file named params.yaml (DVC reads a "
                                 f"member's params from params.yaml beside its dvc.yaml), got {str(path)!r}")
        return v


class Fleet:
    """A loaded fleet: its spec, where it lives, and every member's checked params."""

    def __init__(self, path: Path, spec: FleetSpec, members: dict[str, Params]):
        self.path, self.spec, self.members = path, spec, members

    @property
    def folder(self) -> Path:
        return self.path.parent

    def params_file(self, name: str) -> Path:
        p = self.spec.members[name]
        return (p if p.is_absolute() else self.folder / p).resolve()

    def member_folder(self, name: str) -> Path:
        return self.params_file(name).parent

    def member_root(self, name: str) -> Path:
        """The member's artifacts root: artifacts/ beside its params.yaml, as for any params file."""
        return self.member_folder(name) / "artifacts"

    @property
    def report_dir(self) -> Path:
        return self.folder / "artifacts" / "fleet"


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path).resolve()
    data = read_yaml(path, "fleet")
    if not isinstance(data, dict):
        raise HaloquantError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = FleetSpec.model_validate(data)
    except ValidationError as e:
        raise HaloquantError(_format_errors(e, str(path))) from None
    fleet = Fleet(path, spec, {})
    folders: dict[Path, str] = {}
    for name in spec.members:
        params_file = fleet.params_file(name)
        if not params_file.is_file():
            raise HaloquantError(f"{path}: members.{name}: params file {params_file} not found")
        if params_file.parent in folders:
            raise HaloquantError(f"{path}: members.{name} and members.{folders[params_file.parent]} share the folder "
                                 f"{params_file.parent}: each member needs its own (its artifacts go there)")
        if params_file.parent == fleet.folder:
            raise HaloquantError(f"{path}: members.{name}: the member's params.yaml must be in a folder of its own, "
                                 f"not beside fleet.yaml (the fleet's report is written to {fleet.folder}/artifacts)")
        folders[params_file.parent] = name
        try:
            fleet.members[name] = load_params(params_file)
        except HaloquantError as e:
            raise HaloquantError(f"{path}: members.{name}: {e}") from None
    return fleet


class FleetMember(Artifact):
    model: str  # the model folder's name
    pipeline: dict  # the main pipeline's point: bits_per_weight, gguf_bytes, ppl_float, ppl_quant, ppl_ratio, kl_mean
    points: list[SweepPoint]  # its sweep and llama.cpp presets (pareto/pareto.json)


class FleetReport(Artifact):
    """The fleet_report stage's artifact (tasks/fleet_report.py)."""

    members: dict[str, FleetMember]
