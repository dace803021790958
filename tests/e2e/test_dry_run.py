"""Dry run on the real control plane: decisions announced and nothing done; then, live, the same decisions taken."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import pytest

from extender.kube.api import ApiError, path
from tests.e2e.conftest import Cluster, Scenario
from tests.e2e.controlplane import Process, wait_until
from tests.e2e.fleet import create_node

pytestmark = pytest.mark.e2e

A100 = "NVIDIA-A100-SXM4-40GB"
LOAN = "migchain.io/replaced-uid"


@contextlib.contextmanager
def dry_run(process: Process) -> Iterator[None]:
    """`process` restarted with --dry-run for the block, then restarted as it was."""
    process.argv.append("--dry-run")
    try:
        process.stop()
        process.start()
        yield
    finally:
        process.argv.remove("--dry-run")
        process.stop()
        process.start()


def events(scenario: Scenario, reason: str) -> dict[str, list[str]]:
    items, _ = scenario.api.list_all(
        path("api", "v1", "namespaces", scenario.namespace, "events"), fieldSelector=f"reason={reason}"
    )
    found: dict[str, list[str]] = {}
    for item in items:
        found.setdefault(item["involvedObject"]["name"], []).append(item.get("message", ""))
    return found


def wait_ready(cluster: Cluster) -> None:
    cluster.wait_extender_ready()


def test_a_dry_run_announces_borrows_and_returns_and_going_live_takes_exactly_those(scenario: Scenario):
    cluster = scenario.cluster
    node = f"gpu-{scenario.test}-a"
    create_node(scenario.api, node, A100, {"1g.5gb": 1, "2g.10gb": 2}, scenario.test)
    burst = ["p0", "p1", "p2"]

    # 1. Dry run: one pod fits exactly and is bound; the two others could only borrow and stay Pending.
    with dry_run(cluster.extender):
        wait_ready(cluster)
        for name in burst:
            scenario.create_pod(name, {"1g.5gb": 1})
        wait_until(lambda: len(events(scenario, "WouldBorrow")) == 2, 60, "two WouldBorrow events")
        announced = events(scenario, "WouldBorrow")
        exact = next(name for name in burst if name not in announced)
        assert scenario.wait_bound(exact) == node
        uids = {name: scenario.pod(name)["metadata"]["uid"] for name in burst}
        wait_until(
            lambda: all(
                any("dry run: would borrow" in m for m in events(scenario, "FailedScheduling").get(name, []))
                for name in announced
            ),
            60,
            "the would-be decision in FailedScheduling",
        )
        time.sleep(3)  # the scheduler retries meanwhile: still nothing may move
        for name in announced:
            pod = scenario.pod(name)
            assert pod["metadata"]["uid"] == uids[name]  # not replaced
            assert not pod["spec"].get("nodeName")
            assert LOAN not in (pod["metadata"].get("annotations") or {})
            [message] = announced[name]  # announced once, however often the scheduler retried
            assert f"would borrow on {node}: borrows: 1x 2g.10gb for 1g.5gb" in message
        assert cluster.metric("migchain_dry_run_borrows_total", requested="1g.5gb", granted="2g.10gb") >= 2
    wait_ready(cluster)

    # 2. Live: the same pods borrow exactly what was announced.
    def borrowed(name: str) -> bool:
        with contextlib.suppress(ApiError):
            pod = scenario.pod(name)
            return LOAN in (pod["metadata"].get("annotations") or {}) and bool(pod["spec"].get("nodeName"))
        return False

    wait_until(lambda: all(borrowed(name) for name in announced), 90, "the announced borrows to be taken")
    for name in announced:
        pod = scenario.pod(name)
        assert pod["spec"]["nodeName"] == node
        assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-2g.10gb": "1"}
        assert pod["metadata"]["annotations"][LOAN] == uids[name]

    # 3. Dry-run returner: the 1g.5gb frees and a pod needs a 2g.10gb, so a return is due; it is only announced.
    [returner] = [process for process in cluster.returners if process.alive()][:1]
    borrowers = {name: scenario.pod(name)["metadata"]["uid"] for name in announced}
    with dry_run(returner):
        scenario.set_phase(exact, "Succeeded")
        scenario.create_pod("needs-2g", {"2g.10gb": 1})
        wait_until(lambda: events(scenario, "WouldReturn"), 60, "a WouldReturn event")
        [(returned, [message])] = events(scenario, "WouldReturn").items()
        assert returned in borrowers
        assert re.search(rf"dry run: would return to nvidia.com/mig-1g.5gb on {node}", message)
        time.sleep(4)  # two return rounds: nothing may be evicted
        assert {name: scenario.pod(name)["metadata"]["uid"] for name in announced} == borrowers
        assert not scenario.pod("needs-2g")["spec"].get("nodeName")

    # 4. Live returner: the announced borrower is the one returned, and needs-2g takes its slice.
    def back(name: str) -> bool:
        with contextlib.suppress(ApiError):
            pod = scenario.pod(name)
            return pod["metadata"]["uid"] != borrowers[name] and LOAN not in (pod["metadata"].get("annotations") or {})
        return False

    wait_until(lambda: back(returned), 90, f"{returned} to be returned")
    assert scenario.wait_bound("needs-2g", timeout=60) == node
    other = next(name for name in announced if name != returned)
    assert scenario.pod(other)["metadata"]["uid"] == borrowers[other]
