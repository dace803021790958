"""The re-carver's steps against a scripted API server, and the pure helpers of core/migconfig.py."""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Sequence
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import ObjectError, Snapshot, node_state, pod_record
from extender.core.migconfig import (
    FOREIGN_LABELS,
    MIG_CONFIG_LABEL,
    OPT_IN_LABEL,
    RECORD_ANNOTATION,
    RecarveRecord,
    config_name,
    named_config,
    read_record,
    refusal,
    with_config,
)
from extender.core.recarve import GPU_COUNT_LABEL, RECARVING_TAINT, RecarvePolicy
from extender.kube.api import ApiError
from extender.kube.events import EventRecorder
from extender.kube.explain import render
from extender.kube.recarver import ConfigMapRef, Recarver
from extender.kube.snapshot import read_cluster
from extender.metrics import ReturnerMetrics
from tests.unit.objects import G1, G2, G3, RULES, node, pod

CONFIG_MAP = ConfigMapRef("gpu-operator", "custom-mig-config")
CONFIG_PATH = "/api/v1/namespaces/gpu-operator/configmaps/custom-mig-config"
BALANCED = {G1: 2, G2: 1, G3: 1}
NOW = 1_800_000_000.0  # 2027-01-15
LONG_AGO = "2027-01-15T07:00:00Z"  # an hour before NOW: a pod created then has waited long enough


def carvable(name: str, slices: dict[str, int] = BALANCED, **labels: str) -> dict[str, Any]:
    obj = node(name, slices)
    obj["metadata"]["labels"].update(
        {OPT_IN_LABEL: "true", GPU_COUNT_LABEL: "1", MIG_CONFIG_LABEL: "all-balanced", **labels}
    )
    obj["metadata"]["annotations"] = {}
    obj["metadata"]["resourceVersion"] = "1"
    return obj


