"""Which owners' pods may borrow (issue 18, item 6): ReplicaSet and Job, and the kinds a policy lists."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.config import ConfigError, load_rules
from extender.core.cluster import NodeState, pod_request
from extender.core.decide import Placement, Rejection, place
from extender.core.rules import OwnerKind
from tests.strategies import chain_rules, nodes, pods

ROOT = Path(__file__).resolve().parents[2]
A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml"])
ONLY_LARGER = NodeState("n", A100, "success", {G2: 1}, {})  # a 1g.5gb pod runs here only by borrowing


def pod(owner: tuple[Any, Any] | None = None, namespace: str = "default", controller: Any = True) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p", "namespace": namespace, "uid": "uid-p"}
    if owner is not None:
        api_version, kind = owner
        metadata["ownerReferences"] = [
            {"apiVersion": api_version, "kind": kind, "name": "o", "uid": "uid-o", "controller": controller}
        ]
    return {"metadata": metadata, "spec": {"containers": [{"name": "c", "resources": {"limits": {G1: "1"}}}]}}


def borrows(document: dict[str, Any], rules: Any = RULES) -> bool:
    verdict = place(pod_request(document), ONLY_LARGER, "n", rules)
    return isinstance(verdict, Placement) and verdict.borrows


@pytest.mark.parametrize(
    "owner",
    [None, ("apps/v1", "ReplicaSet"), ("batch/v1", "Job")],
    ids=["bare", "replicaset", "job"],
)
def test_bare_pods_and_pods_of_replicasets_and_jobs_borrow(owner):
    assert borrows(pod(owner))


@pytest.mark.parametrize(
    "owner",
    [
        ("argoproj.io/v1alpha1", "Workflow"),  # Argo Workflows: a step's pod by name
        ("kubeflow.org/v1", "PyTorchJob"),  # Kubeflow's training operator: replica pods by name and index
        ("batch.volcano.sh/v1alpha1", "Job"),  # Volcano: a Job, but not batch/v1
        ("sparkoperator.k8s.io/v1beta2", "SparkApplication"),  # Spark's driver tracks executors by name
        ("apps/v1", "StatefulSet"),
        ("apps/v1", "DaemonSet"),
        ("extensions/v1beta1", "ReplicaSet"),  # only the apiVersion-qualified kind is safe
        ("v1", "Pod"),
    ],
)
def test_pods_of_other_owners_keep_their_own_type_and_say_why(owner):
    document = pod(owner)
    assert not borrows(document)
    verdict = place(pod_request(document), ONLY_LARGER, "n", RULES)
    assert isinstance(verdict, Rejection)
    api_version, kind = owner
    if kind not in ("StatefulSet", "DaemonSet"):  # those say so in their own words, as before
        assert f"pods owned by a {kind} ({api_version}) keep their own type" in verdict.reason
        assert "ReplicaSet (apps/v1), Job (batch/v1)" in verdict.reason and "policy.ownerKinds" in verdict.reason


def test_an_owner_reference_that_is_not_the_controller_leaves_a_bare_pod():
    assert borrows(pod(("argoproj.io/v1alpha1", "Workflow"), controller=False))


def rules_file(tmp_path: Path, name: str, chain: str, policy: str) -> Path:
    path = tmp_path / name
    path.write_text(
        "apiVersion: migchain.io/v1alpha1\nkind: ChainRules\nchains:\n"
        f"  - name: {chain}\n    gpuProducts: [{A100}]\n    types: [{G1}, {G2}]\n{policy}"
    )
    return path


LISTS_GPU_WORKER = "policy:\n  ownerKinds:\n    - {apiVersion: example.com/v1, kind: GpuWorker}\n"


def test_a_policy_lists_more_owner_kinds_for_its_own_chains(tmp_path):
    rules = load_rules([rules_file(tmp_path, "workers.yaml", "workers", LISTS_GPU_WORKER)])
    assert borrows(pod(("example.com/v1", "GpuWorker")), rules)
    assert not borrows(pod(("example.com/v2", "GpuWorker")), rules)  # another version is another kind
    assert not borrows(pod(("argoproj.io/v1alpha1", "Workflow")), rules)
    assert borrows(pod(("apps/v1", "ReplicaSet")), rules)  # the safe kinds stay safe


def test_a_kind_one_file_lists_does_not_borrow_along_another_files_overlapping_chain(tmp_path):
    """A denial wins across files: the file that does not list the kind shuts its own borrows for it."""
    rules = load_rules(
        [
            rules_file(tmp_path, "workers.yaml", "workers", LISTS_GPU_WORKER),
            rules_file(tmp_path, "others.yaml", "others", ""),
        ]
    )
    assert not borrows(pod(("example.com/v1", "GpuWorker")), rules)
    assert borrows(pod(("apps/v1", "ReplicaSet")), rules)


@pytest.mark.parametrize(
    ("entries", "line", "field", "message"),
    [
        ("    - apps/v1 ReplicaSet\n", 9, "policy.ownerKinds[0]", "expected a mapping"),
        ("    - {kind: GpuWorker}\n", 9, "policy.ownerKinds[0].apiVersion", "required key is missing"),
        ("    - {apiVersion: example.com/v1, kind: gpu worker}\n", 9, "policy.ownerKinds[0].kind", "not a kind"),
        ("    - {apiVersion: example.com/v1/x, kind: W}\n", 9, "policy.ownerKinds[0].apiVersion", "GROUP/VERSION"),
        ("    - {apiVersion: apps/v1, kind: StatefulSet}\n", 9, "policy.ownerKinds[0]", "never borrow"),
        (
            "    - {apiVersion: example.com/v1, kind: W}\n    - {apiVersion: example.com/v1, kind: W}\n",
            10,
            "policy.ownerKinds[1]",
            "listed twice",
        ),
        ("    - {apiVersion: example.com/v1, kind: W, name: x}\n", 9, "policy.ownerKinds[0].name", "unknown key"),
    ],
)
def test_a_bad_owner_kind_names_file_line_and_field(tmp_path, entries, line, field, message):
    path = rules_file(tmp_path, "bad.yaml", "bad", "policy:\n  ownerKinds:\n" + entries)
    with pytest.raises(ConfigError) as caught:
        load_rules([path])
    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.field) == (str(path), line, field)
    assert message in problem.message


OWNER_TEXT = st.text(max_size=300) | st.sampled_from(["apps/v1", "batch/v1", "ReplicaSet", "Job", ""])


@given(api_version=OWNER_TEXT | st.integers() | st.none(), kind=OWNER_TEXT | st.lists(st.text()) | st.none())
def test_whatever_owner_a_pod_names_only_the_safe_kinds_borrow(api_version, kind):
    """An ownerReference is the pod owner's text: it never crashes a decision, and never makes an unlisted kind
    borrow; reasons stay short."""
    document = pod((api_version, kind))
    safe = (api_version, kind) in (("apps/v1", "ReplicaSet"), ("batch/v1", "Job"))
    assert borrows(document) == safe
    verdict = place(pod_request(document), ONLY_LARGER, "n", RULES)
    if isinstance(verdict, Rejection):
        assert len(verdict.reason) <= 1024


def test_the_example_of_chains_readme_loads_with_its_owner_kinds(tmp_path):
    text = (ROOT / "chains" / "README.md").read_text()
    example = text.split("## Example\n\n```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    [chain] = load_rules([path]).chains
    assert str(next(iter(chain.policy.owner_kinds))) == "example.com/v1 GpuWorker"


@given(
    rules=chain_rules(),
    node=nodes("n"),
    request=pods(),
    owner=st.sampled_from(
        [
            OwnerKind("argoproj.io/v1alpha1", "Workflow"),
            OwnerKind("batch.volcano.sh/v1alpha1", "Job"),
            OwnerKind("v1", "X"),
        ]
    ),
)
def test_under_any_rules_a_pod_of_an_unlisted_owner_never_borrows(rules, node, request, owner):
    """Chains and policies that list no owner kinds: whatever the node offers, such a pod fits exactly or not at all."""
    verdict = place(dataclasses.replace(request, owner=owner), node, "n", rules)
    assert not (isinstance(verdict, Placement) and verdict.borrows)
