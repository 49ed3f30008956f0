"""fleet_report: every member's sweep and pipeline point in one cross-model table and plot.

Models differ in size, so the plot's axis is bits per weight, and the pipeline point carries the
quantized/float perplexity ratio, which compares across models where perplexities do not.
"""

from __future__ import annotations

from pathlib import Path

from haloquant import HaloquantError
from haloquant.artifacts import atomic_path, read_artifact, read_json, write_json
from haloquant.schemas.artifacts import SweepPoint, ValidationReport
from haloquant.schemas.fleet import Fleet, FleetMember, FleetReport
from haloquant.tasks.pareto import PLOT_FILE

REPORT_FILE, TABLE_FILE = "report.json", "report.md"
PIPELINE_KEYS = ("bits_per_weight", "gguf_bytes", "ppl_float", "ppl_quant", "ppl_ratio", "kl_mean")


def report_fleet(fleet: Fleet) -> FleetReport:
    """The fleet_report stage: every member's validate report and Pareto points, gathered."""
    missing = [f"{n}: {p}" for n in fleet.members for p in member_inputs(fleet.member_root(n)) if not p.is_file()]
    if missing:
        raise HaloquantError("fleet_report needs every member's validate and pareto stages first; missing: "
                             + "; ".join(missing))
    return fleet_report({n: fleet.member_root(n) for n in fleet.members}, fleet.report_dir)


def member_inputs(root: Path) -> tuple[Path, Path]:
    """What the report reads from a member's artifacts root."""
    return root / "validate" / "report.json", root / "pareto" / PLOT_FILE


def fleet_report(members: dict[str, Path], out: Path) -> FleetReport:
    """`members`: member name → its artifacts root (validate and pareto finished there)."""
    gathered = {}
    for name, root in members.items():
        validation_file, pareto_file = member_inputs(root)
        v = read_artifact(validation_file, ValidationReport)
        points = [SweepPoint.model_validate(p) for p in read_json(pareto_file)]
        model = read_json(root / "calibrate" / "calibration.json")["model"]
        gathered[name] = FleetMember(model=model, pipeline={k: getattr(v, k) for k in PIPELINE_KEYS}, points=points)
    report = FleetReport(members=gathered)
    write_json(out / REPORT_FILE, report.model_dump())
    write_json(out / PLOT_FILE, [{"member": n, **p.model_dump(), "series": f"{n}: {p.series}"}
                                 for n, m in gathered.items() for p in m.points])
    with atomic_path(out / TABLE_FILE) as tmp:
        tmp.write_text(markdown(report))
    return report


def markdown(report: FleetReport) -> str:
    lines = ["| member | model | series | point | bits/weight | GGUF bytes | llama.cpp ppl (chunks) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report.members.items():
        pl = m.pipeline
        lines.append(f"| {name} | {m.model} | pipeline | budget | {pl['bits_per_weight']:.3f} | "
                     f"{pl['gguf_bytes'] or 0:,} | torch {pl['ppl_quant']:.3f} = ×{pl['ppl_ratio']:.4f} of float |")
        for p in m.points:
            lines.append(f"| {name} | {m.model} | {p.series} | {p.label} | {p.bits_per_weight:.3f} | "
                         f"{p.gguf_bytes:,} | {p.ppl:.3f} ({p.n_chunks}) |")
    return "\n".join(lines) + "\n"
