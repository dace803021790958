"""`migchain-extender`: load the chain rules, then serve the HTTP API under gunicorn; wiring only."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from flask import Flask
from gunicorn.app.base import BaseApplication

from extender import logs, probes
from extender.core.cluster import Snapshot
from extender.filter_memory import FilterMemory
from extender.ledger import Ledger
from extender.loan_key import LoanKeyError, read_key_file
from extender.metrics import Metrics, watch_certificates, watch_rules
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.tls import ServingCredentials
from extender.web.app import DEFAULT_MAX_BODY_BYTES, WebSettings, create_app

log = logging.getLogger("migchain.extender")

# ONE worker process, several threads. Every bind must see the slices reserved
# by the binds before it; that state lives in this process's memory (the cache
# of the cluster plus its own reservations). Two processes would each keep a
# cache of their own and hand the same free slice to two pods. Threads share
# the one cache, and the decisions are short, pure and read an immutable
# snapshot, so threads are enough to keep kube-scheduler's calls from queueing.
WORKERS = 1
# Several replicas (pods) may run: one leads (Lease migchain-extender) and
# answers the verbs, the others keep their cache warm and are not ready.
LEASE_NAME = "migchain-extender"


class _Server(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn calls `load` in the worker after the fork, so the watch threads start where they serve."""

    def __init__(
        self, build: Callable[[], Flask], options: dict[str, Any], client_identities: frozenset[str] = frozenset()
    ) -> None:
        self._build = build
        self._options = options
        self.client_identities = client_identities  # read by extender.worker.GuardedWorker
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._build()


def build_app(
    args: argparse.Namespace,
    rules: RulesInForce,
    health: socket.socket,
    loan_key: bytes | None = None,
    credentials: ServingCredentials | None = None,
) -> Flask:
    """Standalone without a cluster; otherwise the watch-fed cache and the binder. Runs in the worker.

    The probes and /metrics are answered on `health` (bound before the fork) by a thread of the worker.
    `loan_key` signs and verifies loans; `main` makes sure there is one when there is a cluster.
    `credentials`: the serving certificate and client CA bundle, reloaded when renewed.
    """
    metrics = Metrics()
    watch_rules(metrics.registry, rules.status)
    if credentials is not None:
        watch_certificates(metrics.registry, credentials.status)
    rules.watch(threading.Event())  # the worker's life long: edits of the files take effect within seconds
    settings = WebSettings(
        max_body_bytes=args.max_body_bytes,
        pass_all_nodes=args.pass_all_nodes,
        require_client_certificate=bool(args.client_ca_file),
        client_identities=frozenset(args.client_identity or ()),
    )
    if args.snapshot:
        store = SnapshotStore(read_snapshot(args.snapshot), detail=f"snapshot {args.snapshot}")
        gc.freeze()  # the snapshot lives as long as the process: keep the collector from re-scanning it
        probes.serve_health(health, store, rules, metrics.registry)
        return create_app(settings, rules, store, metrics=metrics)
    if not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.warning("no --kubeconfig and not in a cluster: running standalone (no cache, no /bind)")
        store = SnapshotStore()
        probes.serve_health(health, store, rules, metrics.registry)
        return create_app(settings, rules, store, metrics=metrics)
    from extender.kube.api import Connection, KubeApi
    from extender.kube.binder import Binder
    from extender.kube.cache import ClusterCache
    from extender.kube.events import EventRecorder
    from extender.kube.executor import Executor
    from extender.kube.lease import LeaderElection, Leadership
    from extender.kube.requeue import Requeuer
    from extender.loan_guard import LoanGuard

    if loan_key is None:
        raise ValueError("no loan key: migchain-extender needs --loan-key-file with a cluster")
    api = KubeApi(Connection.load(args.kubeconfig), pool_size=args.threads + 4)
    store = SnapshotStore(ready=False, detail="waiting for the first list of nodes and pods")
    cache = ClusterCache(api, store, errors=metrics.errors, loans=LoanGuard(loan_key, metrics.unreadable_loans))
    # Only the leader reports the cluster's gauges: a sum over replicas counts each slice once.
    metrics.watch_cluster(lambda: cache.view() if store.readiness().ready else None)
    cache.start()
    election = LeaderElection(
        api,
        args.namespace,
        LEASE_NAME,
        args.identity,
        duration=args.lease_duration,
        renew=args.lease_renew,
        retry=args.lease_renew / 4,
        errors=metrics.errors,
    )
    leadership = Leadership(election, cache.relist)
    # Not ready, and the verbs answer 503, unless this replica leads: the Service sends kube-scheduler to the leader.
    store.gate(leadership.why_not)
    metrics.leader.set_function(lambda: 1.0 if leadership.acting() else 0.0)
    threading.Thread(target=election.run, args=(threading.Event(),), name="lease", daemon=True).start()
    threading.Thread(target=leadership.run, args=(threading.Event(),), name="leadership", daemon=True).start()
    events = EventRecorder(api, socket.gethostname(), metrics.errors)
    memory = FilterMemory(store, wake=cache.changed)
    binder = Binder(
        api,
        cache,
        rules,
        Executor(api, args.namespace, loan_key, may_act=leadership.acting),
        events,
        metrics=metrics,
        memory=memory,
        dry_run=args.dry_run,
        journal_overdue_after=args.journal_overdue_after,
        acting=leadership.acting,
    )

    threading.Thread(
        target=binder.keep_journal_finished, args=(threading.Event(),), name="journal-recovery", daemon=True
    ).start()
    requeuer = Requeuer(api, cache, memory, rules, metrics)
    threading.Thread(target=requeuer.run, args=(threading.Event(),), name="requeue", daemon=True).start()
    probes.serve_health(health, store, rules, metrics.registry)
    return create_app(settings, rules, store, binder, metrics, filter_log=memory)


