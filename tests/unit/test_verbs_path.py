"""The verbs' lean path (issue 22): the same answers, metrics and logs as before, without Flask's per-request work."""

from __future__ import annotations

import io
import logging
from collections import deque
from typing import Any

import orjson
import pytest
from gunicorn import glogging
from gunicorn.config import Config
from gunicorn.http import get_parser
from gunicorn.workers.gthread import TConn

from extender.core.cluster import Snapshot
from extender.metrics import Metrics
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from extender.worker import GuardedWorker
from tests.unit.test_http import RULES, pod_json

FILTER = {"Pod": pod_json(), "NodeNames": ["exact"]}
BIND = {"PodName": "p", "PodNamespace": "ml", "PodUID": "u", "Node": "exact"}


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
@pytest.mark.parametrize("verb", ["/filter", "/prioritize", "/bind"])
def test_a_verb_asked_with_any_method_but_post_is_a_405_naming_post(verb, method):
    """kube-scheduler only POSTs; anything else is told so, in the one error shape (OPTIONS too: no preflight here)."""
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore()).test_client()
    answer = client.open(verb, method=method)
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST"
    if method != "HEAD":
        assert "not allowed" in orjson.loads(answer.data)["Error"]


def test_the_verbs_are_counted_by_verb_and_code_and_timed():
    metrics = Metrics()
    client = create_app(WebSettings(max_body_bytes=4096), RulesInForce.fixed(RULES), SnapshotStore(), None, metrics)
    test = client.test_client()
    assert test.post("/filter", json=FILTER).status_code == 200
    assert test.post("/filter", data=b"{", content_type="application/json").status_code == 400
    assert test.post("/filter", data=b"{}", content_type="text/plain").status_code == 415
    assert test.post("/filter", data=b"x" * 5000, content_type="application/json").status_code == 400
    assert test.get("/filter").status_code == 405
    assert test.post("/prioritize", json=FILTER).status_code == 200
    assert test.post("/bind", json=BIND).status_code == 503  # standalone: no binder
    assert test.post("/other", json=BIND).status_code == 404  # not a verb: not counted
    counted = samples(metrics)
    requests = "migchain_extender_requests_total"
    assert counted[(requests, frozenset({("verb", "filter"), ("code", "200")}))] == 1
    assert counted[(requests, frozenset({("verb", "filter"), ("code", "400")}))] == 2
    assert counted[(requests, frozenset({("verb", "filter"), ("code", "415")}))] == 1
    assert counted[(requests, frozenset({("verb", "filter"), ("code", "405")}))] == 1
    assert counted[(requests, frozenset({("verb", "prioritize"), ("code", "200")}))] == 1
    assert counted[(requests, frozenset({("verb", "bind"), ("code", "503")}))] == 1
    assert sum(value for (name, _), value in counted.items() if name == requests) == 7
    latency = "migchain_extender_request_duration_seconds_count"
    assert counted[(latency, frozenset({("verb", "filter")}))] == 5
    assert counted[(latency, frozenset({("verb", "prioritize")}))] == 1


def test_after_its_first_call_a_verb_takes_no_metric_family_lock(monkeypatch: pytest.MonkeyPatch):
    """`labels()` looks the child up under the family's lock, shared by every request thread: bound once instead."""
    metrics = Metrics()
    test = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore(), None, metrics).test_client()
    for verb in ("/filter", "/prioritize"):
        assert test.post(verb, json=FILTER).status_code == 200
    looked_up: list[tuple[str, ...]] = []

    def noted(labels: Any) -> Any:
        def looking_up(*values: str) -> Any:
            looked_up.append(values)
            return labels(*values)

        return looking_up

    for family in (metrics.requests, metrics.latency):
        monkeypatch.setattr(family, "labels", noted(family.labels))
    for _ in range(3):
        for verb in ("/filter", "/prioritize"):
            assert test.post(verb, json=FILTER).status_code == 200
    assert looked_up == []