class ScriptedApi:
    """Nodes, pods and one ConfigMap in memory; node patches merge labels and annotations (None removes)."""

    def __init__(self, nodes: list[dict[str, Any]], pods: Sequence[dict[str, Any]] = (), configs: str = "") -> None:
        self.nodes = {obj["metadata"]["name"]: obj for obj in nodes}
        self.pods = list(pods)
        self.configmap: dict[str, Any] = {"metadata": {"name": "custom-mig-config", "resourceVersion": "1"}, "data": {}}
        self.configmap_missing = False
        if configs:
            self.configmap["data"]["config.yaml"] = configs
        self.events: list[tuple[str, str]] = []
        self.patches: list[str] = []
        self.fail: str = ""  # a path whose writes fail with no answer

    def get(self, resource: str, **_: Any) -> dict[str, Any]:
        if resource == CONFIG_PATH and self.configmap_missing:
            raise ApiError(404, "NotFound", 'configmaps "custom-mig-config" not found')
        if resource == CONFIG_PATH:
            return copy.deepcopy(self.configmap)
        name = resource.rsplit("/", 1)[1]
        if resource.startswith("/api/v1/nodes/") and name in self.nodes:
            return copy.deepcopy(self.nodes[name])
        raise ApiError(404, "NotFound", resource)

    def patch(self, resource: str, body: Any, content_type: str = "") -> dict[str, Any]:
        if self.fail and resource.startswith(self.fail):
            raise ApiError(0, "NoAnswer", resource)
        self.patches.append(resource)
        if resource == CONFIG_PATH:
            if body["metadata"]["resourceVersion"] != self.configmap["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "changed")
            self.configmap["data"].update(body["data"])
            self.configmap["metadata"]["resourceVersion"] += "1"
            return {}
        name = resource.rsplit("/", 1)[1]
        metadata = self.nodes[name]["metadata"]
        if body["metadata"].get("resourceVersion", metadata["resourceVersion"]) != metadata["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        metadata["resourceVersion"] = str(int(metadata["resourceVersion"]) + 1)
        if "spec" in body:  # a merge patch replaces a list whole
            self.nodes[name].setdefault("spec", {})["taints"] = body["spec"]["taints"] or []
        for field in ("labels", "annotations"):
            for key, value in (body["metadata"].get(field) or {}).items():
                if value is None:
                    metadata.setdefault(field, {}).pop(key, None)
                else:
                    metadata.setdefault(field, {})[key] = value
        return {}

    def list_all(self, resource: str, **query: Any) -> tuple[list[dict[str, Any]], str]:
        if resource == "/api/v1/nodes":
            return [copy.deepcopy(obj) for obj in self.nodes.values()], "1"
        if "fieldSelector" not in query:
            return copy.deepcopy(self.pods), "1"
        where = query["fieldSelector"].removeprefix("spec.nodeName=")
        return [p for p in self.pods if p["spec"].get("nodeName") == where], "1"

    def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        self.events.append((body["involvedObject"]["name"], body["reason"]))
        return {}

    # What the MIG Manager and the device plugin would do.
    def carve(self, name: str, slices: dict[str, int], state: str = "success") -> None:
        obj = self.nodes[name]
        obj["metadata"]["labels"]["nvidia.com/mig.config.state"] = state
        obj["status"]["allocatable"] = {"pods": "110", **{r: str(n) for r, n in slices.items()}}

    def record(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.nodes[name]["metadata"]["annotations"][RECORD_ANNOTATION]))


def recarver(
    api: ScriptedApi, *, dry_run: bool = False, metrics: ReturnerMetrics | None = None, quiet: float = 0.0
) -> Recarver:
    return Recarver(
        api,  # type: ignore[arg-type]
        EventRecorder(api),  # type: ignore[arg-type]
        metrics or ReturnerMetrics(),
        RecarvePolicy(sustained_seconds=60, cooldown_seconds=600, max_in_flight=2),
        CONFIG_MAP,
        dry_run=dry_run,
        quiet_seconds=quiet,
        clock=lambda: NOW,
    )


def round_of(subject: Recarver, api: ScriptedApi, now: float = NOW) -> None:
    """One round on the cluster as the API holds it now (the cache would show the same)."""
    records = []
    for obj in api.pods:
        with contextlib.suppress(ObjectError):  # the cache skips a pod it cannot read, as here
            records.append(pod_record(obj))
    used: dict[str, dict[str, int]] = {}
    for record in records:
        if record.holds_slices:
            for resource, count in record.request.mig:
                used.setdefault(record.node, {})[resource] = used.setdefault(record.node, {}).get(resource, 0) + count
    snapshot = Snapshot.of(node_state(obj, used.get(name)) for name, obj in api.nodes.items())
    subject.clock = lambda: now
    subject.round(snapshot, records, RULES, schedulers=("migchain-scheduler",), leading=lambda: True)


def waiting(name: str, slices: int = 3) -> dict[str, Any]:
    """A pending pod that no all-balanced GPU holds, not borrowing, created long ago."""
    obj = pod(name, {G1: slices}, created=LONG_AGO, phase="Pending")
    obj["metadata"]["annotations"] = {"migchain.io/borrow": "false"}
    return obj


def outcomes(metrics: ReturnerMetrics) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "migchain_recarves"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def test_an_idle_node_is_recorded_then_configured_then_labelled_and_counted_once_it_shows_the_layout():
    api = ScriptedApi([carvable("a")], [waiting("p1"), waiting("p2")], yaml.safe_dump({"mig-configs": {"x": []}}))
    metrics = ReturnerMetrics()
    subject = recarver(api, metrics=metrics)
    round_of(subject, api)
    record = api.record("a")
    assert record["step"] == "labelled" and record["previous"] == "all-balanced"
    assert api.nodes["a"]["metadata"]["labels"][MIG_CONFIG_LABEL] == record["config"] == config_name(record["layout"])
    written = yaml.safe_load(api.configmap["data"]["config.yaml"])["mig-configs"]
    assert written == {"x": [], record["config"]: named_config(record["layout"])}  # the admin's config kept
    assert api.patches[0] == "/api/v1/nodes/a"  # the record before anything else
    round_of(subject, api, NOW + 5)
    assert api.record("a")["step"] == "labelled"  # not counted before the allocatable shows it
    api.carve("a", record["layout"])
    round_of(subject, api, NOW + 70)
    done = api.record("a")
    assert done["step"] == "done" and done["history"] == [NOW]
    assert outcomes(metrics) == {"applied": 1.0}
    assert ("a", "Recarving") in api.events and ("a", "Recarved") in api.events


def test_a_busy_node_is_never_planned_and_a_pod_bound_meanwhile_abandons_the_recarve():
    holder = pod("holder", {G3: 1}, "busy")
    api = ScriptedApi([carvable("busy"), carvable("idle")], [holder, waiting("p1")])
    subject = recarver(api)
    api.fail = "/api/v1/nodes/idle"  # the label write gets no answer: the recarve stays planned at most
    round_of(subject, api)
    assert RECORD_ANNOTATION not in api.nodes["busy"]["metadata"]["annotations"]
    api.fail = ""
    api.nodes["idle"]["metadata"]["annotations"][RECORD_ANNOTATION] = RecarveRecord(
        step="planned", config="migchain-7x1g.5gb", layout={G1: 7}, previous="all-balanced", started=NOW
    ).text()
    api.pods.append(pod("intruder", {G1: 1}, "idle"))  # bound between the record and the label
    subject.new_term()
    round_of(subject, api)
    assert api.record("idle")["step"] == "abandoned"
    assert api.nodes["idle"]["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    assert "config.yaml" not in api.configmap["data"]


def test_a_failed_apply_puts_the_label_back_and_the_node_cools_down():
    api = ScriptedApi([carvable("a")], [waiting("p1")])
    metrics = ReturnerMetrics()
    subject = recarver(api, metrics=metrics)
    round_of(subject, api)
    api.nodes["a"]["metadata"]["labels"]["nvidia.com/mig.config.state"] = "failed"
    round_of(subject, api, NOW + 5)
    assert api.record("a")["step"] == "failed"
    assert api.nodes["a"]["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    api.carve("a", BALANCED)  # the MIG Manager applies the old config again
    round_of(subject, api, NOW + 10)
    assert api.record("a")["step"] == "failed"  # cooling down: not planned again
    assert outcomes(metrics) == {"failed": 1.0}


def test_a_new_leader_finishes_a_recarve_from_the_record_on_the_node():
    api = ScriptedApi([carvable("a")], [waiting("p1")])
    first = recarver(api)
    round_of(first, api)
    config = api.record("a")["config"]
    api.carve("a", api.record("a")["layout"])
    metrics = ReturnerMetrics()
    second = recarver(api, metrics=metrics)  # the first was killed: the second knows only the Node
    round_of(second, api, NOW + 30)
    assert api.record("a")["step"] == "done" and api.record("a")["config"] == config
    assert outcomes(metrics) == {"applied": 1.0}


def test_dry_run_announces_once_and_writes_nothing():
    api = ScriptedApi([carvable("a")], [waiting("p1")])
    metrics = ReturnerMetrics()
    subject = recarver(api, dry_run=True, metrics=metrics)
    round_of(subject, api)
    round_of(subject, api, NOW + 5)
    assert api.patches == []
    assert api.events == [("a", "WouldRecarve")]
    assert outcomes(metrics) == {"dry-run": 1.0}


def test_pods_that_have_not_waited_long_enough_or_fit_by_borrowing_are_no_demand():
    young = pod("young", {G1: 3}, created="2027-01-15T07:59:50Z", phase="Pending")
    borrows = pod("borrows", {G1: 1}, created=LONG_AGO, phase="Pending")  # fits the free 1g.5gb exactly
    api = ScriptedApi([carvable("a")], [young, borrows])
    round_of(recarver(api), api)
    assert api.patches == []


@pytest.mark.parametrize(
    ("labels", "why"),
    [
        ({"gpu": "on"}, "gpu=on"),
        ({"nvidia.com/gpu.deploy.device-plugin": "false"}, "device-plugin=false"),
        ({"nvidia.com/gpu.deploy.mig-manager": "false"}, "no MIG Manager"),
        ({MIG_CONFIG_LABEL: None}, "no nvidia.com/mig.config"),
        ({GPU_COUNT_LABEL: None}, "nvidia.com/gpu.count"),
        ({"nvidia.com/mig.config.state": "pending"}, "busy"),
    ],
)
def test_nodes_another_mig_manager_owns_or_that_cannot_be_read_are_refused(labels: dict[str, Any], why: str):
    obj = carvable("a")
    for key, value in labels.items():
        if value is None:
            obj["metadata"]["labels"].pop(key)
        else:
            obj["metadata"]["labels"][key] = value
    assert why in refusal(node_state(obj), FOREIGN_LABELS)
    api = ScriptedApi([obj], [waiting("p1")])
    round_of(recarver(api), api)
    assert api.patches == [] and api.events == [("a", "RecarveRefused")]


def test_a_config_name_is_a_label_value_and_names_its_layout():
    assert config_name({G1: 7}) == "migchain-7x1g.5gb"
    assert config_name({G1: 3, G2: 2}) == "migchain-3x1g.5gb-2x2g.10gb"
    long = {f"nvidia.com/mig-{i}g.{i * 10}gb": 1 for i in range(1, 8)}
    assert config_name(long).startswith("migchain-") and len(config_name(long)) <= 63


def test_with_config_keeps_every_other_config_and_refuses_what_the_mig_manager_would_not_read():
    document = {"version": "v1", "mig-configs": {"all-balanced": [{"devices": "all"}]}}
    updated = with_config(document, "migchain-7x1g.5gb", {G1: 7})
    assert updated is not None and updated["mig-configs"]["all-balanced"] == [{"devices": "all"}]
    assert with_config(updated, "migchain-7x1g.5gb", {G1: 7}) is None
    broken: Any
    for broken in ([], {"mig-configs": []}, {"version": "v2", "mig-configs": {}}):
        with pytest.raises(ValueError, match="MIG"):
            with_config(broken, "migchain-7x1g.5gb", {G1: 7})


def test_a_record_reads_back_as_written():
    record = RecarveRecord(
        step="labelled", config="migchain-7x1g.5gb", layout={G1: 7}, previous="all-balanced", serves={G1: 5},
        started=NOW, labelled=NOW + 1, history=(NOW - 4000,), reason="why",
    )  # fmt: skip
    assert read_record(record.text()) == record


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(), lambda inner: (
    st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["step", "config", "layout", "previous", "serves", "started", "history", "x", G1]), inner, max_size=5)
)))  # fmt: skip
def test_a_forged_or_broken_record_is_a_reason_never_an_exception(value: Any):
    for text in (json.dumps(value), str(value)):
        assert isinstance(read_record(text), RecarveRecord | str)


