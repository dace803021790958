"""Pods scheduled per second by the real kube-scheduler at 1,000 fake GPU nodes: with migchain, and without it.

Three configurations of kube-scheduler, each given the same burst of 1g.5gb
pods, created while no scheduler runs; the rate is measured from the first
bind to the last, and the pods are deleted before the next burst:
  (a) scheduler-config.yaml as shipped: migchain filters and binds;
  (p) the same with migchain's prioritize verb too (the setup before issue 22);
  (t) the floor of any extender: bench/trivial_extender.py wired in as
      migchain is (filter and bind, mutual TLS, gunicorn's threaded worker),
      passing every node and only posting the Binding; it watches nothing;
  (b) no extender: MIG counted by the scheduler itself (exact fits only).
Rounds run them in turn, so all see the same machine; the best of the rounds
and the spread are printed, with the CPU each component spent per pod (2 cores
shared: where the time goes) and migchain's bind latency.

Run: .venv/bin/python bench/scheduler_throughput.py [--nodes 1000] [--pods 1000] [--rounds 3]
(needs make control-plane)
"""

from __future__ import annotations

import argparse
import http.client
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
from tests.e2e.controlplane import ControlPlane, ExtenderTls, Process, free_port, wait_until  # noqa: E402
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
    """Create `pods` pending pods, start kube-scheduler with `config`, wait for every bind, delete the pods.

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
    plane.api.delete(collection, {"gracePeriodSeconds": 0})  # the next burst finds every slice free
    while plane.api.list_all(collection)[0]:
        time.sleep(0.5)
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


def start_trivial_extender(plane: ControlPlane, tls: ExtenderTls) -> str:
    """bench/trivial_extender.py served as migchain is (one gthread worker, 8 threads, mutual TLS); its URL."""
    port = free_port()
    plane._process(
        "trivial-extender",
        [
            str(Path(sys.executable).with_name("gunicorn")),
            f"--chdir={ROOT}",
            f"--bind=127.0.0.1:{port}",
            "--worker-class=gthread",
            "--workers=1",
            "--threads=8",
            "--keep-alive=5",
            f"--certfile={tls.serving.certificate}",
            f"--keyfile={tls.serving.key}",
            f"--ca-certs={tls.ca}",
            "--cert-reqs=2",  # ssl.CERT_REQUIRED: the scheduler shows its client certificate, as to migchain
            "bench.trivial_extender:app",
        ],
        env={**os.environ, "TRIVIAL_EXTENDER_KUBECONFIG": str(plane.kubeconfig)},
    )

    def answers() -> bool:
        try:
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=tls.context(as_scheduler=True))
            connection.request("POST", "/filter", b'{"NodeNames": []}', {"Content-Type": "application/json"})
            return connection.getresponse().status == 200
        except OSError:
            return False

    wait_until(answers, 60, "the trivial extender")
    return f"https://127.0.0.1:{port}"


def configurations(plane: ControlPlane, folder: Path, url: str, tls: ExtenderTls, floor_url: str) -> dict[str, Path]:
    """kube-scheduler's configuration files for (a), (p), (t) and (b), from scheduler-config.yaml."""
    document = yaml.safe_load((ROOT / "scheduler-config.yaml").read_text())
    document["clientConnection"]["kubeconfig"] = str(plane.kubeconfig)
    document["leaderElection"] = {"leaderElect": False}
    extender = document["extenders"][0]
    extender["urlPrefix"] = url
    extender["tlsConfig"] = tls.scheduler_config()
    variants = {
        "(a) migchain: filter, bind": {k: v for k, v in extender.items() if k != "prioritizeVerb"},
        "(p) + prioritize": {**extender, "prioritizeVerb": "prioritize", "weight": 5},
        "(t) trivial extender": {
            **{k: v for k, v in extender.items() if k != "prioritizeVerb"},
            "urlPrefix": floor_url,
        },
        "(b) no extender": None,
    }
    files = {}
    for index, (label, variant) in enumerate(variants.items()):
        files[label] = Path(folder) / f"scheduler-{index}.yaml"
        files[label].write_text(yaml.safe_dump({**document, "extenders": [variant] if variant else []}))
    return files


def report(
    pods: int, nodes: int, rates: dict[str, list[float]], cpu: dict[str, dict[str, float]], latency: str
) -> None:
    rounds = len(next(iter(rates.values())))
    floor = max(rates["(b) no extender"])
    print(f"\n{pods} MIG pods onto {nodes} nodes, real kube-scheduler v1.37.2, best of {rounds} rounds:")
    print(f"  {'configuration':28} {'best pods/s':>11} {'spread':>11} {'best / (b) best':>16}")
    for label, measured in rates.items():
        spread = f"{min(measured):.0f}-{max(measured):.0f}"
        print(f"  {label:28} {max(measured):11.1f} {spread:>11} {max(measured) / floor:16.0%}")
    shipped, trivial = max(rates["(a) migchain: filter, bind"]), max(rates["(t) trivial extender"])
    print(f"  (a) best / (t) best: {shipped / trivial:.0%} (migchain against the floor of any extender wired so)")
    print(f"  {latency}")
    print("\nCPU ms per pod, by component (mean of the rounds; 2 cores shared):")
    print(f"  {'component':24} " + " ".join(f"{label[:3]:>7}" for label in rates))
    first = cpu[next(iter(rates))]
    for name in sorted(first, key=lambda n: -first[n]):
        per_pod = [cpu[label].get(name, 0.0) * 1000 / (pods * rounds) for label in rates]
        print(f"  {name:24} " + " ".join(f"{value:7.2f}" for value in per_pod))


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--nodes", type=int, default=1000)
    cli.add_argument("--pods", type=int, default=1000)
    cli.add_argument("--rounds", type=int, default=3)
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
            configs = configurations(plane, Path(folder), extender.url, tls, start_trivial_extender(plane, tls))
            rates: dict[str, list[float]] = {label: [] for label in configs}
            cpu: dict[str, dict[str, float]] = {label: {} for label in configs}
            for round_ in range(args.rounds):
                for index, (label, config) in enumerate(configs.items()):
                    rate, spent = burst(plane, f"round-{round_}-{index}", args.pods, config)
                    rates[label].append(rate)
                    for name, seconds in spent.items():
                        cpu[label][name] = cpu[label].get(name, 0.0) + seconds
                    print(f"  round {round_ + 1} {label:28} {rate:7.1f} pods/s", flush=True)
            report(args.pods, args.nodes, rates, cpu, bind_latency(extender.health_url))
        finally:
            plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
