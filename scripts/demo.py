"""`make run`: a borrow and a return, step by step, on a real control plane on loopback.

Starts etcd, kube-apiserver, kube-controller-manager, kwok (the fake nodes' kubelet),
migchain-extender (mutual TLS), migchain-returner and kube-scheduler with the
repo's scheduler-config.yaml (the binaries `make control-plane` builds), then
plays a short story on one fake A100 and prints `migchain status` after each
step. Everything runs in a temporary folder and stops at the end; with
--keep it stays up until Ctrl-C and prints how to reach it.

Run: make run   (or .venv/bin/python scripts/demo.py [--keep])
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extender.core.cluster import REPLACED_UID_ANNOTATION  # noqa: E402
from extender.kube.api import ApiError, path  # noqa: E402
from tests.e2e.controlplane import ControlPlane, ExtenderTls, running, wait_until  # noqa: E402
from tests.e2e.fleet import create_node, mig_pod  # noqa: E402

CHAINS = [str(ROOT / "chains" / "a100-40gb.yaml")]
NAMESPACE = "demo"
NODE = "gpu-a100-0"
# One A100-40GB in the GPU Operator's all-balanced layout.
LAYOUT = {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}


class Story:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.api = plane.api
        self.pods = path("api", "v1", "namespaces", NAMESPACE, "pods")
        self.step = 0

    def say(self, title: str, text: str) -> None:
        self.step += 1
        print(f"\n\033[1m== {self.step}. {title}\033[0m\n{text}")

    def status(self) -> None:
        print()
        subprocess.run(
            [sys.executable, "-m", "extender.cli", "status", f"--kubeconfig={self.plane.kubeconfig}"], check=False
        )

    def create(self, name: str, profile: str) -> None:
        self.api.create(self.pods, mig_pod(name, NAMESPACE, {profile: 1}))

    def pod(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get(f"{self.pods}/{name}")
        except ApiError:
            return None

    def bound(self, name: str) -> dict[str, Any] | None:
        pod = self.pod(name)
        return pod if pod and pod["spec"].get("nodeName") else None

    def events(self, reason: str) -> list[str]:
        items, _ = self.api.list_all(
            path("api", "v1", "namespaces", NAMESPACE, "events"), fieldSelector=f"reason={reason}"
        )
        return [f"  {item['involvedObject']['name']}: {item.get('message', '')}" for item in items]


def play(story: Story) -> None:
    story.say(
        "A GPU node",
        f"{NODE}: one A100-40GB partitioned all-balanced, as the GPU Operator's mixed strategy reports it:\n"
        "2x nvidia.com/mig-1g.5gb, 1x nvidia.com/mig-2g.10gb, 1x nvidia.com/mig-3g.20gb.",
    )
    create_node(story.api, NODE, "NVIDIA-A100-SXM4-40GB", LAYOUT, NAMESPACE)
    story.plane.ensure_namespace(NAMESPACE)
    story.status()

    story.say(
        "Three pods fit exactly",
        "train-a and train-b ask for 1g.5gb each and take the two 1g.5gb slices; render-e takes the 3g.20gb.",
    )
    for name, profile in (("train-a", "1g.5gb"), ("train-b", "1g.5gb"), ("render-e", "3g.20gb")):
        story.create(name, profile)
    for name in ("train-a", "train-b", "render-e"):
        wait_until(lambda name=name: story.bound(name), 30, f"{name} to be bound")
    story.status()

    story.say(
        "A fourth pod borrows",
        "infer-c asks for 1g.5gb too. None is free, but the 2g.10gb is, one step up the chain\n"
        "1g.5gb -> 2g.10gb -> 3g.20gb: migchain binds it there by replacing the pod with one that\n"
        "requests 2g.10gb, and records the loan on it.",
    )
    story.create("infer-c", "1g.5gb")
    borrower = wait_until(
        lambda: (p := story.bound("infer-c")) and REPLACED_UID_ANNOTATION in p["metadata"]["annotations"] and p,
        30,
        "infer-c to borrow",
    )
    print("\n".join(story.events("Borrowed")))
    story.status()

    story.say(
        "A slice frees up; nobody needs the 2g.10gb yet",
        "train-a completes. With the on-demand return mode (the shipped default) the returner moves\n"
        "nobody: a return restarts the borrower, worth it only when someone waits for the large slice.",
    )
    story.api.patch(f"{story.pods}/train-a/status", {"status": {"phase": "Succeeded"}})
    time.sleep(4)
    assert (story.pod("infer-c") or {}).get("metadata", {}).get("uid") == borrower["metadata"]["uid"]
    story.status()

    story.say(
        "Someone needs the 2g.10gb: the borrower is returned",
        "tune-d asks for 2g.10gb, which infer-c holds (and the 3g.20gb it could borrow is taken).\n"
        "The returner evicts infer-c (through the Eviction\n"
        "API, PodDisruptionBudgets respected) and restores it with its original 1g.5gb request; the\n"
        "freed 2g.10gb goes to tune-d.",
    )
    story.create("tune-d", "2g.10gb")
    wait_until(
        lambda: (p := story.bound("infer-c")) and p["metadata"]["uid"] != borrower["metadata"]["uid"], 60, "return"
    )
    wait_until(lambda: story.bound("tune-d"), 60, "tune-d to be bound")
    print("\n".join(story.events("Returning")))
    story.status()
    print("\nEvery slice is in use, each pod on the type it asked for; no pod was lost.")


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--keep", action="store_true", help="leave the control plane up until Ctrl-C")
    args = cli.parse_args()
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the control plane it started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="migchain-demo-") as folder, running(ControlPlane(Path(folder))) as plane:
        print(f"control plane up on {plane.kubeconfig} (logs in {folder})")
        plane.start_kwok()
        tls = ExtenderTls.issue(Path(folder))
        extender = plane.start_extender(tls, CHAINS)
        plane.start_scheduler(extender.url, tls)
        plane.start_returner(CHAINS)
        story = Story(plane)
        try:
            play(story)
        except TimeoutError as error:
            print(f"\nthe demo stalled: {error}\n{plane.logs()}", file=sys.stderr)
            return 1
        if args.keep:
            print(f"\nexport KUBECONFIG={plane.kubeconfig}   # then kubectl / migchain status; Ctrl-C stops it all")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