def test_a_record_with_numbers_no_float_holds_is_a_reason_never_an_exception():
    for started in ("10" + "0" * 400, "1e999", "NaN"):
        text = '{"step": "planned", "config": "migchain-7x1g.5gb", "started": ' + started + "}"
        read = read_record(text)
        assert isinstance(read, RecarveRecord | str)
    assert read_record('{"step": "planned", "started": ' + "9" * 400 + "}") == "unreadable (OverflowError)"


def test_a_pod_whose_mig_request_cannot_be_read_counts_as_a_holder_and_abandons_the_recarve():
    api = ScriptedApi([carvable("idle")], [waiting("p1")])
    subject = recarver(api)
    api.nodes["idle"]["metadata"]["annotations"][RECORD_ANNOTATION] = RecarveRecord(
        step="planned", config="migchain-7x1g.5gb", layout={G1: 7}, previous="all-balanced", started=NOW
    ).text()
    odd = pod("odd", {G1: 1}, "idle")
    odd["spec"]["containers"][0]["resources"]["limits"][G1] = "\u0663"  # an Arabic-Indic 3: no quantity
    api.pods.append(odd)
    subject.new_term()
    round_of(subject, api)
    assert api.record("idle")["step"] == "abandoned"
    assert api.nodes["idle"]["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"


def test_a_record_write_without_an_answer_holds_up_no_other_node_and_is_read_back_next_round():
    api = ScriptedApi([carvable("a"), carvable("b")], [waiting(f"p{i}") for i in range(4)])
    subject = recarver(api)
    api.fail = "/api/v1/nodes/a"
    round_of(subject, api)
    assert RECORD_ANNOTATION not in api.nodes["a"]["metadata"]["annotations"]
    assert api.record("b")["step"] == "labelled"
    api.fail = ""
    round_of(subject, api, NOW + 5)  # the records read afresh: a is planned again, b followed
    assert api.record("a")["step"] == "labelled" and api.record("b")["step"] == "labelled"


def test_explain_says_a_pending_pod_waits_for_the_recarve_under_way_and_no_longer_once_it_is_done():
    api = ScriptedApi([carvable("a")], [waiting("p1")])
    subject = recarver(api)
    round_of(subject, api)
    text = render(read_cluster(api), RULES, "ml", "p1", nodes=None, output="text")  # type: ignore[arg-type]
    assert f"it waits for a re-carve: node a is being re-carved as {api.record('a')['config']}" in text
    api.carve("a", api.record("a")["layout"])
    round_of(subject, api, NOW + 30)
    text = render(read_cluster(api), RULES, "ml", "p1", nodes=None, output="json")  # type: ignore[arg-type]
    assert "re-carve" not in text


def test_demand_a_recarve_under_way_serves_is_not_asked_of_another_node():
    api = ScriptedApi([carvable("a"), carvable("b")], [waiting("p1")])
    subject = recarver(api)
    for second in range(0, 60, 5):  # the MIG Manager is slow: the pod stays pending all along
        round_of(subject, api, NOW + second)
    planned = [name for name in ("a", "b") if RECORD_ANNOTATION in api.nodes[name]["metadata"]["annotations"]]
    assert len(planned) == 1


def taints(api: ScriptedApi, name: str) -> list[str]:
    return [taint["key"] for taint in api.nodes[name].get("spec", {}).get("taints") or []]


def test_the_node_is_tainted_first_its_pods_read_after_the_quiet_time_and_the_taint_goes_with_the_recarve():
    tolerant = waiting("p1")
    tolerant["spec"]["tolerations"] = [{"key": "admins-own", "operator": "Exists"}]  # else it may not run there
    api = ScriptedApi([carvable("a")], [tolerant])
    api.nodes["a"]["spec"] = {"taints": [{"key": "admins-own", "effect": "NoSchedule"}]}
    subject = recarver(api, quiet=5)
    round_of(subject, api)
    assert api.record("a")["step"] == "planned" and taints(api, "a") == ["admins-own", RECARVING_TAINT]
    assert api.nodes["a"]["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    round_of(subject, api, NOW + 2)
    assert api.record("a")["step"] == "planned"
    round_of(subject, api, NOW + 5)
    assert api.record("a")["step"] == "labelled"
    api.carve("a", api.record("a")["layout"])
    round_of(subject, api, NOW + 10)
    assert api.record("a")["step"] == "done" and taints(api, "a") == ["admins-own"]


def test_a_taint_set_meanwhile_by_someone_else_is_kept():
    api = ScriptedApi([carvable("a")], [waiting("p1")])
    subject = recarver(api, quiet=5)
    round_of(subject, api)
    node = api.nodes["a"]
    node["spec"]["taints"].append({"key": "drain", "effect": "NoExecute"})
    node["metadata"]["resourceVersion"] = "99"
    round_of(subject, api, NOW + 5)
    assert sorted(taints(api, "a")) == ["drain", RECARVING_TAINT] and api.record("a")["step"] == "labelled"


PROFILES = st.builds(
    lambda c, m, suffix: f"nvidia.com/mig-{c}g.{m}gb{suffix}",
    st.integers(1, 7),
    st.sampled_from([5, 10, 20, 40, 80, 141]),
    st.sampled_from(["", ".me", "-me", ".me.all"]),
)


@given(st.dictionaries(PROFILES, st.integers(1, 7), min_size=1, max_size=7))
def test_every_layout_gets_a_config_name_that_is_a_label_value_and_two_layouts_never_share_one(layout: dict[str, int]):
    name = config_name(layout)
    assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?", name) and name.startswith("migchain-")
    other = {**layout, next(iter(layout)): layout[next(iter(layout))] + 1}
    assert config_name(other) != name


def test_a_recarve_under_way_on_a_node_no_longer_opted_in_still_counts_against_the_in_flight_limit():
    api = ScriptedApi([carvable("a"), carvable("b"), carvable("c")], [waiting(f"p{i}") for i in range(6)])
    subject = recarver(api)  # at most two nodes at once
    round_of(subject, api)
    [first, second] = [n for n in "abc" if RECORD_ANNOTATION in api.nodes[n]["metadata"]["annotations"]]
    api.nodes[first]["metadata"]["labels"][OPT_IN_LABEL] = "false"
    round_of(subject, api, NOW + 5)
    assert [n for n in "abc" if RECORD_ANNOTATION in api.nodes[n]["metadata"]["annotations"]] == [first, second]


@pytest.mark.parametrize("broken", ["missing", "not yaml: [", "version: v9\nmig-configs: {}\n"])
def test_a_config_map_that_cannot_be_written_ends_the_recarve_and_frees_the_node(broken: str):
    api = ScriptedApi([carvable("a")], [waiting("p1")], configs="" if broken == "missing" else broken)
    api.configmap_missing = broken == "missing"
    metrics = ReturnerMetrics()
    round_of(recarver(api, metrics=metrics), api)
    assert api.record("a")["step"] == "failed" and "custom-mig-config" in api.record("a")["reason"]
    assert taints(api, "a") == [] and api.nodes["a"]["metadata"]["labels"][MIG_CONFIG_LABEL] == "all-balanced"
    assert outcomes(metrics) == {"failed": 1.0}
