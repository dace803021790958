"""The HTTP API against request bodies shaped exactly like kube-scheduler's, in both modes, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from extender.config import load_rules
from extender.core.cluster import NodeState, PodRequest, Snapshot
from extender.probes import health_routes
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app

ROOT = Path(__file__).resolve().parents[2]
A100 = "NVIDIA-A100-SXM4-40GB"
G1 = "nvidia.com/mig-1g.5gb"
G2 = "nvidia.com/mig-2g.10gb"
RULES = load_rules([ROOT / "chains" / "a100-40gb.yaml"])


def pod_json(resource: str = G1, count: str = "1", **annotations: str) -> dict[str, Any]:
    """A Pod as kube-scheduler serialises it (v1.Pod JSON, lower-case Kubernetes field names)."""
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": "train-0", "namespace": "ml", "uid": "5a2b", "annotations": annotations},
        "spec": {
            "schedulerName": "migchain-scheduler",
            "containers": [{"name": "main", "image": "cuda", "resources": {"limits": {resource: count}}}],
        },
        "status": {"phase": "Pending"},
    }


def node_json(name: str, **allocatable: str) -> dict[str, Any]:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {"nvidia.com/gpu.product": A100, "nvidia.com/mig.strategy": "mixed"},
        },
        "status": {"allocatable": {"cpu": "32", "pods": "110", **allocatable}},
    }


@pytest.fixture
def store() -> SnapshotStore:
    return SnapshotStore(
        Snapshot.of(
            [
                NodeState("exact", A100, "success", {G1: 2}, {G1: 1}),
                NodeState("borrow", A100, "success", {G2: 1}, {}),
                NodeState("full", A100, "success", {G1: 1}, {G1: 1}),
            ]
        )
    )


@pytest.fixture
def client(store):
    return create_app(WebSettings(max_body_bytes=64 * 1024), RulesInForce.fixed(RULES), store).test_client()


def post(client, verb: str, body: Any, content_type: str = "application/json"):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return client.post(f"/{verb}", data=data, content_type=content_type)


def test_filter_by_node_names_answers_with_names(client):
    response = post(client, "filter", {"Pod": pod_json(), "NodeNames": ["borrow", "exact", "full"], "Nodes": None})
    assert response.status_code == 200
    body = response.get_json()
    assert body["NodeNames"] == ["exact"]
    assert body["Nodes"] is None
    assert body["Error"] == ""
    # kube-scheduler reads why nodes failed only when none passes: a reason each would only grow the answer.
    assert body["FailedNodes"] == {}
    assert body["FailedAndUnresolvableNodes"] == {}


def test_filter_borrows_when_no_exact_fit_is_left(client):
    body = post(client, "filter", {"Pod": pod_json(), "NodeNames": ["borrow", "full"]}).get_json()
    assert body["NodeNames"] == ["borrow"]
    assert body["FailedNodes"] == {}


def test_when_no_node_passes_each_gets_its_reason(client):
    body = post(client, "filter", {"Pod": pod_json(**{"migchain.io/borrow": "false"}), "NodeNames": ["borrow", "full"]})
    answer = body.get_json()
    assert answer["NodeNames"] == []
    assert answer["FailedNodes"]["full"].startswith("no free 1g.5gb")
    assert "borrowing off" in answer["FailedAndUnresolvableNodes"]["borrow"]


def test_filter_with_full_node_objects_answers_with_the_same_objects(client):
    nodes = [node_json("a", **{G1: "1"}), node_json("b", **{G2: "1"}), node_json("c")]
    response = post(client, "filter", {"Pod": pod_json(), "Nodes": {"items": nodes}, "NodeNames": None})
    body = response.get_json()
    assert body["NodeNames"] is None
    assert body["Nodes"]["items"] == [nodes[0]]
    assert body["FailedNodes"] == {} and body["FailedAndUnresolvableNodes"] == {}
    # b would fit by borrowing; c never: asked alone, c passes nothing and gets its reason.
    alone = post(client, "filter", {"Pod": pod_json(), "Nodes": {"items": nodes[2:]}, "NodeNames": None}).get_json()
    assert alone["Nodes"]["items"] == []
    assert set(alone["FailedAndUnresolvableNodes"]) == {"c"}


def test_full_node_mode_counts_the_usage_the_cache_knows(client):
    # "full" is known to the cache with its one slice in use; the Node object alone would look free.
    body = post(client, "filter", {"Pod": pod_json(), "Nodes": {"items": [node_json("full", **{G1: "1"})]}}).get_json()
    assert body["Nodes"]["items"] == []
    assert "no free 1g.5gb" in body["FailedNodes"]["full"]


def test_an_unknown_node_name_fails_with_a_reason(client):
    body = post(client, "filter", {"Pod": pod_json(), "NodeNames": ["ghost"]}).get_json()
    assert body["NodeNames"] == []
    assert "not in migchain's cluster cache" in body["FailedNodes"]["ghost"]


def test_prioritize_scores_every_node_asked_in_range(client):
    response = post(client, "prioritize", {"Pod": pod_json(), "NodeNames": ["exact", "borrow", "full", "ghost"]})
    assert response.status_code == 200
    scores = {entry["Host"]: entry["Score"] for entry in response.get_json()}
    assert scores == {"exact": 10, "borrow": 5, "full": 0, "ghost": 0}


def test_prioritize_with_node_objects(client):
    nodes = [node_json("a", **{G1: "4"}), node_json("b", **{G2: "1"})]
    scores = post(client, "prioritize", {"Pod": pod_json(), "Nodes": {"items": nodes}}).get_json()
    assert scores == [{"Host": "a", "Score": 8}, {"Host": "b", "Score": 5}]


def test_the_opt_out_annotation_reaches_the_core(client):
    body = post(
        client, "filter", {"Pod": pod_json(**{"migchain.io/borrow": "false"}), "NodeNames": ["borrow"]}
    ).get_json()
    assert body["NodeNames"] == []
    assert "borrowing off" in body["FailedAndUnresolvableNodes"]["borrow"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({"NodeNames": ["a"]}, "Pod: missing"),
        ({"Pod": "x", "NodeNames": ["a"]}, "Pod: expected an object"),
        ({"Pod": pod_json(), "NodeNames": "a"}, "NodeNames: expected a list"),
        ({"Pod": pod_json(), "NodeNames": [1]}, "NodeNames: expected a list"),
        ({"Pod": pod_json()}, "neither NodeNames nor Nodes"),
        ({"Pod": pod_json(), "Nodes": {"items": {}}}, "Nodes: expected a NodeList"),
        ({"Pod": pod_json(), "Nodes": {"items": [{"metadata": {}}]}}, "Nodes.items[0].metadata.name: missing"),
        ({"Pod": pod_json(count="0.5"), "NodeNames": ["a"]}, "expected a whole number"),
        ({"Pod": pod_json(), "Nodes": {"items": [node_json("a", **{G1: "x"})]}}, "Node a: status.allocatable"),
        (b"[" * 100_000 + b"]" * 100_000, ""),
    ],
)
@pytest.mark.parametrize("verb", ["filter", "prioritize"])
def test_bad_input_is_a_400_with_a_json_error(client, verb, body, message):
    response = post(client, verb, body)
    assert response.status_code == 400
    assert response.is_json
    assert message in response.get_json()["Error"]
    assert "Traceback" not in response.get_data(as_text=True)


def test_a_huge_body_is_refused_with_400(client):
    response = post(client, "filter", {"Pod": pod_json(), "NodeNames": ["n" * 100] * 1000})
    assert response.status_code == 400
    assert "larger than" in response.get_json()["Error"]


def test_a_wrong_content_type_is_refused(client):
    response = post(client, "filter", {"Pod": pod_json(), "NodeNames": []}, content_type="text/plain")
    assert response.status_code == 415
    assert "application/json" in response.get_json()["Error"]


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/filter", 405), ("POST", "/preempt", 404)])
def test_unknown_verbs_and_methods_answer_json(client, method, path, status):
    response = client.open(path, method=method)
    assert response.status_code == status
    assert "Error" in response.get_json()


def test_health_and_readiness(store):
    """On their own port (extender.probes), answered from the same store."""
    routes = health_routes(store, RulesInForce.fixed(RULES), CollectorRegistry())
    assert routes["/healthz"]().status == 200
    assert json.loads(routes["/readyz"]().body) == {"ready": True, "detail": "standalone"}
    store.publish(store.snapshot(), ready=False)
    answer = routes["/readyz"]()
    assert answer.status == 503
    assert json.loads(answer.body)["detail"] == "waiting for the first list of nodes and pods"


@pytest.mark.parametrize("verb", ["filter", "prioritize", "bind"])
def test_until_the_cache_is_in_sync_the_verbs_answer_503_and_decide_nothing(store, verb):
    # Nodes listed, pods not yet: every slice would look free.
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), store).test_client()
    store.publish(store.snapshot(), ready=False)
    body = {"Pod": pod_json(), "NodeNames": ["exact", "full"]}
    if verb == "bind":
        body = {"PodName": "train-0", "PodNamespace": "ml", "PodUID": "5a2b", "Node": "full"}
    response = post(client, verb, body)
    assert response.status_code == 503
    assert "not ready: waiting for the first list" in response.get_json()["Error"]
    store.publish(store.snapshot(), ready=True)
    assert post(client, verb, body).status_code == (503 if verb == "bind" else 200)  # standalone: no binder


def test_a_pod_is_not_kept_off_the_slices_reserved_for_itself(client, store):
    # A bind whose outcome was never learned keeps its reservation; the pod's own retry may take those slices.
    full = NodeState("full", A100, "success", {G1: 1}, {G1: 1})
    store.publish(Snapshot({"full": full}, reserved={"5a2b": ("full", ((G1, 1),))}))
    body = {"Pod": pod_json(), "NodeNames": ["full"]}
    assert post(client, "filter", body).get_json()["NodeNames"] == ["full"]
    other = pod_json()
    other["metadata"]["uid"] = "someone-else"
    assert post(client, "filter", {"Pod": other, "NodeNames": ["full"]}).get_json()["NodeNames"] == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
wire_like = st.fixed_dictionaries(
    {},
    optional={
        "Pod": st.one_of(json_values, st.just(pod_json())),
        "NodeNames": st.one_of(json_values, st.lists(st.sampled_from(["exact", "borrow", "ghost"]))),
        "Nodes": st.one_of(json_values, st.builds(lambda items: {"items": items}, st.lists(json_values, max_size=3))),
    },
)


@given(body=wire_like | json_values, verb=st.sampled_from(["filter", "prioritize"]))
def test_any_json_body_gets_200_or_a_json_400_never_a_5xx(body, verb):
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore()).test_client()
    response = post(client, verb, json.dumps(body))
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    assert response.is_json
    if response.status_code == 400:
        assert response.get_json()["Error"]


@given(body=st.binary(max_size=200))
def test_any_bytes_get_200_or_a_json_400(body):
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore()).test_client()
    response = post(client, "filter", body)
    assert response.status_code in (200, 400)
    assert response.is_json


def test_a_pod_nominated_by_a_preemption_keeps_its_slices_from_pods_of_lower_priority(client, store):
    node = NodeState("freed", A100, "success", {G1: 1}, {})
    nominee = PodRequest("ml", "urgent", "uid-urgent", ((G1, 1),), priority=1000)
    store.publish(Snapshot({"freed": node}, nominated={"uid-urgent": ("freed", nominee)}))
    low = pod_json()
    low["spec"]["priority"] = 10
    assert post(client, "filter", {"Pod": low, "NodeNames": ["freed"]}).get_json()["NodeNames"] == []
    high = pod_json()
    high["spec"]["priority"] = 2000
    assert post(client, "filter", {"Pod": high, "NodeNames": ["freed"]}).get_json()["NodeNames"] == ["freed"]
    nominated = pod_json()
    nominated["metadata"]["uid"] = "uid-urgent"
    nominated["spec"]["priority"] = 1000
    assert post(client, "filter", {"Pod": nominated, "NodeNames": ["freed"]}).get_json()["NodeNames"] == ["freed"]
