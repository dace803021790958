"""The probes and metrics port of both processes: GET /healthz, /readyz, /metrics over plain HTTP; no verbs here.

One thread answers every client, never blocking on one: each has DEADLINE
seconds from its connect to send its request head and take the answer, and
at most CAPACITY are open at once (PER_PEER from one address; past that the
oldest goes). A client that stalls costs a socket for a few seconds, never a
thread, so kubelet's probes are answered whatever other clients of the port do.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from extender.connections import Arrivals
from extender.reload import RulesInForce
from extender.store import SnapshotStore

log = logging.getLogger(__name__)

# kubelet's probes and Prometheus send their request at once and read the
# answer at once; kubelet gives up after the probe's timeoutSeconds anyway.
DEADLINE = 5.0
CAPACITY = 64
PER_PEER = 16
HEAD_LIMIT = 8 * 1024  # a probe's request head is a few hundred bytes
JSON = "application/json"


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


Route = Callable[[], Answer]


def health_routes(store: SnapshotStore, rules: RulesInForce, registry: CollectorRegistry) -> dict[str, Route]:
    """/healthz (the process answers), /readyz (200 once the cache is in sync, else 503, with why), /metrics."""

    def ready() -> Answer:
        state = store.readiness()
        # A rejected edit of the chain rules shows here without making the
        # process not-ready: the last good rules stay in force.
        detail = "; ".join(part for part in (state.detail, rules.describe()) if part)
        return Answer(200 if state.ready else 503, JSON, orjson.dumps({"ready": state.ready, "detail": detail}))

    return {
        "/healthz": lambda: Answer(200, JSON, b'{"status":"ok"}'),
        "/readyz": ready,
        "/metrics": lambda: Answer(200, CONTENT_TYPE_LATEST, generate_latest(registry)),
    }


def serve_health(
    listener: socket.socket, store: SnapshotStore, rules: RulesInForce, registry: CollectorRegistry
) -> ProbeServer:
    """The health_routes on `listener`, in a thread of their own for the life of the process."""
    server = ProbeServer(listener, health_routes(store, rules, registry))
    server.start(threading.Event())
    return server


def listen(bind: str) -> socket.socket:
    """A listening socket on HOST:PORT ([v6]:PORT too); OSError when the address is taken or wrong."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restarted process binds again at once, whatever connections of the last one linger in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
        listener.listen(128)
    except (OSError, ValueError) as error:
        listener.close()
        raise OSError(f"cannot listen on {bind}: {error}") from error
    return listener


@dataclass(eq=False)
class _Client:
    connection: socket.socket
    received: bytearray = field(default_factory=bytearray)
    answer: bytes = b""  # set once the head is in: the whole answer, sent as the socket takes it


class ProbeServer:
    """Answers GET (and HEAD) of `routes` on `listener`, one connection per request (Connection: close)."""

    def __init__(
        self,
        listener: socket.socket,
        routes: Mapping[str, Route],
        *,
        deadline: float = DEADLINE,
        capacity: int = CAPACITY,
        per_peer: int = PER_PEER,
    ) -> None:
        self._listener = listener
        self._routes = dict(routes)
        self._deadline = deadline
        self._clients: Arrivals[_Client] = Arrivals(capacity, per_peer)
        self._selector = selectors.DefaultSelector()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def start(self, stop: threading.Event, name: str = "probes") -> threading.Thread:
        thread = threading.Thread(target=self.serve, args=(stop,), name=name, daemon=True)
        thread.start()
        return thread

    def serve(self, stop: threading.Event) -> None:
        """Until `stop` is set; the listener stays open (its owner closes it)."""
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        try:
            while not stop.is_set():
                for key, _ in self._selector.select(timeout=0.5):
                    if key.data is None:
                        self._accept()
                    else:
                        self._advance(key.data)
                for client in self._clients.expired(time.monotonic()):
                    self._close(client)
        finally:
            for client in list(self._all_clients()):
                self._close(client)
            self._selector.close()

    def _all_clients(self) -> list[_Client]:
        return [key.data for key in self._selector.get_map().values() if key.data is not None]

    def _accept(self) -> None:
        try:
            connection, address = self._listener.accept()
        except OSError:  # gone before it was accepted, or out of descriptors: the next round tries again
            return
        connection.setblocking(False)
        client = _Client(connection)
        for pushed in self._clients.add(client, str(address[0]), time.monotonic() + self._deadline):
            self._close(pushed)
        self._selector.register(connection, selectors.EVENT_READ, client)

    def _advance(self, client: _Client) -> None:
        try:
            if client.answer:
                self._send(client)
                return
            data = client.connection.recv(HEAD_LIMIT)
        except BlockingIOError:
            return
        except OSError:
            self._close(client)
            return
        if not data:  # the client hung up before its request was whole
            self._close(client)
            return
        client.received += data
        end = client.received.find(b"\r\n\r\n")
        if end > HEAD_LIMIT or (end < 0 and len(client.received) > HEAD_LIMIT):
            client.answer = _encode(_error(431, f"the request head is longer than {HEAD_LIMIT} bytes"))
        elif end >= 0:
            client.answer = self._answer(bytes(client.received[:end]))
        else:
            return
        self._selector.modify(client.connection, selectors.EVENT_WRITE, client)
        self._send(client)

    def _answer(self, head: bytes) -> bytes:
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            return _encode(_error(400, "not an HTTP/1.x request line"))
        method, target = request_line[0], request_line[1].split(b"?", 1)[0].decode("latin-1")
        route = self._routes.get(target)
        if route is None:
            answer = _error(404, f"no such path; this port serves {', '.join(sorted(self._routes))}")
        elif method not in (b"GET", b"HEAD"):
            answer = _error(405, "only GET and HEAD")
        else:
            try:
                answer = route()
            except Exception:  # a bug: say so, and keep serving the probes
                log.exception("the probe %s failed", target)
                answer = _error(500, "internal error")
        return _encode(answer, with_body=method != b"HEAD")

    def _send(self, client: _Client) -> None:
        try:
            sent = client.connection.send(client.answer)
        except BlockingIOError:
            return
        except OSError:
            self._close(client)
            return
        client.answer = client.answer[sent:]
        if not client.answer:
            self._close(client)

    def _close(self, client: _Client) -> None:
        self._clients.remove(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.connection)
        client.connection.close()


def _error(status: int, message: str) -> Answer:
    return Answer(status, JSON, orjson.dumps({"Error": message}))


def _encode(answer: Answer, *, with_body: bool = True) -> bytes:
    head = (
        f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}\r\n"
        f"Content-Type: {answer.content_type}\r\nContent-Length: {len(answer.body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (answer.body if with_body else b"")
