"""A real node for the e2e tests: containerd, a kubelet and the MIG device-plugin stand-in, in their own namespaces.

The three processes run in one mount and network namespace (held by an
`unshare ... sleep` process): the kubelet's bind mounts, the CNI bridge, the pod
network namespaces and the kubelet's iptables chains stay in it and go with it.
A relay started in that network namespace forwards 127.0.0.1:<api port> to the
host's kube-apiserver, so the same kubeconfig works. What the kubelet changes
outside is the node's own or put back on stop: its cgroups are under a cgroup root
of its own (so two runs on one host never meet), and the kernel sysctls it sets are
written back when the last node on the host stops.
Needs root, Debian's containerd, runc, containernetworking-plugins and busybox-static
(tests/e2e/kube/node-packages.sh installs them when missing) and the kubelet,
migdeviceplugin and pause of tests/e2e/kube/build.sh. `make test` runs the tests as
root; otherwise (or with MIGCHAIN_E2E_REALNODE=0) they are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.kube.api import ApiError, path
from tests.e2e.controlplane import ADMIN_TOKEN, BIN, ROOT, ControlPlane, Process, wait_until

# Where the kubelet and the device plugin come from: the shared control plane's folder, unless overridden.
NODE_BIN = Path(os.environ.get("MIGCHAIN_E2E_NODE_BIN", str(BIN)))
PAUSE_IMAGE = "migchain.local/pause:e2e"
BUSYBOX_IMAGE = "migchain.local/busybox:e2e"
DEBIAN_PACKAGES = {"containerd": "containerd", "runc": "runc", "/usr/lib/cni/bridge": "containernetworking-plugins"}
DEBIAN_PACKAGES["/bin/busybox"] = "busybox-static"
# What the kubelet sets (its setupKernelTunables), global to the host.
KERNEL_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
# The sysctls as the first node on the host found them, and the nodes now running: the last to stop puts them back.
SYSCTL_LEDGER = Path("/run/migchain-e2e-sysctls.json")
NODE_IP, NODE_GATEWAY = "10.255.0.1", "10.255.0.2"  # inside the node's network namespace only
PRIVATE_DIRS = ("/run", "/var/log", "/var/lib")
UNIX_PATH_MAX = 104  # what containerd accepts for its sockets (its ttrpc one is named <socket>.ttrpc)
CGROUP_ROOT_PREFIX = "migchain-e2e-"  # a node's cgroup root: migchain-e2e-<node>-<pid of the test run>


def missing_packages() -> list[str]:
    missing = []
    for wanted, package in DEBIAN_PACKAGES.items():
        found = Path(wanted).exists() if wanted.startswith("/") else shutil.which(wanted)
        if not found:
            missing.append(package)
    return missing


def install_packages() -> None:
    """Installs what is missing from Debian, as `make test` does before (CI runs as root on a fresh machine)."""
    if missing_packages():
        subprocess.run(["bash", str(ROOT / "tests" / "e2e" / "kube" / "node-packages.sh")], check=True)


def unavailable() -> str:
    """Why the real-node tests cannot run here ("" if they can): they are skipped with this reason."""
    if os.environ.get("MIGCHAIN_E2E_REALNODE") == "0":
        return "real-node tests turned off (MIGCHAIN_E2E_REALNODE=0)"
    if os.geteuid() != 0:
        return (
            "a real kubelet and containerd need root: run `make test` as root (or, as root, "
            "`.venv/bin/pytest -m realnode`); MIGCHAIN_E2E_REALNODE=0 turns them off"
        )
    if missing_packages() and not shutil.which("apt-get"):
        return f"{' '.join(missing_packages())} missing and no apt-get: install them, or set MIGCHAIN_E2E_REALNODE=0"
    return ""


# The marks of every real-node test module (its `pytestmark`): part of the default selection, skipped only here.
REALNODE_MARKS = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.skipif(bool(unavailable()), reason=unavailable())]


# -- images -------------------------------------------------------------------


def _tar_of(files: dict[str, tuple[Path, int]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (source, mode) in files.items():
            info = tarfile.TarInfo(name)
            data = source.read_bytes()
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def oci_archive(name: str, files: dict[str, tuple[Path, int]], entrypoint: list[str]) -> bytes:
    """An OCI image layout archive of one uncompressed layer, named `name` for `ctr images import`."""
    layer = _tar_of(files)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_ref = blob(layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_ref["digest"]]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(config).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_ref}],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **blob(json.dumps(manifest).encode()),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            }
        ],
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        entries = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(index).encode()}
        entries |= {f"blobs/sha256/{digest.removeprefix('sha256:')}": data for digest, data in blobs.items()}
        for entry, data in entries.items():
            info = tarfile.TarInfo(entry)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- namespaces ---------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _listen_in(pid: int, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:port in the network namespace of `pid` (a socket keeps the namespace
    it was made in; the thread switches back at once)."""
    host = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
        finally:
            if _libc.setns(host, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(host)
        os.close(target)
    return listener


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _connect(inner: socket.socket, port: int, open_sockets: set[socket.socket]) -> None:
    """Pipes one connection accepted in the node's namespace to the host's 127.0.0.1:port, both ways."""
    try:
        outer = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        inner.close()
        return
    outer.settimeout(None)
    open_sockets |= {inner, outer}
    upstream = threading.Thread(target=_pipe, args=(inner, outer), daemon=True)
    upstream.start()
    _pipe(outer, inner)
    upstream.join()
    for end in (inner, outer):
        open_sockets.discard(end)
        end.close()


def _relay(listener: socket.socket, port: int, open_sockets: set[socket.socket]) -> None:
    while True:
        try:
            inner, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_connect, args=(inner, port, open_sockets), daemon=True).start()


