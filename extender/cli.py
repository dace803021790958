"""`migchain`: the admin's command line; each verb is a thin wrapper over the loader or the core."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from extender.config import ConfigError, load_rules
from extender.core.cluster import MIGCHAIN_SCHEDULER
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
    for warning in rules.cross_file_overlaps():  # valid, but one file's policy now limits the other's chains
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _rule_files(target: str) -> list[Path]:
    """A rules file, or every *.yaml of a folder (a mounted ConfigMap, chains/)."""
    path = Path(target)
    return sorted(path.glob("*.yaml")) if path.is_dir() else [path]


def _diff(args: argparse.Namespace) -> int:
    from extender.core.chains_diff import diff_rules

    loaded = []
    for target in (args.old, args.new):
        try:
            loaded.append(load_rules(_rule_files(target)))
        except ConfigError as error:
            print(f"{target}:\n{error}", file=sys.stderr)
            return 2
    lines = diff_rules(*loaded)
    print("\n".join(lines) if lines else "no change for the scheduler")
    return 1 if lines else 0


def _simulate(args: argparse.Namespace) -> int:
    from extender.sim.report import Report, run_policies

    try:
        rules = load_rules(args.chains)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    policies = [SimPolicy(p) for p in args.policy]
    report: Report
    try:
        if args.from_cluster:
            from extender.kube.snapshot import open_cluster
            from extender.sim.from_cluster import run_from_cluster, starting_state

            cluster = open_cluster(args.kubeconfig, args.loan_key_file, _warn("migchain simulate"))
            start = starting_state(cluster.snapshot, cluster.records)
            report = run_from_cluster(start, rules, args.workload, args.openb, policies, skipped=cluster.skipped)
        else:
            report = run_policies(Path(args.fleet), rules, args.workload, args.openb, policies)
    except ValueError as error:  # FleetError, trace errors, an unreachable cluster: they say where
        print(f"migchain simulate: {error}", file=sys.stderr)
        return 1
    print(report.json() if args.output == "json" else report.table())
    return 0


def _certs(args: argparse.Namespace) -> int:
    import datetime

    from extender.certs import migchain_leaves

    specs = migchain_leaves(args.service, args.namespace, args.server_secret, args.client_secret)
    now = datetime.datetime.now(datetime.UTC)
    if args.out:
        from extender.cert_files import renew_folders

        return renew_folders(Path(args.out), args.ca_secret, specs, now)
    from extender.kube.certs import renew_secrets
    from extender.kube.status import connect

    try:
        api = connect(args.kubeconfig)
    except ValueError as error:
        print(f"migchain certs: {error}", file=sys.stderr)
        return 1
    return renew_secrets(
        api,
        namespace=args.namespace,
        ca_secret=args.ca_secret,
        specs=specs,
        scheduler=args.scheduler_deployment,
        now=now,
    )


def _warn(program: str) -> Callable[[str], None]:
    return lambda warning: print(f"{program}: {warning}", file=sys.stderr)


def _status(args: argparse.Namespace) -> int:
    from extender.kube.loan_key import admin_key
    from extender.kube.status import connect, run

    try:
        api = connect(args.kubeconfig)
        loan_key = admin_key(api, args.loan_key_file, _warn("migchain status"))
    except ValueError as error:
        print(f"migchain status: {error}", file=sys.stderr)
        return 1
    return run(api, args.output, args.watch, loan_key=loan_key)


def _loan_key(args: argparse.Namespace) -> int:
    """Make migchain's loan key once: a Secret (the manifests' Job runs this), or a file with --out."""
    from extender.loan_key import new_key

    if args.out:
        target = Path(args.out)
        try:
            # Never overwrite one (every loan signed with it would stop being a loan); readable by its owner only.
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(new_key())
        except OSError as error:
            print(f"migchain loan-key: cannot write {target}: {error.strerror or error}", file=sys.stderr)
            return 1
        print(f"wrote {target}")
        return 0
    import urllib3

    from extender.kube.api import ApiError
    from extender.kube.loan_key import create_secret
    from extender.kube.status import connect

    try:
        made = create_secret(connect(args.kubeconfig), args.namespace, args.secret)
    except (ValueError, ApiError, urllib3.exceptions.HTTPError, OSError) as error:
        print(f"migchain loan-key: cannot make Secret {args.namespace}/{args.secret}: {error}", file=sys.stderr)
        return 1
    print(f"{'created' if made else 'kept the existing'} Secret {args.namespace}/{args.secret}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from extender.kube.explain import run

    return run(
        args.pod,
        args.namespace,
        kubeconfig=args.kubeconfig,
        chains=args.chains,
        nodes=args.nodes,
        output=args.output,
        schedulers=args.scheduler_name or (MIGCHAIN_SCHEDULER,),
        loan_key_file=args.loan_key_file,
    )


def parser(prog: str = "migchain") -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog=prog, description="migchain: MIG borrowing for kube-scheduler")
    verbs = cli.add_subparsers(dest="verb", required=True)
    chains = verbs.add_parser("chains", help="work with chain rule files")
    chain_verbs = chains.add_subparsers(dest="chains_verb", required=True)
    validate = chain_verbs.add_parser("validate", help="check rule files; exit 1 on any problem")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(run=_validate)
    diff = chain_verbs.add_parser(
        "diff",
        help="what an edit changes for the scheduler: chains, types, steps, policy, who may borrow what; "
        "exit 0 when nothing changes, 1 when something does, 2 when a side is invalid",
    )
    diff.add_argument("old", metavar="OLD", help="a rules file, or a folder of them")
    diff.add_argument("new", metavar="NEW", help="a rules file, or a folder of them")
    diff.set_defaults(run=_diff)
    simulate = verbs.add_parser("simulate", help="replay a workload on a fleet under borrowing policies")
    start = simulate.add_mutually_exclusive_group(required=True)
    start.add_argument("--fleet", metavar="FLEET.yaml", help="GPUs per model and their MIG layout")
    start.add_argument(
        "--from-cluster",
        action="store_true",
        help="start from the live cluster instead: its nodes, and its running pods (loans included) holding their "
        "slices for the whole replay, since their remaining runtime is unknown (never finished, returned or moved); "
        "pods pending now are not replayed",
    )
    simulate.add_argument(
        "--kubeconfig", default=None, help="with --from-cluster: default $KUBECONFIG, ~/.kube/config, or in-cluster"
    )
    _loan_key_flag(simulate)
    simulate.add_argument("--chains", nargs="+", required=True, metavar="FILE", help="chain rule files")
    source = simulate.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", metavar="TRACE.csv", help="a trace in migchain's CSV format (bench/README.md)")
    source.add_argument("--openb", metavar="POD_LIST.csv", help="an Alibaba 2023 GPU trace pod list (openb)")
    simulate.add_argument(
        "--policy",
        nargs="+",
        default=[p.value for p in SimPolicy],
        choices=[p.value for p in SimPolicy],
        help="static (no borrowing), eager (reference returns), on-demand (ours), never (borrow, never return); "
        "default: all four",
    )
    simulate.add_argument("-o", "--output", choices=["table", "json"], default="table")
    simulate.set_defaults(run=_simulate)
    _add_certs_verb(verbs)
    status = verbs.add_parser(
        "status",
        help="MIG slices per node (allocatable, used, borrowed) and the loans in force, read from the cluster",
    )
    status.add_argument("--kubeconfig", default=None, help="default $KUBECONFIG, ~/.kube/config, or in-cluster")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    status.add_argument("-w", "--watch", action="store_true", help="print again on every change; Ctrl-C stops")
    _loan_key_flag(status)
    status.set_defaults(run=_status)
    explain = verbs.add_parser(
        "explain",
        help="why migchain places a pod where it does: verdict and score per node, the policy, its loan's return",
        description="For one pod, against the live cluster: which nodes fit exactly, which by borrowing, which not "
        "and why (the extender's own FailedNodes reasons), the score of each (what /filter and /prioritize answer), "
        "the policy lines that decided, and, for a borrower, whether and when it would be returned.",
    )
    explain.add_argument("pod", metavar="POD")
    explain.add_argument("-n", "--namespace", default="default")
    explain.add_argument("--kubeconfig", default=None, help="default $KUBECONFIG, ~/.kube/config, or in-cluster")
    explain.add_argument(
        "--chains",
        nargs="+",
        metavar="FILE",
        help="the chain rule files the extender runs with; default: chains/*.yaml of the current directory",
    )
    explain.add_argument(
        "--nodes",
        nargs="+",
        metavar="NODE",
        help="the candidate nodes, as kube-scheduler would send them; default: the nodes the pod may run on by its "
        "nodeSelector, required node affinity and tolerations (kube-scheduler's other filters, such as CPU, "
        "are not applied)",
    )
    explain.add_argument(
        "--scheduler-name",
        action="append",
        metavar="NAME",
        help="a schedulerName migchain's profile serves, as the returner's --scheduler-name "
        "(repeatable; default migchain-scheduler): pending pods for other schedulers are no demand",
    )
    explain.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _loan_key_flag(explain)
    explain.set_defaults(run=_explain)
    _add_loan_key_verb(verbs)
    return cli


def _add_certs_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = verbs.add_parser(
        "certs",
        help="issue and renew the CA, the extender's serving and kube-scheduler's client certificate for mutual TLS",
        description="Keeps Secrets CA_SECRET (the CA and its key), SERVER_SECRET and CLIENT_SECRET (tls.crt, "
        "tls.key, ca.crt) in NAMESPACE current, or folders under --out: creates what is missing, renews leaves "
        "within 30 days of their 90-day life, and rotates the CA with an overlap (a new CA joins the trusted "
        "bundle, signs once kube-scheduler was restarted with it, the old one leaves). Safe to run at any time; "
        "the migchain-certs CronJob runs it. docs/certificates.md tells the whole cycle.",
    )
    certs.add_argument("--namespace", default="migchain-system")
    certs.add_argument("--service", default="migchain-extender", help="the extender's Service (names to serve)")
    certs.add_argument("--ca-secret", default="migchain-ca", help="the CA and its key; only the certs Job reads it")
    certs.add_argument("--server-secret", default="migchain-extender-tls")
    certs.add_argument("--client-secret", default="migchain-scheduler-client-tls")
    certs.add_argument(
        "--scheduler-deployment",
        default="migchain-scheduler",
        metavar="NAME",
        help="the Deployment of kube-scheduler in NAMESPACE, restarted when the CA bundle it trusts changes; "
        "'' to restart it yourself (a new CA then signs without waiting for it)",
    )
    certs.add_argument("--kubeconfig", default=None, help="default $KUBECONFIG, ~/.kube/config, or in-cluster")
    certs.add_argument(
        "--out",
        metavar="DIR",
        help="keep folders DIR/<secret>/ (files behind a ..data symlink, as a mounted Secret) instead of Secrets",
    )
    certs.set_defaults(run=_certs)


def _add_loan_key_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    loan_key = verbs.add_parser(
        "loan-key",
        help="make migchain's loan key (the HMAC key loans are signed with) as a Secret, unless it exists",
        description="Creates Secret SECRET in NAMESPACE holding a new random key (entry `key`) unless it exists, "
        "or writes it to --out. migchain-extender and migchain-returner read it with --loan-key-file. Replacing "
        "the key makes every loan signed with the old one an ordinary pod (kept, never returned).",
    )
    loan_key.add_argument("--namespace", default="migchain-system")
    loan_key.add_argument("--secret", default="migchain-loan-key")
    loan_key.add_argument("--kubeconfig", default=None, help="default $KUBECONFIG, ~/.kube/config, or in-cluster")
    loan_key.add_argument("--out", metavar="FILE", help="write the key to FILE (mode 0600, never overwritten) instead")
    loan_key.set_defaults(run=_loan_key)


def _loan_key_flag(verb: argparse.ArgumentParser) -> None:
    verb.add_argument(
        "--loan-key-file",
        metavar="FILE",
        help="migchain's loan key, to believe only the loans migchain signed, as it does; default: Secret "
        "migchain-system/migchain-loan-key if you may read it, else loans are shown as written (with a warning)",
    )


def main(argv: Sequence[str] | None = None, prog: str = "migchain") -> int:
    args = parser(prog).parse_args(argv)
    code: int = args.run(args)
    return code


def kubectl_plugin() -> int:
    """`kubectl migchain ...`: kubectl runs `kubectl-migchain` from $PATH with the words after `migchain`."""
    return main(prog="kubectl migchain")


if __name__ == "__main__":
    raise SystemExit(main())
