"""A stand-in for the kubelets of the fake GPU nodes: runs what is bound to them, finishes their deletions.

Run as `python -m tests.e2e.kubelet KUBECONFIG`. For every pod bound to a node
labelled as fake it does what a kubelet would visibly do: marks a new pod
Running and Ready, and completes a graceful deletion (the API server leaves a
bound pod Terminating until its kubelet confirms). Pods a test set to
Succeeded or Failed are left as they are.
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading
from typing import Any

from extender.kube.api import ApiError, Connection, KubeApi, path

FAKE_NODE_LABEL = "e2e.migchain.io/fake-node"

log = logging.getLogger("fake-kubelet")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubelet:
    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.fake_nodes: set[str] = set()
        self.lock = threading.Lock()

    def run(self) -> None:
        threading.Thread(target=self._watch_nodes, daemon=True).start()
        self._watch_pods()

    def _watch_nodes(self) -> None:
        while True:
            try:
                items, version = self.api.list_all("/api/v1/nodes", labelSelector=FAKE_NODE_LABEL)
                with self.lock:
                    self.fake_nodes = {item["metadata"]["name"] for item in items}
                for event in self.api.watch("/api/v1/nodes", version, labelSelector=FAKE_NODE_LABEL):
                    name = (event.get("object") or {}).get("metadata", {}).get("name")
                    if not name:
                        continue
                    with self.lock:
                        if event.get("type") == "DELETED":
                            self.fake_nodes.discard(name)
                        elif event.get("type") in ("ADDED", "MODIFIED"):
                            self.fake_nodes.add(name)
            except Exception as error:
                log.warning("node watch broke: %s", error)
                threading.Event().wait(0.5)

    def _watch_pods(self) -> None:
        while True:
            try:
                items, version = self.api.list_all("/api/v1/pods")
                for item in items:
                    self._handle(item)
                for event in self.api.watch("/api/v1/pods", version):
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._handle(event["object"])
            except Exception as error:
                log.warning("pod watch broke: %s", error)
                threading.Event().wait(0.5)

    def _handle(self, pod: dict[str, Any]) -> None:
        node = pod.get("spec", {}).get("nodeName")
        with self.lock:
            ours = node in self.fake_nodes
        if not ours:
            return
        metadata = pod["metadata"]
        resource = path("api", "v1", "namespaces", metadata["namespace"], "pods", metadata["name"])
        try:
            if metadata.get("deletionTimestamp"):
                self.api.delete(
                    resource,
                    {
                        "kind": "DeleteOptions",
                        "apiVersion": "v1",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": metadata["uid"]},
                    },
                )
            elif pod.get("status", {}).get("phase", "Pending") == "Pending":
                self.api.patch(
                    resource + "/status",
                    {
                        "status": {
                            "phase": "Running",
                            "startTime": now(),
                            "conditions": [
                                {"type": condition, "status": "True", "lastTransitionTime": now()}
                                for condition in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                            ],
                        }
                    },
                )
        except ApiError as error:
            if error.status not in (404, 409):
                log.warning("acting on %s/%s: %s", metadata["namespace"], metadata["name"], error)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    FakeKubelet(KubeApi(Connection.load(sys.argv[1]))).run()


if __name__ == "__main__":
    main()