# -- the node -----------------------------------------------------------------


@dataclass
class RealNode:
    plane: ControlPlane
    name: str
    layout: dict[str, int]  # MIG profile -> devices the plugin advertises
    labels: dict[str, str] = field(default_factory=dict)
    folder: Path = Path()
    holder: Process | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    listener: socket.socket | None = None
    relayed: set[socket.socket] = field(default_factory=set)  # the relay's open connections, both ends
    cgroup_root: str = ""  # the kubelet's cgroupRoot, in every cgroup hierarchy; this node's alone
    holds_sysctls: bool = False

    def start(self) -> None:
        install_packages()
        for binary in ("kubelet", "migdeviceplugin", "pause"):
            if not (NODE_BIN / binary).exists():
                raise RuntimeError(f"{NODE_BIN / binary} is missing: run tests/e2e/kube/build.sh")
        self.folder = self.plane.folder / f"node-{self.name}"
        if len(f"{self.containerd_socket}.ttrpc") > UNIX_PATH_MAX:
            raise RuntimeError(f"{self.containerd_socket}: too long for a unix socket: a shorter node name")
        self.folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_cgroup_roots()
        self.cgroup_root = f"{CGROUP_ROOT_PREFIX}{self.name}-{os.getpid()}"
        _make_cgroup_root(self.cgroup_root)
        _take_sysctls(self._sysctl_holder)
        self.holds_sysctls = True
        self.holder = Process(
            "node-namespaces",
            ["unshare", "--mount", "--net", "--propagation", "private", "--", "sleep", "infinity"],
            self.folder / "namespaces.log",
        )
        self.holder.start()
        pid = self._holder_pid()
        self._in_namespaces(["ip", "link", "set", "lo", "up"])
        # The kubelet takes the node's address from the default route, and refuses a loopback one: a veth pair
        # inside the namespace gives it one that leads nowhere.
        for command in (
            "ip link add node0 type veth peer name node1",
            f"ip addr add {NODE_IP}/24 dev node0",
            "ip link set node0 up",
            "ip link set node1 up",
            f"ip route add default via {NODE_GATEWAY} dev node0",
        ):
            self._in_namespaces(command.split())
        # What the node writes at fixed host paths (pod logs, CNI leases, netns mounts, runc state) goes to
        # tmpfs private to the node; the kubelet's root dir (the device-plugin socket lives there) to its folder.
        for private in PRIVATE_DIRS:
            self._in_namespaces(["mount", "-t", "tmpfs", "tmpfs", private])
        (self.folder / "kubelet").mkdir(exist_ok=True)
        self._in_namespaces(["mkdir", "-p", "/var/lib/kubelet"])
        self._in_namespaces(["mount", "--bind", str(self.folder / "kubelet"), "/var/lib/kubelet"])
        self.listener = _listen_in(pid, self.plane.api_port)
        threading.Thread(target=_relay, args=(self.listener, self.plane.api_port, self.relayed), daemon=True).start()
        self._start_containerd()
        self._import_images()
        self._start_kubelet()
        self._start_device_plugin()

    def _holder_pid(self) -> int:
        assert self.holder is not None and self.holder.popen is not None
        parent = self.holder.popen.pid

        def unshared() -> int:
            # `unshare` execs `sleep` in the same process once the namespaces exist.
            if Path(f"/proc/{parent}/comm").read_text().strip() == "sleep":
                return parent
            return 0

        pid: int = wait_until(unshared, 10, "the node's namespaces")
        return pid

    def _in_namespaces(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self._enter(argv), check=True, capture_output=True, **kwargs)

    def _enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self._holder_pid()), "--mount", "--net", "--", *argv]

    def _process(self, name: str, argv: list[str]) -> Process:
        process = Process(f"{self.name}-{name}", self._enter(argv), self.folder / f"{name}.log")
        self.processes[name] = process
        self.plane.processes[process.name] = process  # its log is shown with the others' when a test fails
        process.start()
        return process

    @property
    def containerd_socket(self) -> Path:
        return self.folder / "containerd" / "containerd.sock"

    def _start_containerd(self) -> None:
        cni = self.folder / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-migchain.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "migchain-e2e",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]},
                        },
                        {"type": "loopback"},
                    ],
                }
            )
        )
        state = self.folder / "containerd"
        config = self.folder / "containerd.toml"
        config.write_text(
            f"""version = 2
root = "{state}/root"
state = "{state}/state"
[grpc]
  address = "{self.containerd_socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: containerd must not lower a container's oom_score_adj below its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
# Not the host's /opt/containerd, which containerd creates by default.
[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/opt"
"""
        )
        self._process("containerd", ["containerd", f"--config={config}"])
        wait_until(self.containerd_socket.exists, 30, "containerd's socket")

    def _ctr(self, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return self._in_namespaces(["ctr", f"--address={self.containerd_socket}", "-n", "k8s.io", *argv], **kwargs)

    def _import_images(self) -> None:
        pause = oci_archive(PAUSE_IMAGE, {"pause": (NODE_BIN / "pause", 0o755)}, ["/pause"])
        busybox = oci_archive(BUSYBOX_IMAGE, {"bin/busybox": (Path("/bin/busybox"), 0o755)}, ["/bin/busybox"])
        for name, archive in (("pause", pause), ("busybox", busybox)):
            path = self.folder / f"{name}.oci.tar"
            path.write_bytes(archive)
            wait_until(lambda p=path: self._ctr("images", "import", str(p)).returncode == 0, 30, f"import {name}")

    def _start_kubelet(self) -> None:
        kubeconfig = self.folder / "kubelet.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(self.plane.kubeconfig_document(ADMIN_TOKEN)))
        config = self.folder / "kubelet-config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "failCgroupV1": False,  # this machine has a cgroup v1 hybrid
                    "cgroupDriver": "cgroupfs",  # containerd 1.6 lacks the RuntimeConfig RPC
                    # Its pods' cgroups under a root of its own, not the host-wide /kubepods another node would use.
                    "cgroupsPerQOS": True,
                    "cgroupRoot": f"/{self.cgroup_root}",
                    "failSwapOn": False,
                    "resolvConf": "",
                    "address": "127.0.0.1",  # the node's own loopback: anonymous and AlwaysAllow reach no one else
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
                    "authorization": {"mode": "AlwaysAllow"},
                    "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
                    "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "nodeStatusUpdateFrequency": "2s",
                    "syncFrequency": "5s",
                    "serializeImagePulls": False,
                    "registerNode": True,
                }
            )
        )
        labels = ",".join(f"{key}={value}" for key, value in self.labels.items())
        self._process(
            "kubelet",
            [
                str(NODE_BIN / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={labels}",
                "--v=2",
            ],
        )
        wait_until((self.folder / "kubelet" / "device-plugins" / "kubelet.sock").exists, 60, "kubelet.sock")

    @property
    def layout_file(self) -> Path:
        return self.folder / "mig-layout.json"

    def _start_device_plugin(self) -> None:
        self.layout_file.write_text(json.dumps(self.layout))
        self._process(
            "migdeviceplugin",
            [str(NODE_BIN / "migdeviceplugin"), f"--node={self.name}", f"--layout={self.layout_file}"],
        )

    def relayout(self, layout: dict[str, int]) -> None:
        """Re-partitions the node's GPU, as mig-manager: the plugin re-reads its layout and re-registers."""
        self.layout = layout
        self.layout_file.write_text(json.dumps(layout))
        plugin = self.processes["migdeviceplugin"]
        assert plugin.popen is not None
        os.killpg(plugin.popen.pid, signal.SIGHUP)

    def container_env(self, container_id: str) -> dict[str, str]:
        """The environment of a running container as its process sees it (/proc/<pid>/environ); {} if not running."""
        wanted = container_id.removeprefix("containerd://")
        for line in self._ctr("tasks", "ls").stdout.decode().splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == wanted:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                return dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        return {}

    def running_tasks(self) -> set[str]:
        lines = self._ctr("tasks", "ls").stdout.decode().splitlines()[1:]
        return {line.split()[0] for line in lines if line.split() and line.split()[-1] == "RUNNING"}

    # -- stop -----------------------------------------------------------------

    def stop(self) -> None:
        """Stops every container and process, and puts back what the kubelet changed on the host."""
        for name in ("migdeviceplugin", "kubelet"):
            if name in self.processes:
                self.processes[name].stop()
        if "containerd" in self.processes and self.processes["containerd"].alive():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                for task in self.running_tasks():
                    self._ctr("tasks", "kill", "-s", "SIGKILL", task, timeout=10)
            time.sleep(1)
            self.processes["containerd"].stop()
        # containerd leaves its shims (and they their containers) running by design: end whatever is still in
        # the node's network namespace.
        if self.holder is not None and self.holder.alive():
            _kill_in_namespace(os.readlink(f"/proc/{self._holder_pid()}/ns/net"), spare=self._holder_pid())
        if self.listener is not None:
            self.listener.close()
        for end in list(self.relayed):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        if self.holder is not None:
            self.holder.stop()
        if self.holds_sysctls:
            _release_sysctls(self._sysctl_holder)
            self.holds_sysctls = False
        if self.cgroup_root:
            _remove_cgroup_root(self.cgroup_root)

    @property
    def _sysctl_holder(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": self.name}


def _kill_in_namespace(namespace: str, spare: int) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == spare:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns" / "net") == namespace:
                os.kill(int(entry.name), signal.SIGKILL)


# -- host-wide state ----------------------------------------------------------


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point: each v1 controller's and the unified one (cgroup v2, or hybrid)."""
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return sorted({Path(line.split()[1]) for line in lines if line.split()[2] in ("cgroup", "cgroup2")})


def _make_cgroup_root(root: str) -> None:
    """The kubelet refuses a cgroupRoot that does not exist in every hierarchy."""
    for mount in cgroup_mounts():
        directory = mount / root
        directory.mkdir(exist_ok=True)
        # A new v1 cpuset starts with no CPU and no memory node: no process could join it, nor its children.
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (directory / name).exists() and not (directory / name).read_text().strip():
                (directory / name).write_text((mount / name).read_text())


def _remove_cgroup_root(root: str, timeout: float = 15.0) -> None:
    """Removes the node's cgroup tree in every hierarchy, deepest first (a cgroup goes once its processes have)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [mount / root for mount in cgroup_mounts() if (mount / root).exists()]
        for top in left:
            for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def _remove_stale_cgroup_roots() -> None:
    """The cgroup roots of runs that were killed (SIGKILL: their stop never ran), once empty."""
    for mount in cgroup_mounts():
        for entry in mount.glob(f"{CGROUP_ROOT_PREFIX}*-*"):
            pid = entry.name.rsplit("-", 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                _remove_cgroup_root(entry.name, timeout=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """One run at a time on the ledger, across processes. /run is locked (always there, never removed), not a
    file of ours: a lock file could not be removed afterwards without a race."""
    descriptor = os.open("/run", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def read_sysctls() -> dict[str, str]:
    """The host's values of the sysctls the kubelet sets."""
    return {key: Path("/proc/sys", key).read_text() for key in KERNEL_SYSCTLS}


def device_ids(node: str, layout: dict[str, int], profile: str) -> set[str]:
    """The IDs the device-plugin stand-in gives `node`'s `profile` devices under `layout` (its deviceID)."""
    ids = set()
    for index in range(layout.get(profile, 0)):
        digest = hashlib.sha256(f"{node}/{profile}/{index}".encode()).hexdigest()[:32]
        ids.add(f"MIG-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}")
    return ids


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        Path("/proc/sys", key).write_text(value)


def _write_ledger(ledger: dict[str, Any]) -> None:
    written = SYSCTL_LEDGER.with_suffix(".new")  # then renamed: a run killed meanwhile leaves the ledger whole
    written.write_text(json.dumps(ledger))
    written.replace(SYSCTL_LEDGER)


def _take_sysctls(holder: dict[str, Any]) -> None:
    """Joins the ledger. The first node on the host records the sysctls as it found them. If every node before
    was killed without stopping, what they found is put back first."""
    with _host_lock():
        ledger = json.loads(SYSCTL_LEDGER.read_text()) if SYSCTL_LEDGER.exists() else {}
        nodes = [node for node in ledger.get("nodes", []) if _alive(node["pid"])]
        if not nodes:
            _write_sysctls(ledger.get("found", {}))
            ledger["found"] = read_sysctls()
        ledger["nodes"] = [*nodes, holder]
        _write_ledger(ledger)


def _release_sysctls(holder: dict[str, Any]) -> None:
    """Leaves the ledger; the last node to leave puts the sysctls back as the first found them."""
    with _host_lock():
        if not SYSCTL_LEDGER.exists():
            return
        ledger = json.loads(SYSCTL_LEDGER.read_text())
        ledger["nodes"] = [node for node in ledger["nodes"] if node != holder and _alive(node["pid"])]
        if ledger["nodes"]:
            _write_ledger(ledger)
        else:
            _write_sysctls(ledger["found"])
            SYSCTL_LEDGER.unlink()


@contextlib.contextmanager
def real_node(plane: ControlPlane, name: str, layout: dict[str, int], labels: dict[str, str]) -> Iterator[RealNode]:
    node = RealNode(plane, name, layout, labels)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        # Its Node object goes too: a NotReady node with MIG allocatable would count in later tests'
        # `simulate --from-cluster` and `migchain status`.
        with contextlib.suppress(ApiError):
            plane.api.delete(path("api", "v1", "nodes", name))


__all__ = ["REALNODE_MARKS", "ROOT", "RealNode", "device_ids", "read_sysctls", "real_node"]
