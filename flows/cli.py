"""`haloquant` command line: check a spec, run a stage, run the pipeline, generate dvc.yaml."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from haloquant import HaloquantError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="haloquant", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate params.yaml and its input files without running anything")
    c.add_argument("--params", default="params.yaml", type=Path)
    s = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    s.add_argument("name")
    s.add_argument("--params", default="params.yaml", type=Path)
    r = sub.add_parser("run", help="run every stage in order, uncached (use dvc repro or `flow` for caching)")
    r.add_argument("--params", default="params.yaml", type=Path)
    f = sub.add_parser("flow", help="run the Prefect flow (cached per stage)")
    f.add_argument("--params", default="params.yaml", type=Path)
    f.add_argument("--sweep", action="store_true", help="run the budget sweep flow (Pareto front) instead")
    f.add_argument("--train-policy", action="store_true", help="run the train-policy flow (SAC allocator) instead")
    sub.add_parser("dvc-yaml", help="print dvc.yaml generated from the stage registry")
    d = sub.add_parser("serve", help="serve the scheduled Prefect deployment (needs PREFECT_API_URL)")
    d.add_argument("--params", default="params.yaml", type=Path)
    d.add_argument("--cron", default="0 3 * * *")
    ro = sub.add_parser("rotate", help="write a rotated copy of a model folder (haloquant/rotation.py): the same "
                        "function, outlier channels spread; quantize it with model.path set to OUT")
    ro.add_argument("source", type=Path, help="Hugging Face model folder (safetensors)")
    ro.add_argument("out", type=Path, help="folder to write (replaced if present)")
    ro.add_argument("--seed", type=int, default=0)
    ro.add_argument("--no-heads", action="store_true", help="rotate the residual stream only, not each v → o head")
    ro.add_argument("--float32", action="store_true", help="rotated tensors in float32 (default: the source's dtype)")
    wi = sub.add_parser("widen", help="write a copy of a model folder with the residual stream padded to whole "
                        "256-blocks (haloquant/widening.py): the same function, k-quants and i-quants on every "
                        "stream-reading linear")
    wi.add_argument("source", type=Path, help="Hugging Face model folder (safetensors)")
    wi.add_argument("out", type=Path, help="folder to write (replaced if present)")
    wi.add_argument("--multiple", type=int, default=256, help="pad the hidden width to a multiple of this")
    wi.add_argument("--float32", action="store_true", help="widened tensors in float32 (default: the source's dtype)")
    fl = sub.add_parser("fleet", help="several models as one (fleet.yaml): check, generate DVC files, run, serve")
    fl.add_argument("action", choices=["check", "dvc-yaml", "flow", "report", "serve"],
                    help="check: every member's spec; dvc-yaml: write each member's dvc.yaml and the fleet's "
                         "(--check: fail if stale); flow: run the fleet's Prefect flow; report: the cross-model "
                         "report (DVC's fleet_report stage); serve: the scheduled fleet deployment")
    fl.add_argument("fleet", type=Path, help="the fleet file (fleet.yaml)")
    fl.add_argument("--check", action="store_true", help="dvc-yaml: only compare, exit 2 if a file is stale")
    fl.add_argument("--cron", default="0 3 * * *")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    _print_haloquant_logs()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.cmd == "check":
            from haloquant.tasks.runner import check

            print(check(args.params))
        elif args.cmd == "stage":
            from haloquant.tasks.runner import run_stage

            run_stage(args.name, args.params)  # logs its summary line
        elif args.cmd == "run":
            from haloquant.tasks.runner import run_all

            run_all(args.params)  # each stage logs its summary line as it ends
        elif args.cmd == "flow":
            from haloquant.flows.pipeline import haloquant_pipeline, haloquant_sweep, train_policy_flow

            flow = train_policy_flow if args.train_policy else haloquant_sweep if args.sweep else haloquant_pipeline
            flow(str(args.params))
        elif args.cmd == "dvc-yaml":
            from haloquant.tasks.runner import dvc_yaml

            sys.stdout.write(dvc_yaml())
        elif args.cmd == "rotate":
            import torch

            from haloquant.rotation import write_rotated

            report = write_rotated(args.source, args.out, args.seed, not args.no_heads,
                                   torch.float32 if args.float32 else None)
            print(f"rotated {args.source} → {args.out}: hidden {report['hidden']}, seed {report['seed']}"
                  + (", head untied" if report["untied_head"] else ""))
        elif args.cmd == "widen":
            import torch

            from haloquant.widening import write_widened

            report = write_widened(args.source, args.out, args.multiple, torch.float32 if args.float32 else None)
            print(f"widened {args.source} → {args.out}: hidden {report['hidden'][0]} → {report['hidden'][1]}")
        elif args.cmd == "fleet":
            _fleet(args)
        elif args.cmd == "serve":
            from haloquant.flows.deploy import serve

            serve(str(args.params), args.cron)
    except HaloquantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _print_haloquant_logs() -> None:
    """The library's progress and stage lines ("haloquant.*" loggers) on stderr, message only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("haloquant")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fleet(args) -> None:
    from haloquant.schemas.fleet import load_fleet

    if args.action == "check":
        from haloquant.tasks.fleet import preflight_fleet

        fleet = load_fleet(args.fleet)
        preflight_fleet(fleet)
        print(f"{fleet.path}: ok — {len(fleet.members)} members: " + ", ".join(
            f"{n} ({p.model.path.name})" for n, p in fleet.members.items()))
    elif args.action == "dvc-yaml":
        from haloquant.tasks.fleet import write_fleet_dvc

        written = write_fleet_dvc(args.fleet, check=args.check)
        print(("up to date" if args.check else "wrote " + ", ".join(map(str, written))) if written or args.check
              else "every dvc.yaml of the fleet was up to date")
    elif args.action == "report":
        from haloquant.tasks.fleet_report import report_fleet

        fleet = load_fleet(args.fleet)
        report = report_fleet(fleet)
        print(f"fleet_report: {len(report.members)} members, "
              f"{sum(len(m.points) for m in report.members.values())} points → {fleet.report_dir}")
    elif args.action == "flow":
        from haloquant.flows.pipeline import haloquant_fleet

        haloquant_fleet(str(args.fleet))
    elif args.action == "serve":
        from haloquant.flows.deploy import serve_fleet

        serve_fleet(str(args.fleet), args.cron)


if __name__ == "__main__":
    sys.exit(main())
