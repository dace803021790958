"""migchain's filter against the floor: a trivial Flask app that only parses and answers, both served in one run.

A 5,000-node cluster (bench/latency.py's fleet, 10 bound pods a node) is
served by `migchain-extender --snapshot`; bench/trivial_extender.py by
gunicorn's threaded worker: the floor, Flask's own JSON reading and answer, and
a stricter one with orjson. Both get the same filter bodies (one pending
1g.5gb pod; 500 node names, then all 5,000), on kept-alive connections,
alternating in short rounds so that both see the same machine. Prints p50 and
p99 per server and the ratio of the p50s: migchain's price above parsing and
answering.

Run: .venv/bin/python bench/filter_floor.py [--nodes 5000] [--samples 600]
"""

from __future__ import annotations

import argparse
import http.client
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.latency import CHAINS, cluster, pending_pod  # noqa: E402
from tests.e2e.controlplane import free_port  # noqa: E402

ROUND = 20  # requests to one server before the other's turn
FLOOR = "trivial Flask"  # the floor: Flask's own JSON reading and answer (issue 22's measure)


def wait_ready(port: int, path: str, body: bytes, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on port {port} within {seconds:.0f} s")


def side_by_side(targets: dict[str, tuple[int, str]], body: bytes, samples: int) -> dict[str, list[float]]:
    """Each target (port, path) called `samples` times with `body`, ROUND calls at a time in turn."""
    connections = {
        name: http.client.HTTPConnection("127.0.0.1", port, timeout=30) for name, (port, _) in targets.items()
    }
    times: dict[str, list[float]] = {name: [] for name in targets}
    while min(len(t) for t in times.values()) < samples:
        for name, connection in connections.items():
            for _ in range(ROUND):
                started = time.perf_counter()
                connection.request("POST", targets[name][1], body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                times[name].append(time.perf_counter() - started)
                if response.status != 200:
                    raise RuntimeError(f"{name} answered {response.status}")
    for connection in connections.values():
        connection.close()
    return {name: sorted(t) for name, t in times.items()}


def quantile(times: list[float], q: float) -> float:
    return times[min(len(times) - 1, int(len(times) * q))] * 1000


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--nodes", type=int, default=5000)
    cli.add_argument("--samples", type=int, default=600)
    args = cli.parse_args()
    rng = random.Random(args.nodes)
    nodes, pods = cluster(args.nodes, rng)
    names = [node["metadata"]["name"] for node in nodes]
    pod = pending_pod("nvidia.com/mig-1g.5gb")
    bodies = {
        f"{n:,} names": orjson.dumps({"Pod": pod, "NodeNames": rng.sample(names, n), "Nodes": None})
        for n in sorted({min(500, args.nodes), args.nodes})
    }
    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / "cluster.json"
        snapshot.write_bytes(orjson.dumps({"kind": "List", "apiVersion": "v1", "items": nodes + pods}))
        ports = {"migchain": free_port(), "trivial": free_port()}
        targets = {
            "migchain": (ports["migchain"], "/filter"),
            FLOOR: (ports["trivial"], "/filter"),
            "trivial+orjson": (ports["trivial"], "/filter-orjson"),
        }
        servers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "extender.serve",
                    f"--bind=127.0.0.1:{ports['migchain']}",
                    f"--health-bind=127.0.0.1:{free_port()}",
                    "--snapshot",
                    str(snapshot),
                    "--log-level=warning",
                    "--chains",
                    *CHAINS,
                ],
            ),
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--worker-class",
                    "gthread",
                    "--threads",
                    "8",
                    "--workers",
                    "1",
                    "--log-level",
                    "warning",
                    f"--bind=127.0.0.1:{ports['trivial']}",
                    "bench.trivial_extender:app",
                ],
                cwd=ROOT,
            ),
        ]
        try:
            first = next(iter(bodies.values()))
            for port, path in targets.values():
                wait_ready(port, path, first)
            print(f"filter of one 1g.5gb pod, {args.nodes:,}-node cluster, {args.samples} calls each, kept alive")
            print(f"{'request':<14} {'server':<16} {'p50 ms':>7} {'p99 ms':>7} {'p50 / floor':>12}")
            for label, body in bodies.items():
                side_by_side(targets, body, ROUND)  # warm both
                times = side_by_side(targets, body, args.samples)
                floor = quantile(times[FLOOR], 0.5)
                for name, measured in times.items():
                    p50, p99 = quantile(measured, 0.5), quantile(measured, 0.99)
                    print(f"{label:<14} {name:<16} {p50:7.2f} {p99:7.2f} {p50 / floor:11.2f}x")
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
