"""`migchain`: the admin's command line; each verb is a thin wrapper over the loader or the core."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from extender.config import ConfigError, load_rules
from extender.core.mig import short_name


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


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="migchain", description="migchain: MIG borrowing for kube-scheduler")
    verbs = cli.add_subparsers(dest="verb", required=True)
    chains = verbs.add_parser("chains", help="work with chain rule files")
    chain_verbs = chains.add_subparsers(dest="chains_verb", required=True)
    validate = chain_verbs.add_parser("validate", help="check rule files; exit 1 on any problem")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(run=_validate)
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
