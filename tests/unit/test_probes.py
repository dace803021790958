"""The probes and metrics port (extender.probes) and the bookkeeping of unfinished connections (extender.connections).

The returner's health port used to be http.server's ThreadingHTTPServer: one
thread per connection, no deadline. 300 stalled connections made 300 threads,
and none was ever closed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from extender.connections import Arrivals
from extender.probes import DEADLINE, Answer, ProbeServer, health_routes, listen, serve_health
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from tests.unit.objects import RULES

# -- Arrivals: caps and deadlines, as a property ----------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from("abcd")),
        st.tuples(st.just("remove"), st.integers(0, 200)),
        st.tuples(st.just("expire"), st.just("")),
    ),
    max_size=200,
)


@given(operations=operations, capacity=st.integers(1, 12), per_peer=st.integers(1, 12))
def test_arrivals_never_exceed_their_caps_and_push_out_the_oldest_first(operations, capacity, per_peer):
    per_peer = min(per_peer, capacity)
    arrivals: Arrivals[int] = Arrivals(capacity, per_peer)
    live: dict[int, str] = {}  # item -> peer, in arrival order (the model)
    deadlines: dict[int, float] = {}
    clock = 0.0
    for number, (operation, argument) in enumerate(operations):
        clock += 1.0
        if operation == "add":
            deadlines[number] = clock + 10.0
            pushed = arrivals.add(number, argument, deadlines[number])
            same_peer = [item for item, peer in live.items() if peer == argument]
            expected = same_peer[:1] if len(same_peer) >= per_peer else []
            if len(live) - len(expected) >= capacity:
                expected.append(next(item for item in live if item not in expected))
            assert pushed == expected
            for item in pushed:
                del live[item]
            live[number] = argument
        elif operation == "remove":
            arrivals.remove(argument)
            live.pop(argument, None)
        else:
            gone = arrivals.expired(clock)
            assert gone == [item for item in live if deadlines[item] <= clock]
            for item in gone:
                del live[item]
        assert len(arrivals) == len(live) <= capacity
        assert all(sum(1 for p in live.values() if p == peer) <= per_peer for peer in set(live.values()))
        assert all(item in arrivals for item in live)


def test_arrivals_need_sane_caps():
    with pytest.raises(ValueError, match="per_peer"):
        Arrivals(4, 5)


# -- the server ------------------------------------------------------------------


@contextlib.contextmanager
def probe_server(**limits: float) -> Iterator[ProbeServer]:
    routes = {
        "/healthz": lambda: Answer(200, "application/json", b'{"status":"ok"}'),
        "/broken": lambda: Answer(200, "text/plain", bytes(1 // 0)),
    }
    stop = threading.Event()
    with listen("127.0.0.1:0") as listener:
        server = ProbeServer(listener, routes, **limits)  # type: ignore[arg-type]
        thread = server.start(stop)
        try:
            yield server
        finally:
            stop.set()
            thread.join(5)


def ask(port: int, raw: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as connection:
        connection.sendall(raw)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def stalled(port: int, count: int, source: str = "127.0.0.2") -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        connections.append(connection)
    return connections


def closed_by_server(connection: socket.socket, within: float) -> bool:
    connection.settimeout(within)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /healthz?verbose=1 HTTP/1.0\r\n\r\n", b"200"),
        (b"POST /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", b"405"),
        (b"GET /filter HTTP/1.1\r\n\r\n", b"404"),
        (b"GET /static/x HTTP/1.1\r\n\r\n", b"404"),
        (b"GET /broken HTTP/1.1\r\n\r\n", b"500"),
        (b"NOT-HTTP\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"p" * 9000 + b"\r\n\r\n", b"431"),
    ],
    ids=["get", "query-http10", "post", "verb", "static", "bug", "garbage", "huge-head"],
)
def test_the_probe_server_answers_each_request_once_in_json_and_closes(raw, status):
    with probe_server() as server:
        answer = ask(server.port, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status
    assert b"\r\nConnection: close" in head
    assert json.loads(body)


def test_head_gets_the_headers_only():
    with probe_server() as server:
        answer = ask(server.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(
        b"Content-Length: 15\r\nConnection: close\r\n\r\n"
    )


def test_a_stalled_client_is_closed_at_the_deadline_and_probes_are_answered_meanwhile():
    with probe_server(deadline=1.0) as server:
        [connection] = stalled(server.port, 1)
        with connection:
            started = time.monotonic()
            assert ask(server.port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
            assert closed_by_server(connection, within=5)
            assert 0.9 <= time.monotonic() - started <= 3.0


def test_one_address_holds_at_most_per_peer_connections_and_cannot_push_out_another():
    with probe_server(capacity=8, per_peer=4) as server:
        neighbour = stalled(server.port, 2, source="127.0.0.3")
        flood = stalled(server.port, 10, source="127.0.0.2")
        try:
            # The flood's own oldest went; the neighbour's are untouched, and a probe is answered at once.
            assert [closed_by_server(c, within=0.5) for c in flood] == [True] * 6 + [False] * 4
            assert not any(closed_by_server(c, within=0.2) for c in neighbour)
            assert ask(server.port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
        finally:
            for connection in flood + neighbour:
                connection.close()


def test_the_returners_health_port_holds_300_stalled_clients_without_a_thread_each_and_closes_them():
    """What failed on the returner's ThreadingHTTPServer: +300 threads, and not one closed after 10 s."""
    registry = CollectorRegistry()
    with listen("127.0.0.1:0") as listener:
        server = serve_health(listener, SnapshotStore(), RulesInForce.fixed(RULES), registry)
        threads = threading.active_count()
        connections = [c for source in range(2, 7) for c in stalled(server.port, 60, source=f"127.0.0.{source}")]
        try:
            assert threading.active_count() == threads
            assert ask(server.port, b"GET /readyz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
            # The cap (64, 16 an address) closed most at once; the deadline closes the rest.
            assert all(closed_by_server(c, within=DEADLINE + 3) for c in connections)
        finally:
            for connection in connections:
                connection.close()


def test_the_health_routes_say_why_not_ready():
    store = SnapshotStore(ready=False, detail="waiting for the first list of nodes and pods")
    routes = health_routes(store, RulesInForce.fixed(RULES), CollectorRegistry())
    answer = routes["/readyz"]()
    assert (answer.status, json.loads(answer.body)) == (
        503,
        {"ready": False, "detail": "waiting for the first list of nodes and pods"},
    )
    assert routes["/metrics"]().content_type.startswith("text/plain; version=")


def test_a_taken_port_is_a_clear_error():
    with listen("127.0.0.1:0") as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen(f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ProbeServer]:
    with probe_server() as server:
        yield server


@settings(max_examples=60)
@given(data=st.binary(max_size=400))
def test_any_bytes_get_one_json_answer_or_none_and_the_server_carries_on(shared_server, data):
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=5) as connection:
        with contextlib.suppress(OSError):
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := connection.recv(65536):
                answer += chunk
    if answer:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 ") and head.split(b" ")[1] in (b"200", b"400", b"404", b"405", b"431")
        assert json.loads(body)
    assert ask(shared_server.port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
