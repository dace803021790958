"""Fuzzing the extender's HTTP API in-process: every answer is JSON, 2xx or 4xx, and bad input never reaches a bind."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from extender.core.cluster import BindRequest, node_state, pod_record
from extender.core.decide import Placement
from extender.ledger import Ledger
from extender.metrics import Metrics
from extender.probes import health_routes
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from tests.strategies import one_value_replaced
from tests.unit.test_http import G1, G2, RULES, node_json, pod_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@dataclass(frozen=True)
class _Outcome:
    error: str = ""
    placement: Placement | None = None


@dataclass
class RecordingBinder:
    """Stands where the Kubernetes binder would: records what reached it, binds nothing."""

    calls: list[BindRequest] = field(default_factory=list)

    def bind(self, args: BindRequest) -> _Outcome:
        self.calls.append(args)
        return _Outcome()


def assert_json_answer(response: Any) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.is_json
    if response.status_code >= 400:
        assert response.get_json()["Error"]


binding_fields = st.sampled_from(["PodName", "PodNamespace", "PodUID", "Node"])


@given(body=st.dictionaries(binding_fields, json_values | st.text(min_size=1, max_size=10), max_size=4) | json_values)
def test_bind_reaches_the_binder_only_with_four_non_empty_strings(body):
    binder = RecordingBinder()
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore(), binder).test_client()
    response = client.post("/bind", data=json.dumps(body), content_type="application/json")
    assert_json_answer(response)
    valid = isinstance(body, dict) and all(
        isinstance(body.get(key), str) and body[key] for key in ("PodName", "PodNamespace", "PodUID", "Node")
    )
    assert response.status_code == (200 if valid else 400)
    if valid:
        assert binder.calls == [BindRequest(body["PodNamespace"], body["PodName"], body["PodUID"], body["Node"])]
    else:
        assert binder.calls == []


VALID_ARGS = {
    "Pod": pod_json(),
    "Nodes": {"items": [node_json("a", **{"nvidia.com/mig-2g.10gb": "1"})]},
    "NodeNames": None,
}


@given(edit=one_value_replaced(VALID_ARGS, json_values), verb=st.sampled_from(["filter", "prioritize"]))
def test_a_real_request_with_any_one_value_replaced_gets_json_2xx_or_4xx(edit, verb):
    """What a buggy or hostile client sends: kube-scheduler's own body, one field anywhere set to anything."""
    _, body = edit
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore()).test_client()
    assert_json_answer(client.post(f"/{verb}", data=json.dumps(body), content_type="application/json"))


@given(
    # "?#%" change what the path is, and werkzeug's test client parses "[" as an IPv6 host before any
    # request is made: those are the client's limits, not the server's.
    path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%[]"), max_size=20),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
)
def test_any_path_and_method_get_a_json_answer(path, method):
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore()).test_client()
    response = client.open(f"/{path}", method=method, data=b"{}", content_type="application/json")
    if response.status_code == 200:  # /metrics answers Prometheus text; everything else JSON
        assert f"/{path}" in ("/healthz", "/readyz", "/metrics", "/filter", "/prioritize", "/bind")
    else:
        assert_json_answer(response)


@given(content_type=st.text(max_size=30).filter(lambda value: "\n" not in value and "\r" not in value))
def test_only_json_bodies_are_read(content_type):
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore()).test_client()
    response = client.post("/filter", data=json.dumps(VALID_ARGS), content_type=content_type)
    assert_json_answer(response)
    is_json = content_type.split(";")[0].strip().lower() == "application/json"
    assert (response.status_code == 415) != is_json


# -- hostile annotations on running pods (issue 17) -------------------------------

LOAN_KEYS = [
    "migchain.io/original-requests",
    "migchain.io/borrowed-requests",
    "migchain.io/steps",
    "migchain.io/original-resources",
    "migchain.io/chain",
    "migchain.io/replaced-uid",
    "migchain.io/restarts",
    "migchain.io/max-restarts",
    "migchain.io/return",
    "migchain.io/borrow",
]
HOSTILE_VALUES = (
    st.sampled_from(["²", "٣", "-1", "{", "[" * 3000, f"{G2}=50000000", f"{G2}=1000000000000", f"{G2}=1", "1", ""])
    | st.text(max_size=60)
    | st.from_regex(r"(nvidia\.com/mig-[0-9a-z.]{1,8}=[0-9²٣-]{1,14},?){1,3}", fullmatch=True)
)


@given(annotations=st.dictionaries(st.sampled_from(LOAN_KEYS), HOSTILE_VALUES, max_size=6))
def test_any_annotations_on_a_running_pod_leave_metrics_and_filter_answers_small(annotations):
    """A running pod whose owner wrote anything under migchain.io/: /metrics answers at once, /filter stays small."""
    ledger = Ledger()
    ledger.replace_nodes([node_state(node_json(f"gpu-{i}", **{G2: "1"})) for i in range(20)])
    running = pod_json(G2, "1", **{"migchain.io/replaced-uid": "old", "migchain.io/original-requests": f"{G1}=1"})
    running["metadata"]["annotations"].update(annotations)
    running["spec"]["nodeName"] = "gpu-0"
    running["status"]["phase"] = "Running"
    ledger.replace_pods([pod_record(running)])
    metrics = Metrics(CollectorRegistry())
    metrics.watch_cluster(lambda: (ledger.snapshot(), list(ledger.pods())))
    client = create_app(
        WebSettings(), RulesInForce.fixed(RULES), SnapshotStore(ledger.snapshot()), RecordingBinder(), metrics
    ).test_client()
    tracemalloc.start()
    scrape = health_routes(SnapshotStore(ledger.snapshot()), RulesInForce.fixed(RULES), metrics.registry)["/metrics"]
    assert scrape().status == 200
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak  # a count of 5x10^7 spelled out is 800 MiB
    pending = pod_json(G1, "1", **annotations)
    body = {"Pod": pending, "NodeNames": [f"gpu-{i}" for i in range(20)], "Nodes": None}
    response = client.post("/filter", data=json.dumps(body), content_type="application/json")
    assert_json_answer(response)
    assert len(response.get_data()) < 300 * 20
