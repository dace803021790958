"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok.

Binaries come from tests/e2e/kube/build.sh (built from Go modules) into
.cache/kube/bin, or $MIGCHAIN_KUBE_OUT/bin when that is set. Every
process listens on a free 127.0.0.1 port, logs to a file in the run's folder,
and is stopped at the end; logs are printed when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from extender import certs
from extender.kube.api import ApiError, Connection, KubeApi
from extender.kube.loan_key import create_secret, read_secret
from tests.e2e.fleet import FAKE_NODE_LABEL

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MIGCHAIN_KUBE_OUT") or ROOT / ".cache" / "kube") / "bin"
STAGES = ROOT / "tests" / "e2e" / "kube" / "stages.yaml"  # what kwok does to the fake nodes and their pods
ADMIN_TOKEN = "migchain-e2e-admin"  # a throwaway token of a throwaway cluster on loopback


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = predicate()
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        handle = self.log.open("ab")
        handle.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
        handle.flush()
        self.popen = subprocess.Popen(
            self.argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        handle.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def kill(self) -> None:
        """kill -9: no chance to clean up, as a crash."""
        self.stop(signal.SIGKILL)

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _write_service_account_keys(folder: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = folder / "sa.key"
    public = folder / "sa.pub"
    private.write_bytes(_pem_key(key))
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@dataclass(frozen=True)
class Credentials:
    certificate: Path
    key: Path


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateAuthority:
    """A throwaway CA for one test run (extender.certs issues), its certificates written as files."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.authority = certs.CertificateAuthority(name)
        self.path = folder / f"{name}.crt"
        self.path.write_bytes(self.authority.certificate)

    def issue(
        self,
        name: str,
        *,
        hosts: Sequence[str] = (),
        organizations: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> Credentials:
        pair = self.authority.issue(name, hosts=hosts, organizations=organizations, server=server, client=client)
        credentials = Credentials(self.folder / f"{name}.crt", self.folder / f"{name}.key")
        credentials.certificate.write_bytes(pair.certificate)
        credentials.key.write_bytes(pair.key)
        return credentials


# The common name `migchain certs` gives kube-scheduler's client certificate,
# and the identity manifests/ pins the extender's verbs to.
SCHEDULER_CLIENT = "migchain-scheduler"


@dataclass(frozen=True)
class ExtenderTls:
    """Mutual TLS between kube-scheduler and migchain-extender, as `migchain certs` sets it up in a cluster."""

    ca: Path
    serving: Credentials
    client: Credentials
    other_client: Credentials  # signed by the same CA for another name: not kube-scheduler
    authority: certs.CertificateAuthority | None = field(default=None, compare=False)  # to renew a leaf

    @classmethod
    def issue(cls, folder: Path) -> ExtenderTls:
        authority = CertificateAuthority(folder, "migchain-ca")
        serving = authority.issue("migchain-extender", hosts=("127.0.0.1", "localhost"), server=True)
        client = authority.issue(SCHEDULER_CLIENT, client=True)
        other = authority.issue("someone-else", client=True)
        return cls(authority.path, serving, client, other, authority.authority)

    def extender_flags(self) -> list[str]:
        return [
            f"--tls-cert-file={self.serving.certificate}",
            f"--tls-key-file={self.serving.key}",
            f"--client-ca-file={self.ca}",
            f"--client-identity={SCHEDULER_CLIENT}",
        ]

    def scheduler_config(self) -> dict[str, str]:
        """The `tlsConfig` of an extender entry in a KubeSchedulerConfiguration."""
        return {"caFile": str(self.ca), "certFile": str(self.client.certificate), "keyFile": str(self.client.key)}

    def context(self, *, as_scheduler: bool, other: bool = False) -> ssl.SSLContext:
        """A client context trusting the extender; with the scheduler's client certificate, another one, or none."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if as_scheduler or other:
            credentials = self.other_client if other else self.client
            context.load_cert_chain(str(credentials.certificate), str(credentials.key))
        return context


@dataclass(frozen=True)
class Extender:
    process: Process
    url: str  # kube-scheduler's verbs, mutual TLS
    health_url: str  # /healthz, /readyz, /metrics, plain HTTP


@dataclass
class ControlPlane:
    folder: Path
    processes: dict[str, Process] = field(default_factory=dict)
    api_port: int = 0
    kubeconfig: Path = Path()
    loan_key: Path = Path()  # migchain's loan key, as kubelet mounts it from the Secret

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        for binary in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
            if not (BIN / binary).exists():
                raise RuntimeError(f"{BIN / binary} is missing: run `bash tests/e2e/kube/build.sh` (make test does)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_etcd()
        self._start_apiserver()
        self._start_controller_manager()

    def _process(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        process = Process(name, list(argv), self.folder / f"{name}.log", env)
        self.processes[name] = process
        process.start()
        return process

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._process(
            "etcd",
            [
                str(BIN / "etcd"),
                f"--data-dir={self.folder / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",  # a throwaway store: durability buys nothing, fsync costs seconds
                "--log-level=warn",
            ],
        )
        wait_until(lambda: _http_ok(f"{self.etcd_url}/health"), 30, "etcd health")

    def _start_apiserver(self) -> None:
        self.api_port = free_port()
        sa_key, sa_pub = _write_service_account_keys(self.folder)
        self.ca = CertificateAuthority(self.folder, "e2e-ca")
        serving = self.ca.issue("kube-apiserver", hosts=("127.0.0.1", "localhost"), server=True)
        tokens = self.folder / "tokens.csv"
        tokens.write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        self._process(
            "kube-apiserver",
            [
                str(BIN / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--tls-cert-file={serving.certificate}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.ca.path}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                # Nothing would ever lift the not-ready taint this plugin puts on new nodes (no kubelets).
                # Pods need no service-account token: nothing runs in them.
                "--disable-admission-plugins=TaintNodesByCondition,ServiceAccount",
                # As OpenShift does: a create that sets blockOwnerDeletion needs update on the owner's
                # finalizers (tests/e2e/test_owner_references_permission.py); every other client here is admin.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                "--endpoint-reconciler-type=none",
                # As in clusters that run CNI and CSI DaemonSets: a privileged pod is valid, so that only
                # admission (Pod Security, migchain's policy) decides who may create one.
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        self.kubeconfig = self.folder / "admin.kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(self.kubeconfig_document(ADMIN_TOKEN)))
        self.api = KubeApi(Connection.load(str(self.kubeconfig)))
        wait_until(self.api.healthy, 60, "kube-apiserver /readyz")
        # kube-scheduler's leader election lease lives in the namespace manifests/ create.
        self.ensure_namespace("migchain-system")
        self.sa_key = sa_key
        self._make_loan_key()

    def _make_loan_key(self) -> None:
        """migchain's loan key as an install makes it (`migchain loan-key`: the Secret), and the file kubelet
        mounts from it, which both processes read with --loan-key-file."""
        create_secret(self.api, "migchain-system")
        key = read_secret(self.api, "migchain-system")
        assert key is not None
        self.loan_key = self.folder / "loan-key" / "key"
        self.loan_key.parent.mkdir(exist_ok=True)
        self.loan_key.write_bytes(key)

    def kubeconfig_document(self, token: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "e2e",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.api_port}",
                        "certificate-authority": str(self.ca.path),
                    },
                }
            ],
            "users": [{"name": "e2e", "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
            "current-context": "e2e",
        }

    def _start_controller_manager(self) -> None:
        self._process(
            "kube-controller-manager",
            [
                str(BIN / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                # The workload controllers the tests need; no node lifecycle (no kubelets heartbeat).
                "--controllers=deployment,replicaset,job,statefulset,garbagecollector,disruption,"
                "serviceaccount,serviceaccount-token,namespace,podgc",
                f"--service-account-private-key-file={self.sa_key}",
                "--use-service-account-credentials=false",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--v=1",
            ],
        )

    def start_scheduler(self, extender_url: str, tls: ExtenderTls, config_path: Path | None = None) -> Process:
        """kube-scheduler with the repo's scheduler-config.yaml; only the extender URL, TLS files and kubeconfig
        rewritten."""
        document = yaml.safe_load((config_path or ROOT / "scheduler-config.yaml").read_text())
        document["clientConnection"]["kubeconfig"] = str(self.kubeconfig)
        for extender in document["extenders"]:
            extender["urlPrefix"] = extender_url
            extender["tlsConfig"] = tls.scheduler_config()
        config = self.folder / "scheduler-config.yaml"
        config.write_text(yaml.safe_dump(document))
        return self.start_scheduler_with(config)

    def start_kwok(self) -> Process:
        """kwok, the kubelet of every node labelled FAKE_NODE_LABEL: holds their leases, and plays STAGES on them
        and their pods (runs bound pods, ends annotated ones, finishes deletions)."""
        return self._process(
            "kwok",
            [
                str(BIN / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                # Options as flags: a KwokConfiguration document's are not defaulted, and kwok exits on it.
                f"--config={STAGES}",
                f"--manage-nodes-with-label-selector={FAKE_NODE_LABEL}",
                "--cidr=10.244.0.0/16",  # pod IPs; apart from the service range
                "--node-lease-duration-seconds=40",  # as a kubelet's: renewed every 10 s
                "-v=WARN",
            ],
        )

    def start_extender(
        self,
        tls: ExtenderTls,
        chains: Sequence[str],
        *flags: str,
        identity: str = "extender-a",
        wait_ready: bool = True,
    ) -> Extender:
        """A migchain-extender replica watching this control plane, its verbs over mutual TLS, named `identity`
        on the lease; returned once ready (it leads), unless not `wait_ready` (a follower)."""
        port, health = free_port(), free_port()
        process = self._process(
            "migchain-extender" if identity == "extender-a" else f"migchain-{identity}",
            [
                sys.executable,
                "-m",
                "extender.serve",
                f"--bind=127.0.0.1:{port}",
                f"--health-bind=127.0.0.1:{health}",
                f"--kubeconfig={self.kubeconfig}",
                f"--loan-key-file={self.loan_key}",
                f"--identity={identity}",
                *tls.extender_flags(),
                *flags,
                "--chains",
                *chains,
            ],
        )
        extender = Extender(process, f"https://127.0.0.1:{port}", f"http://127.0.0.1:{health}")
        if wait_ready:
            wait_until(lambda: _http_ok(f"{extender.health_url}/readyz"), 60, "migchain-extender /readyz")
        return extender

    def start_returner(
        self,
        chains: Sequence[str],
        identity: str = "returner-a",
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> Process:
        """A migchain-returner replica with its own lease identity (started again if it exists, on the same health
        port, with these `args` only)."""
        name = f"returner-{identity}"
        process = self.processes.get(name)
        if process is None:
            process = Process(name, [], self.folder / f"{name}.log")
            self.processes[name] = process
            health = f"--health-bind=127.0.0.1:{free_port()}"
        else:
            [health] = [a for a in process.argv if a.startswith("--health-bind=")]
        process.argv = [
            sys.executable,
            "-m",
            "extender.returner_cli",
            f"--kubeconfig={self.kubeconfig}",
            f"--loan-key-file={self.loan_key}",
            f"--identity={identity}",
            health,
            *args,
            "--chains",
            *chains,
        ]
        process.env = env
        process.start()
        return process

    def start_scheduler_with(self, config: Path) -> Process:
        """kube-scheduler with a configuration file as it is."""
        return self._process(
            "kube-scheduler",
            [
                str(BIN / "kube-scheduler"),
                f"--config={config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=2",
            ],
        )

    # -- helpers --------------------------------------------------------------

    def ensure_namespace(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def logs(self) -> str:
        return "\n".join(f"----- {name} -----\n{process.tail()}" for name, process in self.processes.items())

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return bool(response.status == 200)


@contextlib.contextmanager
def running(plane: ControlPlane) -> Iterator[ControlPlane]:
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()
        shutil.rmtree(plane.folder / "etcd", ignore_errors=True)
