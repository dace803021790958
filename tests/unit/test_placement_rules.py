"""Where a pod may run, read from Pod and Node objects as kube-scheduler's node filters read them; never raising."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from extender.core.cluster import (
    MIGCHAIN_SCHEDULER,
    NodeState,
    ObjectError,
    PodRequest,
    node_state,
    pod_record,
    pod_request,
)
from extender.core.constraints import MAX_TOLERATIONS, Taint, node_constraints
from extender.core.decide import place
from extender.returner_cli import parser as returner_parser
from tests.strategies import chain_rules, nodes, one_value_replaced, pods
from tests.unit.objects import ROOT

NODE_LABELS = {"kubernetes.io/hostname": "gpu-1", "pool": "a100", "gpus": "8", "zone": "z1"}


def gpu_node(labels: dict[str, str] | None = None, **spec: Any) -> NodeState:
    metadata = {"name": "gpu-1", "labels": NODE_LABELS if labels is None else labels}
    return node_state({"metadata": metadata, "spec": spec, "status": {"allocatable": {"nvidia.com/mig-1g.5gb": "1"}}})


def may_run(spec: dict[str, Any], node: NodeState | None = None) -> bool:
    pod = {"metadata": {"name": "p", "namespace": "ml"}, "spec": {"containers": [], **spec}}
    return pod_request(pod).may_run_on(node if node is not None else gpu_node())


def required(*terms: Any) -> dict[str, Any]:
    return {
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}
        }
    }


def expression(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": operator, "values": list(values)}]}


@pytest.mark.parametrize(
    ("spec", "runs"),
    [
        ({}, True),
        ({"nodeSelector": {"pool": "a100"}}, True),
        ({"nodeSelector": {"pool": "a100", "zone": "z2"}}, False),  # every pair must match
        ({"nodeSelector": {"kubernetes.io/hostname": "gpu-2"}}, False),
        (required(expression("pool", "In", "h100", "a100")), True),
        (required(expression("pool", "In", "h100")), False),
        (required(expression("pool", "NotIn", "h100")), True),
        (required(expression("missing", "NotIn", "x")), True),  # an absent label is not in any set
        (required(expression("pool", "Exists")), True),
        (required(expression("missing", "Exists")), False),
        (required(expression("missing", "DoesNotExist")), True),
        (required(expression("gpus", "Gt", "4")), True),
        (required(expression("gpus", "Gt", "8")), False),
        (required(expression("gpus", "Lt", "+9")), True),  # Go's ParseInt takes a sign
        (required(expression("pool", "Gt", "1")), False),  # a label that is no number matches neither
        (required(expression("missing", "Lt", "1")), False),
        (required({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}]}), True),
        (required({"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["gpu-1"]}]}), False),
        (required(expression("pool", "In", "h100"), expression("zone", "In", "z1")), True),  # terms are ORed
        (required({**expression("pool", "In", "a100"), **expression("zone", "In", "z2")}), False),
        (required(), False),  # no term: no node
        (required({}), False),  # an empty term selects no node
        # Terms kube-scheduler cannot parse select no node; the other terms still count.
        (required(expression("pool", "In")), False),
        (required(expression("pool", "Exists", "a100")), False),
        (required(expression("gpus", "Gt", "four")), False),
        (required(expression("pool", "Like", "a100")), False),
        (required({"matchFields": [{"key": "metadata.uid", "operator": "In", "values": ["x"]}]}), False),
        (required(expression("pool", "In"), expression("pool", "In", "a100")), True),
        # Preferred affinity only ranks nodes.
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 1, "preference": expression("pool", "In", "h100")}
                        ]
                    }
                }
            },
            True,
        ),
    ],
)
def test_node_selector_and_required_node_affinity(spec, runs):
    assert may_run(spec) is runs


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("tolerations", "runs"),
    [
        ([], False),
        ([{"key": "nvidia.com/gpu", "operator": "Exists"}], True),
        ([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}], True),
        ([{"key": "nvidia.com/gpu", "value": "present"}], True),  # no operator: Equal
        ([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "absent"}], False),
        ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}], False),
        ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], True),
        ([{"operator": "Exists"}], True),  # an empty key with Exists tolerates everything
        ([{"key": "other", "operator": "Exists"}], False),
        ([{"key": "nvidia.com/gpu", "operator": "Gt", "value": "1"}], False),  # an operator it does not know
    ],
)
def test_tolerations_against_a_taint(tolerations, runs):
    assert may_run({"tolerations": tolerations}, gpu_node(taints=[GPU_TAINT])) is runs


def test_only_taints_that_keep_pods_off_count_and_a_cordon_is_one():
    assert may_run({}, gpu_node(taints=[{**GPU_TAINT, "effect": "PreferNoSchedule"}]))
    assert not may_run({}, gpu_node(taints=[{**GPU_TAINT, "effect": "NoExecute"}]))
    cordoned = gpu_node(unschedulable=True)
    assert not may_run({}, cordoned)
    assert may_run({"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}]}, cordoned)


@pytest.mark.parametrize(
    "spec",
    [
        {"nodeSelector": ["pool"]},
        {"nodeSelector": {"pool": 1}},
        {"affinity": "everywhere"},
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": 3}}}},
        required("term"),
        {"tolerations": [{"key": 5}]},
        {"tolerations": [{"operator": "Exists"}] * (MAX_TOLERATIONS + 1)},
        {"nodeSelector": {f"k{i}": "v" for i in range(1000)}},
        required(*[expression("pool", "In", "a100")] * 1000),
        {"topologySpreadConstraints": "spread"},
    ],
)
def test_rules_that_cannot_be_read_or_are_too_large_make_a_pod_that_may_run_nowhere(spec):
    request = pod_request({"metadata": {"name": "p"}, "spec": {"containers": [], **spec}})
    assert request.constraints.unreadable
    assert not request.may_run_on(gpu_node(labels={}))


@pytest.mark.parametrize(
    ("spec", "depends"),
    [
        ({"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "ScheduleAnyway"}]}, ""),
        ({"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}]}, "topology spread"),
        ({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{}]}}}, "anti-affinity"),
        ({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{}]}}}, "pod affinity"),
        ({"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{}]}}}, ""),
    ],
)
def test_what_depends_on_other_pods_is_named_and_narrows_nothing(spec, depends):
    constraints = node_constraints(spec)
    assert (depends in constraints.depends_on_pods) if depends else not constraints.depends_on_pods
    assert constraints.admits(gpu_node())


def test_scheduler_name_and_gates_are_read_from_the_pod():
    def record(**spec: Any) -> Any:
        return pod_record({"metadata": {"name": "p"}, "spec": {"containers": [], **spec}})

    assert record(schedulerName=MIGCHAIN_SCHEDULER).scheduler_name == MIGCHAIN_SCHEDULER
    assert record().scheduler_name == "default-scheduler"  # what the API server writes when none is named
    assert record(schedulerName=["x"]).scheduler_name == ""  # nobody's
    assert record(schedulingGates=[{"name": "a"}, {"name": "b"}]).gates == ("a", "b")
    assert record(schedulingGates=[{}]).gates == ("(unreadable)",)
    assert record(schedulingGates="gate").gates == ("(unreadable)",)
    assert record(schedulingGates=[]).gates == ()


def test_the_default_scheduler_name_is_the_profile_scheduler_config_serves():
    document = yaml.safe_load((ROOT / "scheduler-config.yaml").read_text())
    assert [profile["schedulerName"] for profile in document["profiles"]] == [MIGCHAIN_SCHEDULER]
    assert returner_parser().parse_args(["--chains", "x"]).scheduler_name is None  # main() uses the default
    args = returner_parser().parse_args(["--chains", "x", "--scheduler-name", "a", "--scheduler-name", "b"])
    assert args.scheduler_name == ["a", "b"]


def test_a_request_built_by_hand_may_run_anywhere_tainted_nodes_too():
    assert PodRequest("ns", "p", "u", ()).may_run_on(gpu_node(taints=[GPU_TAINT], unschedulable=True))


POD = {
    "metadata": {"name": "p", "namespace": "ml"},
    "spec": {
        "schedulerName": MIGCHAIN_SCHEDULER,
        "nodeSelector": {"pool": "a100"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [{"key": "gpus", "operator": "Gt", "values": ["4"]}],
                            "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}],
                        }
                    ]
                }
            },
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone"}]},
        },
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
        "schedulingGates": [{"name": "g"}],
        "containers": [{"name": "main", "resources": {"limits": {"nvidia.com/mig-1g.5gb": "1"}}}],
    },
}
JUNK: st.SearchStrategy[Any] = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2) | st.just({})
)


@given(mutated=one_value_replaced(POD, JUNK))
def test_no_placement_rule_ever_raises_whatever_the_pod_says(mutated):
    _, pod = mutated
    try:
        record = pod_record(pod)
    except ObjectError:
        return  # a field outside the placement rules is wrong: the cache skips the pod, as before
    record.request.may_run_on(gpu_node(taints=[GPU_TAINT]))
    record.waits_for((MIGCHAIN_SCHEDULER,))


@given(
    rules=chain_rules(), node=nodes("n"), pod=pods(), labels=st.dictionaries(st.text(max_size=3), st.text(max_size=3))
)
def test_labels_and_taints_change_no_filter_or_prioritize_decision(rules, node, pod, labels):
    """Filter and prioritize memoise by NodeState.signature, which leaves labels and taints out: they must not
    matter to `place` (kube-scheduler applied the node filters before asking migchain)."""
    labelled = dataclasses.replace(node, labels=labels, taints=(Taint("k", "v", "NoSchedule"),))
    assert labelled.signature == node.signature
    assert place(pod, labelled, "n", rules) == place(pod, node, "n", rules)


def test_equal_rules_are_one_object_and_label_strings_are_shared():
    """The cache keeps every pod and node: the pods of a workload share their rules, nodes their label strings."""
    spec = {"nodeSelector": {"pool": "a100"}, "tolerations": [{"operator": "Exists"}]}
    assert node_constraints(dict(spec)) is node_constraints(dict(spec))
    assert node_constraints({"containers": []}) is node_constraints({})
    one, two = gpu_node(labels={"pool": "a" + "100"}), gpu_node(labels={"pool": "".join(["a", "100"])})
    assert one.labels["pool"] is two.labels["pool"]
