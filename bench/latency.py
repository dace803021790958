"""Extender latency, throughput and memory under gunicorn on loopback, at 1,000 / 5,000 / 10,000 nodes.

Each size: a frozen cluster (realistic MIG layouts, 10 bound pods a node) is
written as `kubectl get nodes,pods -o json` would, served by
`migchain-extender --snapshot`, and driven with the request bodies
kube-scheduler sends (NodeNames mode; full Nodes mode). Prints p50/p99 per
verb, requests per second with 4 client threads, and the worker's RSS.
Binding needs an API server: bench/scheduler_throughput.py measures it.
First, per size, the pure core alone: filter plus score of one pod over every
node, in this process, no HTTP.

Run: .venv/bin/python bench/latency.py [--sizes 1000 5000 10000]
"""

from __future__ import annotations

import argparse
import http.client
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.controlplane import free_port  # noqa: E402

CHAINS = [str(ROOT / "chains" / f) for f in ("a100-40gb.yaml", "a100-80gb.yaml", "h100-80gb.yaml", "a30-24gb.yaml")]
FLEET = [  # share of nodes, product, per-GPU layout (GPU Operator names), GPUs per node
    (0.6, "NVIDIA-A100-SXM4-40GB", {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}, 8),
    (0.3, "NVIDIA-H100-80GB-HBM3", {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}, 8),
    (0.1, "NVIDIA-A100-SXM4-40GB", {"1g.5gb": 7}, 8),
]
PODS_PER_NODE = 10


def node_object(name: str, product: str, layout: dict[str, int], gpus: int) -> dict[str, Any]:
    mig = {f"nvidia.com/mig-{p}": str(n * gpus) for p, n in layout.items()}
    resources = {"cpu": "96", "memory": "1Ti", "ephemeral-storage": "2Ti", "pods": "110", **mig}
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "gpu-8x",
        "topology.kubernetes.io/zone": "zone-a",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/mig.capable": "true",
        "nvidia.com/mig.strategy": "mixed",
        "nvidia.com/mig.config": "all-balanced",
        "nvidia.com/mig.config.state": "success",
        **{f"nvidia.com/mig-{p}.count": str(n * gpus) for p, n in layout.items()},
    }
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1", "labels": labels},
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.37.2", "containerRuntimeVersion": "containerd://2.1.0"},
            "images": [{"names": [f"registry.example/ml/image-{i}:v1"], "sizeBytes": 2_000_000_000} for i in range(10)],
        },
    }


def pod_object(name: str, node: str, resource: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": f"uid-{name}",
            "labels": {"app": "train", "team": "vision"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "train-7d9f8", "uid": "rs", "controller": True}
            ],
        },
        "spec": {
            "schedulerName": "migchain-scheduler",
            "nodeName": node,
            "containers": [
                {
                    "name": "main",
                    "image": "registry.example/ml/train:v1",
                    "resources": {"limits": {resource: "1", "cpu": "4"}, "requests": {resource: "1", "cpu": "4"}},
                }
            ],
        },
        "status": {"phase": "Running"},
    }


def cluster(size: int, rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nodes, pods = [], []
    for index in range(size):
        share = rng.random()
        kind = FLEET[-1]
        for candidate in FLEET:
            if share < candidate[0]:
                kind = candidate
                break
            share -= candidate[0]
        _, product, layout, gpus = kind
        node = node_object(f"gpu-{index:05d}", product, layout, gpus)
        nodes.append(node)
        slots = [f"nvidia.com/mig-{p}" for p, n in layout.items() for _ in range(n * gpus)]
        for slot_index, resource in enumerate(rng.sample(slots, min(PODS_PER_NODE, len(slots)))):
            pods.append(pod_object(f"p-{index:05d}-{slot_index}", node["metadata"]["name"], resource))
    return nodes, pods


def pending_pod(resource: str) -> dict[str, Any]:
    pod = pod_object("pending-0", "", resource)
    pod["spec"].pop("nodeName")
    pod["status"] = {"phase": "Pending"}
    return pod


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0]) if children else master


def timed(port: int, path: str, body: bytes, count: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        times.append(time.perf_counter() - started)
        assert response.status == 200, response.status
    connection.close()
    return sorted(times)


def throughput(port: int, path: str, body: bytes, seconds: float = 3.0, threads: int = 4) -> float:
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def client(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < stop:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            connection.getresponse().read()
            done[slot] += 1
        connection.close()

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / seconds


def quantiles(times: list[float]) -> str:
    return f"{times[len(times) // 2] * 1000:7.2f} {times[min(len(times) - 1, int(len(times) * 0.99))] * 1000:7.2f}"


def core_times(nodes: list[dict[str, Any]], pods: list[dict[str, Any]], samples: int) -> list[float]:
    """Seconds for filter_nodes plus score_nodes of one pending pod over every node, straight on the core."""
    from extender.config import load_rules
    from extender.core.cluster import pod_request
    from extender.core.decide import filter_nodes, nodes_to_pass, score_nodes
    from extender.ledger import Ledger

    snapshot = Ledger.of_objects(nodes + pods).snapshot()
    rules = load_rules(CHAINS)
    request = pod_request(pending_pod("nvidia.com/mig-1g.5gb"))
    names = list(snapshot.nodes)
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        decision = filter_nodes(request, names, snapshot, rules, nodes_to_pass(len(names)))
        score_nodes(request, decision.passed, snapshot, rules)
        times.append(time.perf_counter() - started)
    return sorted(times)


def run(size: int, samples: int) -> None:
    rng = random.Random(size)
    nodes, pods = cluster(size, rng)
    core = core_times(nodes, pods, samples)
    print(f"\n{size} nodes: core filter+score of one pod over all of them, p50 p99 (ms): {quantiles(core)}")
    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / "cluster.json"
        snapshot.write_bytes(orjson.dumps({"kind": "List", "apiVersion": "v1", "items": nodes + pods}))
        port, health = free_port(), free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extender.serve",
                f"--bind=127.0.0.1:{port}",
                f"--health-bind=127.0.0.1:{health}",
                "--snapshot",
                str(snapshot),
                "--log-level=warning",
                "--chains",
                *CHAINS,
            ],
        )
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", health, timeout=2)
                    connection.request("GET", "/readyz")
                    if connection.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            memory = rss_mb(worker_pid(server.pid))
            names = [node["metadata"]["name"] for node in nodes]
            pod = pending_pod("nvidia.com/mig-1g.5gb")
            bodies = {
                "NodeNames 500": orjson.dumps(
                    {"Pod": pod, "NodeNames": rng.sample(names, min(500, size)), "Nodes": None}
                ),
                f"NodeNames {size}": orjson.dumps({"Pod": pod, "NodeNames": names, "Nodes": None}),
                "Nodes 500": orjson.dumps({"Pod": pod, "Nodes": {"items": rng.sample(nodes, min(500, size))}}),
            }
            print(f"\n{size} nodes, {len(pods)} pods; extender RSS {memory:.0f} MB")
            print(f"{'request':<18} {'verb':<11} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>7} {'body KB':>8}")
            for label, body in bodies.items():
                for verb in ("filter", "prioritize"):
                    times = timed(port, f"/{verb}", body, samples)
                    rate = throughput(port, f"/{verb}", body)
                    print(f"{label:<18} {verb:<11} {quantiles(times)} {rate:7.0f} {len(body) / 1024:8.0f}")
        finally:
            server.terminate()
            server.wait(10)


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000, 10000])
    cli.add_argument("--samples", type=int, default=200)
    args = cli.parse_args()
    for size in args.sizes:
        run(size, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