def read_snapshot(path: str) -> Snapshot:
    """A frozen cluster from a file: a List of Node and Pod objects, as `kubectl get nodes,pods -A -o json` writes."""
    document = orjson.loads(Path(path).read_bytes())
    items = document.get("items", []) if isinstance(document, dict) else []
    return Ledger.of_objects(items).snapshot()


def transport_problem(bind: str, cert: str | None, key: str | None, client_ca: str | None) -> str:
    """Why these listen and TLS settings are unsafe or incomplete; "" when they are fine.

    /bind moves pods, so anything that can reach it must be kube-scheduler:
    off loopback that takes mutual TLS (a plain-HTTP or server-only-TLS port
    on a pod IP is reachable by every pod of the cluster).
    """
    if bool(cert) != bool(key):
        return "--tls-cert-file and --tls-key-file go together"
    if client_ca and not cert:
        return "--client-ca-file needs --tls-cert-file and --tls-key-file (client certificates are a TLS feature)"
    for path in (cert, key, client_ca):
        if path and not Path(path).is_file():
            return f"{path}: no such file"
    if not client_ca and not _loopback(bind):
        return (
            f"--bind {bind} is not a loopback address: serving there without mutual TLS would let any pod that "
            "reaches the port bind pods; give --tls-cert-file, --tls-key-file and --client-ca-file, or bind "
            "127.0.0.1 (kube-scheduler on the same host or in the same pod)"
        )
    return ""


def lease_problem(duration: float, renew: float) -> str:
    """Why these lease timings cannot fence a leader; "" when they can."""
    if not 0 < renew < duration:
        return (
            f"--lease-renew ({renew}) must be above 0 and below --lease-duration ({duration}): the leader stops "
            "binding one renewal before its lease could expire"
        )
    return ""


