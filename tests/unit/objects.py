"""Node and Pod objects as the API server lists them, and borrowers made by the real borrow planner."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from extender.config import load_rules
from extender.core.cluster import NodeState, pod_mig_requests, pod_request
from extender.core.decide import Placement, place
from extender.core.loan import LOAN_SIGNATURE_ANNOTATION, RESTARTS_ANNOTATION, loan_signature, plan_borrow
from extender.core.rules import ChainRules

ROOT = Path(__file__).resolve().parents[2]
# The shipped chain, taking slices back at once and keeping none free: these tests look at the planner alone.
RULES = ChainRules(
    dataclasses.replace(chain, policy=dataclasses.replace(chain.policy, reclaim_after_seconds=0, headroom_seconds=0))
    for chain in load_rules([ROOT / "chains" / "a100-40gb.yaml"]).chains
)
A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
G3 = "nvidia.com/mig-3g.20gb"
LOAN_KEY = b"migchain-unit-tests-loan-key-32b"  # what --loan-key-file holds in the tests' processes


def node(name: str, slices: dict[str, int], state: str | None = "success") -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": A100, "nvidia.com/mig.strategy": "mixed"}
    if state is not None:
        labels["nvidia.com/mig.config.state"] = state
    allocatable = {"cpu": "64", "pods": "110", **{resource: str(count) for resource, count in slices.items()}}
    return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": allocatable}}


def pod(
    name: str,
    requests: dict[str, int],
    node_name: str = "",
    *,
    namespace: str = "ml",
    phase: str = "Running",
    created: str = "2026-11-25T10:00:00Z",
) -> dict[str, Any]:
    limits = {resource: str(count) for resource, count in requests.items()}
    spec: dict[str, Any] = {
        "schedulerName": "migchain-scheduler",
        "containers": [{"name": "main", "image": "cuda", "resources": {"limits": limits}}],
    }
    if node_name:
        spec["nodeName"] = node_name
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "creationTimestamp": created},
        "spec": spec,
        "status": {"phase": phase},
    }


def borrower(
    name: str,
    requests: dict[str, int],
    node_name: str,
    free: dict[str, int],
    created: str = "2026-11-25T10:00:00Z",
    *,
    restarts: int = 0,
) -> dict[str, Any]:
    """The pod a borrow on `node_name` (with `free` slices) puts in place of pending pod `name`, as listed later;
    `restarts`: migchain restarted the pod that many times before (a count it signed)."""
    original = pod(name, requests, phase="Pending")
    if restarts:
        annotations = {RESTARTS_ANNOTATION: str(restarts)}
        signature = loan_signature(LOAN_KEY, "ml", name, pod_mig_requests(original["spec"]), annotations)
        original["metadata"]["annotations"] = annotations | {LOAN_SIGNATURE_ANNOTATION: signature}
    verdict = place(pod_request(original), NodeState(node_name, A100, "success", free, {}), node_name, RULES)
    assert isinstance(verdict, Placement) and verdict.borrows
    replacement: dict[str, Any] = dict(plan_borrow(original, verdict, LOAN_KEY).replacement)
    replacement["metadata"] |= {"uid": f"uid-{name}-borrower", "creationTimestamp": created}
    replacement["status"] = {"phase": "Running"}
    return replacement