class _BrokenStore(SnapshotStore):
    def snapshot(self) -> Snapshot:
        raise RuntimeError("a bug")


def test_a_bug_in_a_verb_is_a_500_without_a_trace_logged_with_one(caplog: pytest.LogCaptureFixture):
    metrics = Metrics()
    test = create_app(WebSettings(), RulesInForce.fixed(RULES), _BrokenStore(), None, metrics).test_client()
    with caplog.at_level(logging.DEBUG):
        answer = test.post("/filter", json=FILTER)
    assert answer.status_code == 500
    assert orjson.loads(answer.data) == {"Error": "internal error: RuntimeError"}
    assert "Traceback" not in answer.get_data(as_text=True)
    [logged] = [record for record in caplog.records if record.levelno >= logging.INFO]
    assert logged.levelno == logging.ERROR and logged.exc_info is not None
    assert "POST /filter" in logged.getMessage()
    counted = samples(metrics)
    assert counted[("migchain_errors_total", frozenset({("component", "http"), ("kind", "unexpected")}))] == 1
    assert counted[("migchain_extender_requests_total", frozenset({("verb", "filter"), ("code", "500")}))] == 1


def test_no_call_logs_above_debug(caplog: pytest.LogCaptureFixture):
    store = SnapshotStore()
    test = create_app(
        WebSettings(max_body_bytes=4096, require_client_certificate=True), RulesInForce.fixed(RULES), store
    ).test_client()
    with caplog.at_level(logging.DEBUG):
        test.post("/filter", json=FILTER)  # 403: no certificate
        store.publish(store.snapshot(), ready=False)
        test.post("/filter", json=FILTER, environ_base={"gunicorn.socket": _Verified()})  # 503
        store.publish(store.snapshot(), ready=True)
        verified = {"gunicorn.socket": _Verified()}
        for body in (orjson.dumps(FILTER), b"{", b"x" * 5000):  # 200, 400, 400
            test.post("/filter", data=body, content_type="application/json", environ_base=verified)
    assert [record for record in caplog.records if record.levelno > logging.DEBUG] == []


class _Verified:
    def getpeercert(self) -> dict[str, object]:
        return {"subject": ((("commonName", "migchain-scheduler"),),)}


def test_other_paths_are_flasks_and_keep_the_certificate_check():
    client = create_app(
        WebSettings(require_client_certificate=True), RulesInForce.fixed(RULES), SnapshotStore()
    ).test_client()
    assert client.get("/metrics").status_code == 403
    answer = client.get("/metrics", environ_base={"gunicorn.socket": _Verified()})
    assert answer.status_code == 404
    assert "not found" in orjson.loads(answer.data)["Error"]


# -- gunicorn's side: the answer leaves in one write, and the connection stays open --------------


