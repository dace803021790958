"""Chain rules edited live on the real control plane: new rules take effect without a restart, a broken edit changes
nothing, loans made under the old rules stay."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from extender.kube.api import ApiError
from tests.e2e.conftest import LIVE_CHAIN, Cluster, Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import create_node

pytestmark = pytest.mark.e2e

GPU = "TEST-LIVE-GPU"
LOAN = "migchain.io/replaced-uid"
ORIGINAL = LIVE_CHAIN.read_text()
TO_3G = ORIGINAL.replace("nvidia.com/mig-2g.10gb", "nvidia.com/mig-3g.20gb")  # 2g.10gb out, 3g.20gb in
BROKEN = TO_3G.replace("    types:\n", "    types: [\n")  # not YAML any more


def live_chain(cluster: Cluster) -> Path:
    [path] = [Path(p) for p in cluster.chain_files if Path(p).name == LIVE_CHAIN.name]
    return path


def write(path: Path, text: str) -> None:
    """Replace the file atomically, as an editor saving or kubelet swapping a ConfigMap would."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


@contextlib.contextmanager
def restored(cluster: Cluster) -> Iterator[Path]:
    path = live_chain(cluster)
    try:
        yield path
    finally:
        write(path, ORIGINAL)
        wait_until(lambda: "rejected" not in readiness(cluster), 30, "the original rules back")


def readiness(cluster: Cluster) -> str:
    status, body = cluster.probe("/readyz")
    assert status == 200  # ready whatever the files hold
    return str(orjson.loads(body)["detail"])


def reloaded_since(cluster: Cluster, before: float) -> bool:
    return cluster.metric("migchain_config_last_reload_success_timestamp_seconds") > before


def borrowed_type(scenario: Scenario, name: str) -> str:
    def loaned() -> str:
        with contextlib.suppress(ApiError):
            pod = scenario.pod(name)
            if LOAN in (pod["metadata"].get("annotations") or {}) and pod["spec"].get("nodeName"):
                return str(next(iter(pod["spec"]["containers"][0]["resources"]["limits"])))
        return ""

    found: str = wait_until(loaned, 60, f"{name} to borrow")
    return found


def test_an_edit_takes_effect_without_a_restart_and_a_broken_one_changes_nothing(scenario: Scenario):
    cluster = scenario.cluster
    extender_pid = cluster.extender.popen.pid if cluster.extender.popen else 0
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, GPU, {"1g.5gb": 1, "2g.10gb": 3, "3g.20gb": 3}, scenario.test)
    scenario.create_pod("filler", {"1g.5gb": 1})
    scenario.wait_bound("filler")

    with restored(cluster) as path:
        # Under the shipped rules a 1g.5gb pod borrows the 2g.10gb, one step up.
        for name in ("a0", "a1"):
            scenario.create_pod(name, {"1g.5gb": 1})
        assert {borrowed_type(scenario, name) for name in ("a0", "a1")} == {"nvidia.com/mig-2g.10gb"}
        loans_before = {name: scenario.pod(name)["metadata"]["uid"] for name in ("a0", "a1")}

        # The edit lands while a burst is being scheduled: 3g.20gb joins the chain, 2g.10gb leaves it.
        before = cluster.metric("migchain_config_last_reload_success_timestamp_seconds")
        scenario.create_pod("b0", {"1g.5gb": 1})
        write(path, TO_3G)
        wait_until(lambda: reloaded_since(cluster, before), 30, "the extender to reload the rules")
        for name in ("b1", "b2"):
            scenario.create_pod(name, {"1g.5gb": 1})
        assert borrowed_type(scenario, "b1") == borrowed_type(scenario, "b2") == "nvidia.com/mig-3g.20gb"
        borrowed_type(scenario, "b0")  # in flight at the edit: either rules, but placed
        # Loans made under the old rules stay where they are: a rule change evicts nobody.
        assert {name: scenario.pod(name)["metadata"]["uid"] for name in ("a0", "a1")} == loans_before

        # A broken edit: rejected with file and line, the last good rules stay, still ready.
        failures = cluster.metric("migchain_config_reload_failures_total")
        write(path, BROKEN)
        wait_until(lambda: cluster.metric("migchain_config_reload_failures_total") > failures, 30, "the edit rejected")
        detail = readiness(cluster)
        assert "rejected" in detail and f"{path}:" in detail and "not valid YAML" in detail
        assert cluster.metric("migchain_config_last_reload_rejected") == 1
        scenario.create_pod("c0", {"1g.5gb": 1})
        assert borrowed_type(scenario, "c0") == "nvidia.com/mig-3g.20gb"  # the rules in force did not change
        # The returner saw it too, and kept its rules: it polls the files on its own clock (every 2 s).
        wait_until(
            lambda: "chain rules edit rejected" in cluster.returners[0].log.read_text(errors="replace"),
            30,
            "the returner to reject the edit",
        )

    assert cluster.extender.popen is not None and cluster.extender.popen.pid == extender_pid  # never restarted
