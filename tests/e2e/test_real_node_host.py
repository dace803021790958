"""Two real nodes at once (two runs on one host) do not collide, and stopping them leaves the host as it was found:
its cgroups, kernel sysctls, mounts, network links, iptables and the fixed paths containerd and the kubelet use.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from extender.kube.api import path
from tests.e2e import realnode
from tests.e2e.conftest import Scenario
from tests.e2e.controlplane import wait_until
from tests.e2e.fleet import FAKE_NODE_LABEL, gpu_node
from tests.e2e.realnode import REALNODE_MARKS, ROOT, SYSCTL_LEDGER, RealNode, read_sysctls

pytestmark = REALNODE_MARKS

EAGER_GPU = "TEST-EAGER-GPU"
LAYOUT = {"1g.5gb": 1}
# Where containerd, the kubelet and the CNI plugins write by default.
FIXED_PATHS = (
    "/opt/containerd",
    "/etc/containerd",
    "/etc/cni",
    "/etc/kubernetes",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/run/netns",
    "/run/migchain-e2e-sysctls.json",
)
# A node another run (another worktree, CI) has on this host: its cgroup root comes and goes as it pleases.
OTHER_RUNS = re.compile(rf"^(kubepods|migchain-e2e-.*-(?!{os.getpid()}$)\d+)$")


def cgroup_mounts() -> list[Path]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [Path(line.split()[1]) for line in lines if line.split()[2] in ("cgroup", "cgroup2")]


def other_runs() -> set[str]:
    return {entry.name for mount in cgroup_mounts() for entry in mount.iterdir() if OTHER_RUNS.match(entry.name)}


def host_state() -> dict[str, Any]:
    """What a node could change on the host, read from the host's namespaces."""
    cgroups = {
        str(mount / entry.name)
        for mount in cgroup_mounts()
        for entry in mount.iterdir()
        if entry.is_dir() and not OTHER_RUNS.match(entry.name)
    }
    mounts = sorted(" ".join(line.split()[:3]) for line in Path("/proc/self/mounts").read_text().splitlines())
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    state: dict[str, Any] = {
        "cgroups": cgroups,
        "sysctls": read_sysctls(),
        "mounts": mounts,
        "links": sorted(line.split(":")[1].strip() for line in links.splitlines()),
        "fixed paths": sorted(path for path in FIXED_PATHS if os.path.lexists(path)),
        "other runs": bool(other_runs()),
    }
    with contextlib.suppress(FileNotFoundError):
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        state["iptables"] = sorted(re.sub(r"\[\d+:\d+\]", "", line) for line in rules.splitlines() if line[:1] in ":-")
    return state


def node_labels(name: str, test: str) -> dict[str, str]:
    labels = dict(gpu_node(name, EAGER_GPU, LAYOUT, test)[0]["metadata"]["labels"])
    del labels[FAKE_NODE_LABEL]  # kwok leaves this node to the real kubelet
    return labels


def advertises(scenario: Scenario, name: str) -> bool:
    status = scenario.api.get(path("api", "v1", "nodes", name))["status"]
    conditions = {item["type"]: item["status"] for item in status.get("conditions", [])}
    return conditions.get("Ready") == "True" and status.get("allocatable", {}).get("nvidia.com/mig-1g.5gb") == "1"


def test_two_real_nodes_run_at_once_and_leave_the_host_as_they_found_it(scenario: Scenario):
    before = host_state()
    names = ["realnode-a", "realnode-b"]
    nodes = [RealNode(scenario.cluster.plane, name, LAYOUT, node_labels(name, scenario.test)) for name in names]
    try:
        for node in nodes:
            node.start()
        for name in names:
            wait_until(lambda n=name: advertises(scenario, n), 60, f"{name} to be Ready with its MIG slice")
        # Each kubelet did change the host: there is something to put back.
        assert Path("/proc/sys/vm/overcommit_memory").read_text() == "1\n"
        assert all((mount / node.cgroup_root).is_dir() for mount in cgroup_mounts() for node in nodes)
    finally:
        # The first to start stops first: the node that found the host as it was is not the last to leave.
        for node in nodes:
            node.stop()
    after = host_state()
    if any([before.pop("other runs"), after.pop("other runs")]):
        # Another run's kubelet sets the sysctls too; they are put back when the last node on the host stops.
        del before["sysctls"], after["sysctls"]
    assert after == before


def test_what_a_killed_run_left_is_put_back_by_the_next_node_to_start():
    if SYSCTL_LEDGER.exists():
        pytest.skip("another run's nodes are on this host: the sysctls are theirs until they stop")
    before = host_state()
    # A run whose node took the sysctls and made its cgroup root, then was killed (SIGKILL) before its stop ran,
    # with kernel.panic as its kubelet set it.
    killed = (
        "import os, pathlib; from tests.e2e import realnode; "
        "realnode._take_sysctls({'pid': os.getpid(), 'node': 'killed'}); "
        "realnode._make_cgroup_root(f'migchain-e2e-killed-{os.getpid()}'); "
        "pathlib.Path('/proc/sys/kernel/panic').write_text('10'); "
        "os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", killed], cwd=ROOT, check=False)
    assert Path("/proc/sys/kernel/panic").read_text() == "10\n"
    assert killed_roots() == len(cgroup_mounts())
    # What a node's start and stop do on the host, without the rest of the node.
    holder = {"pid": os.getpid(), "node": "next"}
    realnode._remove_stale_cgroup_roots()
    realnode._take_sysctls(holder)
    realnode._release_sysctls(holder)
    assert killed_roots() == 0
    after = host_state()
    del before["other runs"], after["other runs"]
    assert after == before


def killed_roots() -> int:
    return sum(1 for mount in cgroup_mounts() for entry in mount.glob("migchain-e2e-killed-*"))
