"""`migchain-returner`: moves borrowers back to the type they asked for (its own Deployment); wiring only."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from extender import logs, probes
from extender.core.cluster import MIGCHAIN_SCHEDULER
from extender.core.migconfig import FOREIGN_LABELS
from extender.core.recarve import RecarvePolicy
from extender.core.rules import ReturnOrder
from extender.kube.api import Connection, KubeApi
from extender.kube.cache import ClusterCache
from extender.kube.events import EventRecorder
from extender.kube.executor import Executor
from extender.kube.lease import LeaderElection
from extender.kube.overdue import OVERDUE_AFTER_SECONDS
from extender.kube.recarver import QUIET_SECONDS, ConfigMapRef, Recarver
from extender.kube.returner import Returner
from extender.loan_guard import LoanGuard
from extender.loan_key import LoanKeyError, read_key_file
from extender.metrics import ReturnerMetrics, watch_rules
from extender.reload import RulesInForce
from extender.store import SnapshotStore

log = logging.getLogger("migchain.returner")


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="migchain-returner", description=__doc__)
    cli.add_argument("--chains", nargs="+", required=True, metavar="FILE", help="chain rule files (YAML)")
    cli.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default $KUBECONFIG, else in-cluster")
    cli.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "migchain-system"),
        help="namespace of the lease and the journal (default $POD_NAMESPACE or %(default)s)",
    )
    cli.add_argument("--identity", default=os.environ.get("POD_NAME", socket.gethostname()), help="lease holder name")
    cli.add_argument(
        "--loan-key-file",
        metavar="FILE",
        help="migchain's loan key (Secret migchain-loan-key, made by `migchain loan-key`; required): only a loan "
        "record it verifies makes a pod a borrower, and returned bare pods carry their restart count signed with it",
    )
    cli.add_argument(
        "--health-bind",
        default="127.0.0.1:8889",
        help="HOST:PORT of /healthz, /readyz and /metrics, plain HTTP, for kubelet and Prometheus "
        "(default %(default)s)",
    )
    cli.add_argument(
        "--dry-run",
        action="store_true",
        help="decide every return and preemption as usual, log, count and announce it (WouldReturn, WouldPreempt "
        "events), but evict nothing",
    )
    cli.add_argument(
        "--journal-overdue-after",
        type=float,
        default=OVERDUE_AFTER_SECONDS,
        metavar="SECONDS",
        help="a journal entry unfinished this long raises a JournalOverdue Event on its pod and counts in "
        "migchain_journal_overdue_entries (default %(default)s)",
    )
    cli.add_argument(
        "--scheduler-name",
        action="append",
        metavar="NAME",
        help=f"a schedulerName migchain's scheduler profile serves (repeatable; default {MIGCHAIN_SCHEDULER}): "
        "pending pods naming another scheduler never cause a return nor preempt",
    )
    cli.add_argument(
        "--return-order",
        default=ReturnOrder.LEAST_WORK_LOST.value,
        choices=[order.value for order in ReturnOrder],
        help="which borrower goes first when several could: least-work-lost (the youngest loan, so a restart "
        "throws away the least work) or most-steps (the most steps, then the oldest loan) (default %(default)s)",
    )
    recarve = cli.add_argument_group("re-carving (docs/recarving.md)")
    recarve.add_argument(
        "--recarve",
        action="store_true",
        help="re-carve idle nodes labelled migchain.io/recarve=true for sustained unmet demand, through the GPU "
        "Operator's MIG Manager (its ConfigMap and the nvidia.com/mig.config label)",
    )
    recarve.add_argument(
        "--recarve-dry-run",
        action="store_true",
        help="plan re-carves as usual, log, count and announce them (WouldRecarve events on the Node), write nothing",
    )
    recarve.add_argument(
        "--recarve-drain",
        action="store_true",
        help="when no idle node serves sustained unmet demand, cordon a busy opted-in node so that it drains, and "
        "evict its last holders (Eviction API, PodDisruptionBudgets respected) once waiting wastes more than "
        "evicting loses; off by default",
    )
    recarve.add_argument(
        "--recarve-config-map",
        default="gpu-operator/custom-mig-config",
        metavar="NAMESPACE/NAME",
        help="the MIG Manager's ConfigMap (ClusterPolicy migManager.config.name); migchain adds its migchain-* "
        "configs to config.yaml and keeps every other (default %(default)s)",
    )
    recarve.add_argument(
        "--recarve-sustained-seconds",
        type=float,
        default=RecarvePolicy.sustained_seconds,
        metavar="SECONDS",
        help="a pending pod counts as unmet demand once it has waited this long and fits nowhere, not even by "
        "borrowing (default %(default)s)",
    )
    recarve.add_argument(
        "--recarve-cooldown-seconds",
        type=float,
        default=RecarvePolicy.cooldown_seconds,
        metavar="SECONDS",
        help="a node is not re-carved again sooner (default %(default)s)",
    )
    recarve.add_argument(
        "--recarve-max-per-hour",
        type=int,
        default=RecarvePolicy.max_per_hour,
        metavar="N",
        help="re-carves per node per hour at most (default %(default)s)",
    )
    recarve.add_argument(
        "--recarve-max-in-flight",
        type=int,
        default=RecarvePolicy.max_in_flight,
        metavar="N",
        help="nodes being re-carved at once, fleet-wide (default %(default)s)",
    )
    recarve.add_argument(
        "--recarve-settle-seconds",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="after writing a new config, wait this long before a label names it: the MIG Manager reads the "
        "ConfigMap through a volume, which kubelet refreshes about once a minute (default %(default)s)",
    )
    recarve.add_argument(
        "--recarve-quiet-seconds",
        type=float,
        default=QUIET_SECONDS,
        metavar="SECONDS",
        help="a node to be re-carved is tainted migchain.io/recarving:NoSchedule first; its pods are read again "
        "this long after, once the binds decided before the taint have landed (default %(default)s)",
    )
    recarve.add_argument(
        "--recarve-foreign-label",
        action="append",
        metavar="KEY[=VALUE]",
        help="a node label saying another MIG manager owns the node's GPUs: such nodes are never re-carved "
        f"(repeatable; added to the built-in {', '.join(FOREIGN_LABELS)})",
    )
    cli.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cli.add_argument("--log-format", default="text", choices=logs.FORMATS, help="text lines, or one JSON object a line")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    rules_in_force = RulesInForce.at_start("migchain-returner", args.chains)
    if rules_in_force is None:
        return 2
    try:
        if not args.loan_key_file:
            raise LoanKeyError("--loan-key-file is required: only loans signed with that key are returned")
        loan_key = read_key_file(args.loan_key_file)
    except LoanKeyError as error:
        print(f"migchain-returner: {error}", file=sys.stderr)
        return 2
    try:
        config_map = ConfigMapRef.parse(args.recarve_config_map)
    except ValueError as error:
        print(f"migchain-returner: --recarve-config-map: {error}", file=sys.stderr)
        return 2
    api = KubeApi(Connection.load(args.kubeconfig))
    try:
        health = probes.listen(args.health_bind)
    except OSError as error:
        print(f"migchain-returner: --health-bind: {error}", file=sys.stderr)
        return 2
    store = SnapshotStore(ready=False, detail="waiting for the first list of nodes and pods")
    metrics = ReturnerMetrics()
    watch_rules(metrics.registry, rules_in_force.status)
    loans = LoanGuard(loan_key, metrics.unreadable_loans, reports=True)
    cache = ClusterCache(api, store, errors=metrics.errors, loans=loans)
    cache.start()
    probes.serve_health(health, store, rules_in_force, metrics.registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rules_in_force.watch(stop)
    election = LeaderElection(api, args.namespace, "migchain-returner", args.identity, errors=metrics.errors)
    metrics.watch_leadership(election.leading)
    threading.Thread(target=election.run, args=(stop,), name="lease", daemon=True).start()
    events = EventRecorder(api, args.identity, metrics.errors)
    executor = Executor(api, args.namespace, loan_key)
    recarver = None
    if args.recarve or args.recarve_dry_run:
        policy = RecarvePolicy(
            sustained_seconds=args.recarve_sustained_seconds,
            cooldown_seconds=args.recarve_cooldown_seconds,
            max_per_hour=args.recarve_max_per_hour,
            max_in_flight=args.recarve_max_in_flight,
            drain=args.recarve_drain,
        )
        recarver = Recarver(
            api,
            events,
            metrics,
            policy,
            config_map,
            dry_run=args.recarve_dry_run,
            foreign=(*FOREIGN_LABELS, *(args.recarve_foreign_label or ())),
            settle_seconds=args.recarve_settle_seconds,
            quiet_seconds=args.recarve_quiet_seconds,
            evict=executor.evict,
        )
    returner = Returner(
        cache,
        rules_in_force,
        executor,
        events,
        election,
        metrics=metrics,
        dry_run=args.dry_run,
        order=ReturnOrder(args.return_order),
        journal_overdue_after=args.journal_overdue_after,
        schedulers=tuple(args.scheduler_name or (MIGCHAIN_SCHEDULER,)),
        recarver=recarver,
    )
    log.info("returner %s started; acting only while it holds the lease", args.identity)
    returner.run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
