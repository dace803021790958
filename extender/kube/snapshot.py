"""One read of the live cluster for the admin's commands: every node and pod, and the ledger's view of them.

The extender's cache builds the same view from a watch; a command lists once
and is done. Objects migchain cannot read are skipped and counted, as the
cache skips them. Nothing here writes to the cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3

from extender.core.cluster import PodRecord, Snapshot
from extender.kube.api import ApiError, KubeApi
from extender.kube.loan_key import admin_key
from extender.kube.status import connect
from extender.ledger import Ledger


class ClusterReadError(ValueError):
    """The cluster could not be reached or listed; the message says which and why."""


@dataclass(frozen=True)
class ClusterObjects:
    nodes: list[dict[str, Any]]  # the Node objects as listed
    pods: list[dict[str, Any]]  # every Pod object as listed, pending and finished ones too
    snapshot: Snapshot  # slices in use per node, as the extender's ledger counts them
    records: list[PodRecord]  # what the ledger keeps of each readable pod
    skipped: int  # unreadable node or pod objects, left out as the extender leaves them out
    loan_key: bytes | None = None  # loans in `records` are believed only if signed with it; None: as written


def read_cluster(api: KubeApi, loan_key: bytes | None = None) -> ClusterObjects:
    try:
        nodes, _ = api.list_all("/api/v1/nodes")
        pods, _ = api.list_all("/api/v1/pods")
    except (ApiError, urllib3.exceptions.HTTPError, OSError) as error:
        raise ClusterReadError(f"cannot list nodes and pods: {error}") from error
    ledger, skipped = Ledger.of_readable(nodes, pods, loan_key)
    return ClusterObjects(nodes, pods, ledger.snapshot(), list(ledger.pods()), skipped, loan_key)


def open_cluster(
    kubeconfig: str | None, loan_key_file: str | None = None, warn: Callable[[str], None] = lambda _: None
) -> ClusterObjects:
    """Connect as `migchain status` does (--kubeconfig, $KUBECONFIG, ~/.kube/config, in-cluster) and read, loans
    verified with the key of `loan_key_file` or of migchain's Secret (see kube/loan_key.py admin_key).

    Raises ValueError (ClusterReadError among them) with a message for the user.
    """
    api = connect(kubeconfig)
    return read_cluster(api, admin_key(api, loan_key_file, warn))
