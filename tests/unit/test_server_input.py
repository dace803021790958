"""Bad input against the real server (gunicorn on loopback, standalone: no cluster): JSON 4xx, no hang, bounded memory.

The Flask tests (test_http.py) cover bad JSON; these cover what only the real
server sees: broken HTTP, bodies that lie about their length, endless chunked
bodies, clients that stall, random bytes on the socket.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.e2e.controlplane import free_port

ROOT = Path(__file__).resolve().parents[2]
MAX_BODY = 1024 * 1024
# Generous: a test fails on a hang, never on a slow machine.
PATIENCE = 20.0
# A call that must succeed whenever the server serves (the standalone server has no nodes).
_BODY = b'{"Pod": {"metadata": {"name": "p", "uid": "u"}}, "NodeNames": []}'
FILTER = b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(_BODY),
    _BODY,
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extender.serve",
            f"--bind=127.0.0.1:{port}",
            f"--health-bind=127.0.0.1:{free_port()}",
            f"--max-body-bytes={MAX_BODY}",
            "--log-level=error",
            "--chains",
            str(ROOT / "chains" / "a100-40gb.yaml"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if exchange(port, FILTER)[0] == 200:
                break
        time.sleep(0.2)
    yield port, process
    process.terminate()
    process.wait(10)


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes or says how long it is)."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as connection:
        with contextlib.suppress(OSError):  # the server may answer and close before reading it all
            connection.sendall(raw)
            connection.shutdown(socket.SHUT_WR)
        return read_answer(connection)


def read_answer(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return 0, {}, data  # closed without an answer
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]  # the first answer only


def assert_json_client_error(answer: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = answer
    assert 400 <= status < 500, answer
    assert headers["content-type"] == "application/json", answer
    assert orjson.loads(body)["Error"]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT-HTTP\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"POST /filter HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
        b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 9000 + b"\r\n" * 2,
    ],
    ids=["garbage", "http-version", "header", "long-url", "bad-chunk", "huge-header"],
)
def test_broken_http_gets_a_json_client_error(server, raw):
    assert_json_client_error(exchange(server[0], raw))


@pytest.mark.parametrize("route", ["/filter", "/prioritize", "/bind"])
def test_a_body_claiming_to_be_huge_is_refused_without_being_read(server, route):
    raw = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {10**12}\r\n\r\n{{"
    assert_json_client_error(exchange(server[0], raw.encode()))


def test_an_endless_chunked_body_is_cut_off_at_the_limit_and_memory_stays_bounded(server):
    port, process = server
    worker = worker_pid(process.pid)
    before = rss_kb(worker)
    chunk = b"[" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as connection:
        connection.sendall(
            b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        with contextlib.suppress(OSError):  # the server stops reading once it has answered
            while sent < 64 * MAX_BODY:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        answer = read_answer(connection)
    assert_json_client_error(answer)
    assert rss_kb(worker) - before < 32 * 1024  # 64 MiB were offered; at most the limit and change were kept


def test_a_client_that_stalls_does_not_block_the_others(server):
    port, _ = server
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) for _ in range(4)]
    try:
        for connection in stalled:
            connection.sendall(b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")  # never finished
        assert exchange(port, FILTER)[0] == 200
    finally:
        for connection in stalled:
            connection.close()


@settings(max_examples=40)
@given(data=st.binary(min_size=1, max_size=400))
def test_random_bytes_on_the_socket_get_a_json_client_error_or_nothing_and_the_server_lives(server, data):
    port, process = server
    status, headers, body = exchange(port, data)
    if status:
        assert status < 500, (status, body)
        if status >= 400:
            assert headers.get("content-type") == "application/json"
    assert process.poll() is None
    assert exchange(port, FILTER)[0] == 200


def test_clients_that_never_close_after_their_answer_do_not_hold_up_the_others(server):
    """After an answer that ends the connection, the server waits a little for the client to close too.

    gunicorn did that wait (up to 2 s) on its event loop's own thread, one
    connection after the other: ten clients that never close held every other
    client up for 20 s.
    """
    port, _ = server
    silent = [socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) for _ in range(10)]
    try:
        for connection in silent:
            connection.sendall(b"NOT-HTTP\r\n\r\n")  # answered 400 with Connection: close; never closed by us
        time.sleep(0.5)
        started = time.monotonic()
        assert exchange(port, FILTER)[0] == 200
        assert time.monotonic() - started < 2.0
    finally:
        for connection in silent:
            connection.close()
