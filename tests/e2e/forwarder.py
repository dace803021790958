"""A TCP forwarder that stands in for the extender's Service: each new connection goes to a replica whose /readyz
says 200, as kube-proxy sends it to the ready endpoints only.

kube-scheduler's extender config takes one URL; behind it, the replicas take
turns leading. Bytes are copied as they are (TLS goes end to end). A replica
is probed every `period` seconds (kubelet's readinessProbe periodSeconds).
With no ready replica a connection is closed at once (a Service without
endpoints), unless `fallback` is on: then it goes to the first replica, as a
direct URL would (one replica, and the other tests' faults as they were).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    verbs: tuple[str, int]  # host, port of the verbs (mutual TLS)
    health_url: str  # its /readyz


class Forwarder:
    def __init__(self, backends: list[Backend], *, fallback: bool = True, period: float = 0.25) -> None:
        self._backends = list(backends)
        self.fallback = fallback
        self.period = period
        self._ready: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"https://127.0.0.1:{self.port}"
        self.refused = 0  # connections closed for want of a ready replica
        for target in (self._accept, self._probe):
            threading.Thread(target=target, name=f"forwarder-{target.__name__}", daemon=True).start()

    def route(self, backends: list[Backend], *, fallback: bool) -> None:
        with self._lock:
            self._backends = list(backends)
            self.fallback = fallback
            self._ready &= {backend.name for backend in backends}

    def ready(self) -> list[str]:
        with self._lock:
            return [backend.name for backend in self._backends if backend.name in self._ready]

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _choose(self) -> Backend | None:
        with self._lock:
            for backend in self._backends:
                if backend.name in self._ready:
                    return backend
            return self._backends[0] if self.fallback and self._backends else None

    def _probe(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                backends = list(self._backends)
            for backend in backends:
                ready = _ready(backend.health_url)
                with self._lock:
                    if ready:
                        self._ready.add(backend.name)
                    else:
                        self._ready.discard(backend.name)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            backend = self._choose()
            if backend is None:
                self.refused += 1
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, backend), name="forwarder-pipe", daemon=True).start()

    def _pipe(self, client: socket.socket, backend: Backend) -> None:
        try:
            upstream = socket.create_connection(backend.verbs, timeout=2)
        except OSError:
            client.close()
            return
        pairs = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector, client, upstream:
            for end in pairs:
                end.setblocking(True)
                selector.register(end, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(1.0):
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    try:
                        data = source.recv(65536)
                        if not data:
                            return
                        pairs[source].sendall(data)
                    except OSError:
                        return


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except Exception:
        return False
