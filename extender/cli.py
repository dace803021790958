"""`migchain`: the admin's command line; each verb is a thin wrapper over the loader or the core."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from extender.config import ConfigError, load_rules
from extender.core.mig import short_name
from extender.sim.engine import SimPolicy


def _validate(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(args.files)
    except ConfigError as error:
        print(error, file=sys.stderr)
        print(f"{len(error.problems)} problem(s) found", file=sys.stderr)
        return 1
    for chain in rules.chains:
        print(f"ok  {chain.source}: chain {chain.name}: {' -> '.join(short_name(t) for t in chain.types)}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from extender.sim.report import run_policies

    try:
        rules = load_rules(args.chains)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    try:
        report = run_policies(Path(args.fleet), rules, args.workload, args.openb, [SimPolicy(p) for p in args.policy])
    except ValueError as error:  # FleetError, trace errors: they name the file and field
        print(f"migchain simulate: {error}", file=sys.stderr)
        return 1
    print(report.json() if args.output == "json" else report.table())
    return 0


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="migchain", description="migchain: MIG borrowing for kube-scheduler")
    verbs = cli.add_subparsers(dest="verb", required=True)
    chains = verbs.add_parser("chains", help="work with chain rule files")
    chain_verbs = chains.add_subparsers(dest="chains_verb", required=True)
    validate = chain_verbs.add_parser("validate", help="check rule files; exit 1 on any problem")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(run=_validate)
    simulate = verbs.add_parser("simulate", help="replay a workload on a fleet under borrowing policies")
    simulate.add_argument("--fleet", required=True, metavar="FLEET.yaml", help="GPUs per model and their MIG layout")
    simulate.add_argument("--chains", nargs="+", required=True, metavar="FILE", help="chain rule files")
    source = simulate.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", metavar="TRACE.csv", help="a trace in migchain's CSV format (bench/README.md)")
    source.add_argument("--openb", metavar="POD_LIST.csv", help="an Alibaba 2023 GPU trace pod list (openb)")
    simulate.add_argument(
        "--policy",
        nargs="+",
        default=[p.value for p in SimPolicy],
        choices=[p.value for p in SimPolicy],
        help="static (no borrowing), eager (reference returns), on-demand (ours); default: all three",
    )
    simulate.add_argument("-o", "--output", choices=["table", "json"], default="table")
    simulate.set_defaults(run=_simulate)
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
