"""Pods scheduled per second by the real kube-scheduler at 1,000 fake GPU nodes: with migchain, and without it.

(a) kube-scheduler configured by scheduler-config.yaml, migchain filtering,
    prioritizing and binding; (b) the same configuration without the extender,
    MIG counted by the scheduler itself as extended resources (exact fits only).
The same burst of 1g.5gb pods is created while no scheduler runs; the rate is
measured from the first bind to the last. Also prints migchain's own bind
latency (its histogram) from run (a).

Run: .venv/bin/python bench/scheduler_throughput.py [--nodes 1000] [--pods 1000]   (needs make control-plane)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extender.kube.api import path  # noqa: E402
from tests.e2e.controlplane import ControlPlane, ExtenderTls, Process  # noqa: E402
from tests.e2e.fleet import create_node, mig_pod  # noqa: E402

CHAINS = [str(ROOT / "chains" / "a100-40gb.yaml")]


def in_threads(count: int, work, threads: int = 6) -> None:  # type: ignore[no-untyped-def]
    def run(offset: int) -> None:
        for index in range(offset, count, threads):
            work(index)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def cpu_seconds(process: Process) -> float:
    """User plus system CPU time of a process group (gunicorn's workers are in the master's group)."""
    if process.popen is None:
        return 0.0
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == process.popen.pid:  # field 5, pgrp, counted after the ")"
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def burst(plane: ControlPlane, namespace: str, pods: int, config: Path) -> tuple[float, dict[str, float]]:
    """Create `pods` pending pods, start kube-scheduler with `config`.

    Returns pods bound per second and the CPU seconds each component spent from
    the scheduler's start until the last pod was bound (on 2 cores the
    components compete for CPU, so this shows where the time goes).
    """
    plane.ensure_namespace(namespace)
    collection = path("api", "v1", "namespaces", namespace, "pods")
    in_threads(pods, lambda i: plane.api.create(collection, mig_pod(f"p{i:05d}", "bench", {"1g.5gb": 1})))
    before = {name: cpu_seconds(process) for name, process in plane.processes.items()}
    scheduler = plane.start_scheduler_with(config)
    first = last = 0.0
    bound = 0
    deadline = time.monotonic() + 600
    while bound < pods and time.monotonic() < deadline:
        items, _ = plane.api.list_all(collection)
        now_bound = sum(1 for item in items if item["spec"].get("nodeName"))
        now = time.monotonic()
        if now_bound and not first:
            first = now
        if now_bound > bound:
            bound, last = now_bound, now
        time.sleep(0.25)
    spent = {name: cpu_seconds(process) - before.get(name, 0.0) for name, process in plane.processes.items()}
    scheduler.stop()
    if bound < pods:
        raise RuntimeError(f"only {bound} of {pods} pods were bound")
    return pods / max(last - first, 1e-3), spent


def bind_latency(health_url: str) -> str:
    with urllib.request.urlopen(f"{health_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("verb") == "bind":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    quantile = {q: next((le for le, count in buckets if count >= q * total), float("inf")) for q in (0.5, 0.99)}
    p50, p99 = quantile[0.5] * 1000, quantile[0.99] * 1000
    return f"bind latency (histogram bucket bounds): p50 <= {p50:.1f} ms, p99 <= {p99:.1f} ms"


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--nodes", type=int, default=1000)
    cli.add_argument("--pods", type=int, default=1000)
    args = cli.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        plane = ControlPlane(Path(folder))
        try:
            plane.start()
            plane.start_kwok()
            started = time.monotonic()
            layout = {"1g.5gb": 16, "2g.10gb": 8, "3g.20gb": 8}  # 8 GPUs, all-balanced
            in_threads(
                args.nodes, lambda i: create_node(plane.api, f"gpu-{i:05d}", "NVIDIA-A100-SXM4-40GB", layout, "bench")
            )
            print(f"{args.nodes} nodes created in {time.monotonic() - started:.0f} s")
            tls = ExtenderTls.issue(Path(folder))  # mutual TLS, as shipped: its cost is part of the figure
            extender = plane.start_extender(tls, CHAINS, "--log-level=warning")
            document = yaml.safe_load((ROOT / "scheduler-config.yaml").read_text())
            document["clientConnection"]["kubeconfig"] = str(plane.kubeconfig)
            document["leaderElection"] = {"leaderElect": False}
            document["extenders"][0]["urlPrefix"] = extender.url
            document["extenders"][0]["tlsConfig"] = tls.scheduler_config()
            with_migchain = Path(folder) / "with.yaml"
            with_migchain.write_text(yaml.safe_dump(document))
            del document["extenders"]
            without = Path(folder) / "without.yaml"
            without.write_text(yaml.safe_dump(document))
            rate_with, cpu_with = burst(plane, "with-migchain", args.pods, with_migchain)
            latency = bind_latency(extender.health_url)
            rate_without, cpu_without = burst(plane, "without-extender", args.pods, without)
            print(f"\n{args.pods} MIG pods onto {args.nodes} nodes, real kube-scheduler v1.37.2:")
            print(f"  (a) with migchain (filter, prioritize, bind): {rate_with:7.1f} pods/s")
            print(f"  (b) no extender, MIG counted by the scheduler: {rate_without:7.1f} pods/s")
            print(f"  ratio a/b: {rate_with / rate_without:.0%}")
            print(f"  {latency}")
            print("\nCPU ms per pod, by component (2 cores shared):")
            print(f"  {'component':24} {'(a)':>7} {'(b)':>7}")
            for name in sorted(cpu_with, key=lambda n: -cpu_with[n]):
                per_pod = (cpu_with[name] * 1000 / args.pods, cpu_without.get(name, 0.0) * 1000 / args.pods)
                print(f"  {name:24} {per_pod[0]:7.2f} {per_pod[1]:7.2f}")
        finally:
            plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