def _loopback(bind: str) -> bool:
    if bind.startswith("unix:"):
        return True
    host = bind.rsplit(":", 1)[0].strip("[]") if ":" in bind else bind
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not provably local


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="migchain-extender", description=__doc__)
    cli.add_argument(
        "--bind",
        default="127.0.0.1:8888",
        help="HOST:PORT of kube-scheduler's verbs: /filter, /prioritize, /bind (default %(default)s)",
    )
    cli.add_argument(
        "--health-bind",
        default="127.0.0.1:8890",
        help="HOST:PORT of /healthz, /readyz and /metrics, plain HTTP, for kubelet and Prometheus "
        "(default %(default)s)",
    )
    cli.add_argument("--chains", nargs="+", required=True, metavar="FILE", help="chain rule files (YAML)")
    cli.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig of the cluster (default $KUBECONFIG; in a pod, the service account)",
    )
    cli.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "migchain-system"),
        help="namespace of migchain's own objects: the borrow journal (default $POD_NAMESPACE or %(default)s)",
    )
    cli.add_argument(
        "--journal-overdue-after",
        type=float,
        default=180.0,  # extender/kube/overdue.py
        metavar="SECONDS",
        help="a journal entry unfinished this long raises a JournalOverdue Event on its pod and counts in "
        "migchain_journal_overdue_entries (default %(default)s)",
    )
    cli.add_argument(
        "--snapshot",
        metavar="FILE.json",
        help="decide on a frozen cluster read from FILE (kubectl get nodes,pods -A -o json) instead of watching one; "
        "filter and prioritize only, for trials and benchmarks",
    )
    cli.add_argument(
        "--pass-all-nodes",
        action="store_true",
        help="filter passes every fitting node to kube-scheduler's scoring; by default only the best of them, "
        "as many as kube-scheduler's default percentageOfNodesToScore would score",
    )
    tls = cli.add_argument_group(
        "TLS", "the supported production setup is mutual TLS; plain HTTP is allowed only on a loopback address"
    )
    tls.add_argument("--tls-cert-file", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    tls.add_argument("--tls-key-file", metavar="PEM", help="the certificate's private key")
    tls.add_argument(
        "--client-ca-file",
        metavar="PEM",
        help="require a client certificate signed by this CA: the TLS handshake refuses any caller without one "
        "(kube-scheduler's extender tlsConfig certFile/keyFile)",
    )
    tls.add_argument(
        "--client-identity",
        action="append",
        metavar="NAME",
        help="answer the verbs only to a client certificate with this common name or subject alternative name "
        "(DNS or URI); repeatable; `migchain certs` names kube-scheduler's migchain-scheduler. "
        "Without it, any certificate the CA signed is accepted",
    )
    cli.add_argument(
        "--loan-key-file",
        metavar="FILE",
        help="migchain's loan key (Secret migchain-loan-key, made by `migchain loan-key`): borrows sign their loan "
        "record with it, and only a record it verifies makes a pod a borrower; required with a cluster",
    )
    cli.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name on the Lease migchain-extender (default $POD_NAME, else host-pid)",
    )
    cli.add_argument(
        "--lease-duration",
        type=float,
        default=3.0,
        help="seconds another replica waits, after it last saw the lease change, before taking it over "
        "(default %(default)s)",
    )
    cli.add_argument(
        "--lease-renew",
        type=float,
        default=1.0,
        help="seconds between renewals; the leader stops binding this long before its lease could expire "
        "(default %(default)s)",
    )
    cli.add_argument("--threads", type=int, default=8, help="request threads (default %(default)s)")
    cli.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body")
    cli.add_argument(
        "--dry-run",
        action="store_true",
        help="decide every borrow as usual, log, count and announce it (WouldBorrow events), but replace no pod: "
        "pods that could only run by borrowing stay Pending with the would-be decision in FailedScheduling",
    )
    cli.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cli.add_argument("--log-format", default="text", choices=logs.FORMATS, help="text lines, or one JSON object a line")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    problem = transport_problem(args.bind, args.tls_cert_file, args.tls_key_file, args.client_ca_file) or (
        lease_problem(args.lease_duration, args.lease_renew)
    )
    if problem:
        print(f"migchain-extender: {problem}", file=sys.stderr)
        return 2
    if args.client_identity and not args.client_ca_file:
        print(
            "migchain-extender: --client-identity needs --client-ca-file (it names a client certificate)",
            file=sys.stderr,
        )
        return 2
    rules = RulesInForce.at_start("migchain-extender", args.chains)
    if rules is None:
        return 2
    loan_key = None
    if args.loan_key_file:
        try:
            loan_key = read_key_file(args.loan_key_file)
        except LoanKeyError as error:
            print(f"migchain-extender: {error}", file=sys.stderr)
            return 2
    elif not args.snapshot and (args.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")):
        print(
            "migchain-extender: --loan-key-file is required with a cluster: borrows sign their loans with it "
            "(make one with `migchain loan-key`)",
            file=sys.stderr,
        )
        return 2
    try:
        # Bound here, before gunicorn forks its worker: a taken port stops the start with a clear error.
        health = probes.listen(args.health_bind)
    except OSError as error:
        print(f"migchain-extender: --health-bind: {error}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {
        "bind": args.bind,
        "workers": WORKERS,
        # The TLS handshake and the request head are read by the worker's event
        # loop under a deadline, not by a request thread (extender/worker.py).
        "worker_class": "extender.worker.GuardedWorker",
        "threads": args.threads,
        # Every connection the worker holds, in all states. Those still in their
        # handshake or head are capped lower (worker.ARRIVING), so stalled
        # clients never stop it accepting; kept-alive ones come only from
        # certificate holders (the handshake requires one).
        "worker_connections": 512,
        "loglevel": args.log_level,
        "accesslog": "-" if args.log_level == "debug" else None,
        "logger_class": logs.GunicornLogger,  # gunicorn's lines in --log-format too
        # kube-scheduler keeps connections alive (they wait in the event loop,
        # not in a thread); one idle for 5 s is closed, and its next call opens
        # another (a handshake of a few milliseconds).
        "keepalive": 5,
        "graceful_timeout": 10,
        # gunicorn's control socket can add workers at run time; one worker is a must (above).
        "control_socket_disable": True,
    }
    if args.tls_cert_file:
        options |= {"certfile": args.tls_cert_file, "keyfile": args.tls_key_file}
    if args.client_ca_file:
        # Required at the handshake: a caller without a certificate the CA
        # signed never gets to send a request. kubelet's probes and Prometheus
        # have their own port (--health-bind).
        options |= {"ca_certs": args.client_ca_file, "cert_reqs": ssl.CERT_REQUIRED}
    credentials = None
    if args.tls_cert_file:
        # Renewed certificates and client CA bundles are served without a
        # restart, and a broken renewal never replaces working files (extender/tls.py).
        credentials = ServingCredentials.at_start(
            "migchain-extender",
            args.tls_cert_file,
            args.tls_key_file,
            args.client_ca_file,
            options.get("cert_reqs", ssl.CERT_NONE),
        )
        if credentials is None:
            return 2
        options["ssl_context"] = credentials.gunicorn_hook
    identities = frozenset(args.client_identity or ())
    _Server(lambda: build_app(args, rules, health, loan_key, credentials), options, identities).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
