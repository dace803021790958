"""`migchain-extender`: load the chain rules, then serve the HTTP API under gunicorn; wiring only."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from flask import Flask
from gunicorn.app.base import BaseApplication

from extender.config import load_rules_at_start
from extender.core.cluster import Snapshot
from extender.core.rules import ChainRules
from extender.ledger import Ledger
from extender.store import SnapshotStore
from extender.web.app import DEFAULT_MAX_BODY_BYTES, WebSettings, create_app

log = logging.getLogger("migchain.extender")

# ONE worker process, several threads. Every bind must see the slices reserved
# by the binds before it; that state lives in this process's memory (the cache
# of the cluster plus its own reservations). Two processes would each keep a
# cache of their own and hand the same free slice to two pods. Threads share
# the one cache, and the decisions are short, pure and read an immutable
# snapshot, so threads are enough to keep kube-scheduler's calls from queueing.
WORKERS = 1


class _Server(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn calls `load` in the worker after the fork, so the watch threads start where they serve."""

    def __init__(self, build: Callable[[], Flask], options: dict[str, Any]) -> None:
        self._build = build
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._build()


def build_app(args: argparse.Namespace, rules: ChainRules) -> Flask:
    """Standalone without a cluster; otherwise the watch-fed cache and the binder."""
    settings = WebSettings(max_body_bytes=args.max_body_bytes, pass_all_nodes=args.pass_all_nodes)
    if args.snapshot:
        store = SnapshotStore(read_snapshot(args.snapshot), detail=f"snapshot {args.snapshot}")
        gc.freeze()  # the snapshot lives as long as the process: keep the collector from re-scanning it
        return create_app(settings, rules, store)
    if not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.warning("no --kubeconfig and not in a cluster: running standalone (no cache, no /bind)")
        return create_app(settings, rules, SnapshotStore())
    from extender.kube.api import Connection, KubeApi
    from extender.kube.binder import Binder
    from extender.kube.cache import ClusterCache
    from extender.kube.events import EventRecorder
    from extender.kube.executor import Executor

    api = KubeApi(Connection.load(args.kubeconfig), pool_size=args.threads + 4)
    store = SnapshotStore(ready=False, detail="waiting for the first list of nodes and pods")
    cache = ClusterCache(api, store)
    cache.start()
    binder = Binder(api, cache, rules, Executor(api, args.namespace), EventRecorder(api, socket.gethostname()))

    def recover_when_synced() -> None:
        # Journaled borrows need the cache: a replacement is recreated only if it still fits.
        while not cache.wait_ready(timeout=60):
            log.warning("cluster cache not in sync yet; journal recovery waits")
        binder.recover()

    threading.Thread(target=recover_when_synced, name="journal-recovery", daemon=True).start()
    return create_app(settings, rules, store, binder)


def read_snapshot(path: str) -> Snapshot:
    """A frozen cluster from a file: a List of Node and Pod objects, as `kubectl get nodes,pods -A -o json` writes."""
    document = orjson.loads(Path(path).read_bytes())
    items = document.get("items", []) if isinstance(document, dict) else []
    return Ledger.of_objects(items).snapshot()


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="migchain-extender", description=__doc__)
    cli.add_argument("--bind", default="127.0.0.1:8888", help="HOST:PORT to listen on (default %(default)s)")
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
    cli.add_argument("--threads", type=int, default=8, help="request threads (default %(default)s)")
    cli.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body")
    cli.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rules = load_rules_at_start("migchain-extender", args.chains)
    if rules is None:
        return 2
    options = {
        "bind": args.bind,
        "workers": WORKERS,
        "worker_class": "gthread",
        "threads": args.threads,
        "loglevel": args.log_level,
        "accesslog": "-" if args.log_level == "debug" else None,
        # kube-scheduler keeps connections alive; a short keep-alive frees threads.
        "keepalive": 5,
        "graceful_timeout": 10,
        # gunicorn's control socket can add workers at run time; one worker is a must (above).
        "control_socket_disable": True,
    }
    _Server(lambda: build_app(args, rules), options).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
