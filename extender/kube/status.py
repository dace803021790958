"""`migchain status`: read nodes and pods with the user's kubeconfig and print what the pure core makes of them.

The rows and the text come from `extender.core.status`; this module only
lists objects, builds the ledger from them, and prints (again on change,
with --watch).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import urllib3

from extender.core.cluster import ObjectError, pod_record
from extender.core.loan import vouched
from extender.core.status import ClusterStatus, cluster_status, status_document, status_text
from extender.kube.api import ApiError, Connection, KubeApi
from extender.ledger import Ledger

WATCH_SECONDS = 2.0
# Pods that hold slices only: bound and not finished. The ledger would skip the rest anyway.
HOLDING_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


def kubeconfig_path(given: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """--kubeconfig, else $KUBECONFIG, else ~/.kube/config if it exists; None means in-cluster."""
    if given:
        return given
    if environ.get("KUBECONFIG"):
        return environ["KUBECONFIG"]
    default = Path(environ.get("HOME", "~")).expanduser() / ".kube" / "config"
    return str(default) if default.is_file() else None


def status_of_objects(
    nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], loan_key: bytes | None = None
) -> tuple[ClusterStatus, int]:
    """The status of these Node and Pod objects, and how many were unreadable (skipped).

    With `loan_key` a loan counts only if migchain signed it, as in the extender; without, as written.
    """
    pods = list(pods)
    ledger, skipped = Ledger.of_readable(nodes, pods, loan_key)
    return cluster_status(ledger.snapshot(), ledger.pods(), _doubted(pods, loan_key)), skipped


def _doubted(pods: Iterable[Mapping[str, Any]], loan_key: bytes | None) -> list[str]:
    """The pods whose loan record is not believed (core/loan.py vouched), by namespace/name."""
    found = []
    for pod in pods:
        try:
            record = pod_record(pod)
        except ObjectError:
            continue  # counted among the skipped objects
        if vouched(record, loan_key)[1]:
            found.append(record.request.key)
    return found


def read_status(api: KubeApi, loan_key: bytes | None = None) -> tuple[ClusterStatus, int]:
    nodes, _ = api.list_all("/api/v1/nodes")
    pods, _ = api.list_all("/api/v1/pods", fieldSelector=HOLDING_PODS)
    return status_of_objects(nodes, pods, loan_key)


def render(status: ClusterStatus, output: str, now: datetime.datetime, watching: bool) -> str:
    if output == "json":
        document = status_document(status, now)
        # Watching, one document a line (JSON Lines), so tools can read the stream.
        return json.dumps(document, separators=(",", ":")) if watching else json.dumps(document, indent=2)
    text = status_text(status, now)
    return f"--- {now:%Y-%m-%d %H:%M:%S}Z\n{text}\n" if watching else text


def run(
    api: KubeApi,
    output: str,
    watch: bool,
    *,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    sleep: Callable[[float], None] = time.sleep,
    loan_key: bytes | None = None,
) -> int:
    """Print the status once (exit 1 if the cluster cannot be read), or on every change until Ctrl-C (exit 0).

    Watching polls every WATCH_SECONDS: two lists are cheap, and unlike a
    watch they need no resync logic; a reading that fails is reported and retried.
    """
    shown: ClusterStatus | None = None
    try:
        while True:
            try:
                status, skipped = read_status(api, loan_key)
            except (ApiError, urllib3.exceptions.HTTPError, OSError) as error:
                print(f"migchain status: cannot read nodes and pods: {error}", file=err)
                if not watch:
                    return 1
            else:
                if skipped and status != shown:
                    print(f"migchain status: skipped {skipped} unreadable node or pod object(s)", file=err)
                if status != shown:
                    print(render(status, output, clock(), watch), file=out, flush=True)
                    shown = status
            if not watch:
                return 0
            sleep(WATCH_SECONDS)
    except KeyboardInterrupt:
        return 0 if watch else 130  # Ctrl-C is how a watch ends; it only cuts a single read short


def connect(kubeconfig: str | None) -> KubeApi:
    """A client from the kubeconfig (see kubeconfig_path), or in-cluster; raises ValueError saying what is missing."""
    path = kubeconfig_path(kubeconfig)
    if path is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise ValueError("no kubeconfig: give --kubeconfig, set $KUBECONFIG, or write ~/.kube/config")
    try:
        return KubeApi(Connection.load(path), pool_size=2)
    except Exception as error:  # the kubernetes loaders raise their own kinds (ConfigException, YAML errors)
        raise ValueError(f"cannot load the kubeconfig {path or '(in-cluster)'}: {error}") from error