class _RecordingSocket:
    """Stands for the client's socket in a request thread: records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def settimeout(self, _: float | None) -> None:
        pass

    def setblocking(self, _: bool) -> None:
        pass


def _worker(app: Any) -> GuardedWorker:
    """A GuardedWorker as far as `handle_request` needs one, without the process around it."""
    cfg = Config()
    worker: GuardedWorker = GuardedWorker.__new__(GuardedWorker)
    worker.cfg = cfg
    worker.log = glogging.Logger(cfg)
    worker.wsgi = app
    worker.nr = 0
    worker.max_requests = 1_000_000
    worker.alive = True
    worker.keepalived_conns = deque()
    worker.max_keepalived = 100
    return worker


@pytest.mark.parametrize("path", ["/filter", "/bind", "/nothing-here"])
def test_an_answer_is_written_in_one_send_and_the_connection_is_kept_alive(path):
    """gunicorn writes the head and the body in two sends: two TLS records, two segments, two wake-ups of the client."""
    app = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore())
    body = orjson.dumps(FILTER)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock = _RecordingSocket()
    conn = TConn(Config(), sock, ("127.0.0.1", 40000), ("127.0.0.1", 8888))
    request = next(get_parser(Config(), [head.encode() + body], ("127.0.0.1", 40000)))
    worker = _worker(app)
    assert worker.handle_request(request, conn) is True  # kept alive for kube-scheduler's next call
    assert len(sock.writes) == 1, sock.writes
    answer = sock.writes[0]
    assert answer.startswith(b"HTTP/1.1 ") and b"\r\nConnection: keep-alive\r\n" in answer
    head_out, _, body_out = answer.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body_out)}".encode() in head_out
    assert "Error" in orjson.loads(body_out) or "NodeNames" in orjson.loads(body_out)


def _no_content(_environ: Any, start_response: Any) -> list[bytes]:
    start_response("204 No Content", [])
    return []


def test_an_empty_answer_is_one_send_too():
    worker = _worker(_no_content)
    sock = _RecordingSocket()
    conn = TConn(Config(), sock, ("127.0.0.1", 40000), ("127.0.0.1", 8888))
    request = next(get_parser(Config(), [b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"], None))
    assert worker.handle_request(request, conn) is True
    assert len(sock.writes) == 1 and sock.writes[0].startswith(b"HTTP/1.1 204")


class _Broken:
    def read(self, _size: int = -1) -> bytes:
        raise OSError("connection reset mid-body")


def _call(app: Any, body: Any, **environ: Any) -> tuple[str, dict[str, Any]]:
    """The app called as gunicorn calls it, with a chunked body (no Content-Length) unless told otherwise."""
    answered: list[str] = []
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/filter",
        "CONTENT_TYPE": "application/json",
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input": body,
        "wsgi.input_terminated": True,
        **environ,
    }
    out = b"".join(app(environ, lambda status, headers: answered.append(status)))
    return answered[0], orjson.loads(out)


def test_a_chunked_body_is_read_to_its_end_but_no_further_than_the_limit():
    app = create_app(WebSettings(max_body_bytes=4096), RulesInForce.fixed(RULES), SnapshotStore())
    status, answer = _call(app, io.BytesIO(orjson.dumps(FILTER)))
    assert status.startswith("200") and answer["Error"] == ""
    status, answer = _call(app, io.BytesIO(b" " * 4097))
    assert status.startswith("400") and answer == {"Error": "body larger than 4096 bytes"}
    status, answer = _call(app, io.BytesIO(orjson.dumps(FILTER)), CONTENT_LENGTH="5000", HTTP_TRANSFER_ENCODING="")
    assert status.startswith("400") and answer == {"Error": "body larger than 4096 bytes"}


def test_a_body_cut_off_on_the_wire_is_a_400():
    app = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore())
    status, answer = _call(app, _Broken())
    assert status.startswith("400")
    assert answer == {"Error": "the body could not be read: connection reset mid-body"}


class _Heartbeats:
    """gunicorn's WorkerTmp: `notify` touches a file the arbiter reads to know the worker is alive."""

    def __init__(self) -> None:
        self.count = 0

    def notify(self) -> None:
        self.count += 1


def test_the_worker_tells_the_arbiter_it_is_alive_once_a_second_not_on_every_turn_of_its_loop(
    monkeypatch: pytest.MonkeyPatch,
):
    """The loop turns several times per request; each heartbeat is a utime() call, and the arbiter's timeout is 30 s."""
    worker = _worker(None)
    worker.tmp = _Heartbeats()
    now = [1000.0]
    monkeypatch.setattr("extender.worker.time.monotonic", lambda: now[0])
    for _ in range(100):
        worker.notify()
        now[0] += 0.005
    assert worker.tmp.count == 1
    now[0] += 1.0
    worker.notify()
    assert worker.tmp.count == 2
    assert Config().timeout >= 10  # the arbiter's deadline (serve.py keeps gunicorn's) stays far above the period
