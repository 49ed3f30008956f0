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
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.cmd == "check":
            from haloquant.tasks.runner import check

            print(check(args.params))
        elif args.cmd == "stage":
            from haloquant.tasks.runner import describe, run_stage

            print(describe(args.name, run_stage(args.name, args.params)))
        elif args.cmd == "run":
            from haloquant.tasks.runner import describe, run_all

            for name, out in run_all(args.params).items():
                print(describe(name, out))
        elif args.cmd == "flow":
            from haloquant.flows.pipeline import haloquant_pipeline, haloquant_sweep, train_policy_flow

            flow = train_policy_flow if args.train_policy else haloquant_sweep if args.sweep else haloquant_pipeline
            flow(str(args.params))
        elif args.cmd == "dvc-yaml":
            from haloquant.tasks.runner import dvc_yaml

            sys.stdout.write(dvc_yaml())
        elif args.cmd == "serve":
            from haloquant.flows.deploy import serve

            serve(str(args.params), args.cron)
    except HaloquantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
