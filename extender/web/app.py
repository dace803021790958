"""The extender's HTTP app: kube-scheduler's filter, prioritize and bind calls to the core; no decisions here.

The three verbs are answered by `Verbs`, a plain WSGI callable in front of a
Flask app that routes nothing: per call it does only what a verb needs
(client certificate, cache readiness, Content-Type, body limit, metrics),
without Flask's contexts, hooks and response objects, which cost about as
much as a small decision (issue 22). Every other path falls through to Flask,
which answers it 404 in the same JSON shape. The probes and /metrics have
their own port (extender.probes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from flask import Flask, Response, request
from prometheus_client import Counter, Histogram
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length

from extender.connections import certificate_names, shown_names
from extender.core.cluster import BindRequest, PodRequest, Snapshot
from extender.core.decide import Placement, filter_nodes, nodes_to_pass, score_nodes
from extender.core.preempt import yield_to_nominated
from extender.core.rules import ChainRules
from extender.metrics import Metrics
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web import wire

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


class BindResult(Protocol):
    @property
    def error(self) -> str: ...
    @property
    def placement(self) -> Placement | None: ...


class Binder(Protocol):
    def bind(self, args: BindRequest) -> BindResult: ...


class FilterLog(Protocol):
    """Where filter notes each call (extender.filter_memory): the only state a filter call leaves behind."""

    def filtered(self, pod: PodRequest, node_names: Sequence[str], refused: bool, decided_on: Snapshot) -> None: ...


log = logging.getLogger(__name__)

# Full `Nodes` mode sends whole Node objects (images lists included); 64 MiB
# holds about 5,000 of them. NodeNames mode, the one scheduler-config.yaml
# uses, sends a few hundred kilobytes at most.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class WebSettings:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Pass every fitting node to kube-scheduler's scoring, not just its default budget of the best.
    pass_all_nodes: bool = False
    # Mutual TLS: the verbs (which can move pods) answer only a caller that
    # showed a client certificate the TLS layer verified. The handshake already
    # requires one (serve.py); this is the second lock on the same door.
    require_client_certificate: bool = False
    # And, when given, only a certificate with one of these names (common name,
    # DNS or URI alternative name): kube-scheduler's, not any the CA signed.
    client_identities: frozenset[str] = frozenset()


def create_app(
    settings: WebSettings,
    rules: RulesInForce,
    store: SnapshotStore,
    binder: Binder | None = None,
    metrics: Metrics | None = None,
    *,
    filter_log: FilterLog | None = None,
) -> Flask:
    """The extender's WSGI app. Without a binder (standalone, no cluster) /bind answers 503."""
    # No static folder: Flask would otherwise serve /static/<path> from the
    # working directory, to anyone, before any check of ours.
    app = Flask("migchain", static_folder=None)
    metrics = metrics if metrics is not None else Metrics()
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, partial(_unexpected, metrics))
    # In front of Flask's own entry, so that gunicorn and Flask's test client alike reach the verbs through it.
    verbs = Verbs(settings, rules, store, binder=binder, metrics=metrics, filter_log=filter_log, rest=app.wsgi_app)
    app.wsgi_app = verbs  # type: ignore[method-assign]
    return app


class _Refusal(Exception):
    """An answer other than the verb's own: an HTTP status and the `Error` message kube-scheduler reads."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Status lines as Flask wrote them (werkzeug's reason phrases, upper case).
_STATUS = {code: f"{code} {HTTP_STATUS_CODES[code].upper()}" for code in (200, 400, 403, 405, 415, 500, 503)}
_JSON = ("Content-Type", "application/json")
_NOT_POST = "The method is not allowed for the requested URL."  # werkzeug's MethodNotAllowed, which Flask answered


class _Meter:
    """One verb's request counters (by status) and latency histogram, label children bound once.

    `labels()` looks a child up under its family's lock, which every request
    thread would take on every call; a bound child takes only its own value's.
    """

    def __init__(self, metrics: Metrics, verb: str) -> None:
        self._requests = metrics.requests
        self._verb = verb
        self._by_status: dict[int, Counter] = {}  # filled as statuses occur: no zero series for those that never do
        self._latency: Histogram = metrics.latency.labels(verb)

    def record(self, status: int, seconds: float) -> None:
        counter = self._by_status.get(status)
        if counter is None:  # two threads may both get here: labels() hands them the same child
            counter = self._by_status[status] = self._requests.labels(self._verb, str(status))
        counter.inc()
        self._latency.observe(seconds)


class Verbs:
    """POST /filter, /prioritize and /bind as plain WSGI, checks and answers as the Flask app had them; else `rest`.

    Order of the checks, for every verb: the client certificate (403), cache
    readiness (503), the method (405), Content-Type (415), the body's size and
    JSON (400); then the decision. A bug answers 500 with no trace, logged.
    Nothing is logged per call above debug level.
    """

    def __init__(
        self,
        settings: WebSettings,
        rules: RulesInForce,
        store: SnapshotStore,
        *,
        binder: Binder | None,
        metrics: Metrics,
        filter_log: FilterLog | None,
        rest: WSGIApplication,
    ) -> None:
        self._settings = settings
        self._rules = rules
        self._store = store
        self._binder = binder
        self._metrics = metrics
        self._filter_log = filter_log
        self._rest = rest
        self._routes = {
            "/filter": (self._filter, _Meter(metrics, "filter")),
            "/prioritize": (self._prioritize, _Meter(metrics, "prioritize")),
            "/bind": (self._bind, _Meter(metrics, "bind")),
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        route = self._routes.get(path)
        if route is None:
            refused = self._not_the_scheduler(environ, path)
            if refused:  # the second lock holds on every door, not just the verbs'
                return _send(start_response, 403, wire.error_result(refused))
            return self._rest(environ, start_response)
        started = time.perf_counter()
        decide, meter = route
        headers: list[tuple[str, str]] = []
        try:
            status, document = 200, self._answer(environ, path, decide)
        except _Refusal as refusal:
            status, document = refusal.status, wire.error_result(str(refusal))
            if status == 405:
                headers.append(("Allow", "POST"))
        except wire.WireError as error:
            status, document = 400, wire.error_result(str(error))
        except Exception as error:
            # A bug, not bad input: log it with its trace, answer without one.
            log.exception("unexpected error in %s %s", environ.get("REQUEST_METHOD"), path)
            self._metrics.errors.count("http", "unexpected")
            status, document = 500, wire.error_result(f"internal error: {type(error).__name__}")
        answer = _send(start_response, status, document, headers)
        meter.record(status, time.perf_counter() - started)
        return answer

    def _answer(self, environ: WSGIEnvironment, path: str, decide: Callable[[bytes], object]) -> object:
        refused = self._not_the_scheduler(environ, path)
        if refused:
            raise _Refusal(403, refused)
        # Until the first lists of nodes and pods are in, kube-scheduler is told to retry: a cache with
        # the nodes listed and the pods not yet sees every slice free, and would over-commit them.
        readiness = self._store.readiness()
        if not readiness.ready:
            raise _Refusal(503, f"migchain is not ready: {readiness.detail}; retry later")
        if environ.get("REQUEST_METHOD") != "POST":
            raise _Refusal(405, _NOT_POST)
        return decide(self._body(environ))

    def _not_the_scheduler(self, environ: WSGIEnvironment, path: str) -> str:
        """Why the caller may not use this port ("" when it may): no verified client certificate, or another's.

        Mutual TLS: the verbs (which can move pods) answer only a caller whose
        certificate the TLS layer verified. The handshake already requires one
        (serve.py), and the worker closes other names (worker.py): this is the
        second lock on the same door.
        """
        if not self._settings.require_client_certificate:
            return ""
        certificate = _peer_certificate(environ)
        if not certificate:
            return f"{path} needs a client certificate signed by migchain's client CA"
        names = certificate_names(certificate)
        identities = self._settings.client_identities
        if identities and not names & identities:
            return f"the client certificate ({shown_names(names)}) is not kube-scheduler's: {sorted(identities)}"
        return ""

    def _body(self, environ: WSGIEnvironment) -> bytes:
        """The body as kube-scheduler sends it: JSON, with a Content-Length (or chunked), at most max_body_bytes."""
        kind = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        if kind != "application/json":
            raise _Refusal(415, f"Content-Type must be application/json, got {kind or 'none'}")
        limit = self._settings.max_body_bytes
        length = get_content_length(environ)
        if length is not None and length > limit:
            raise _Refusal(400, f"body larger than {limit} bytes")
        stream = environ["wsgi.input"]
        try:
            if length is not None:
                body: bytes = stream.read(length)
            elif environ.get("wsgi.input_terminated"):  # chunked: read to its end, but no further than the limit
                body = stream.read(limit + 1)
                if len(body) > limit:
                    raise _Refusal(400, f"body larger than {limit} bytes")
            else:
                body = b""  # no length, and a server that cannot tell where the body ends: none
        except _Refusal:
            raise
        except Exception as error:
            # Reading bytes can only fail on the client's side of the wire (broken
            # chunking, a connection cut mid-body); gunicorn's parser raises its own
            # exception types for that, which this layer does not import.
            raise _Refusal(400, f"the body could not be read: {error}") from error
        return body

    def _filter(self, body: bytes) -> object:
        args = wire.extender_args(body)
        rules = self._rules.current()
        current = self._store.snapshot()
        snapshot = self._snapshot(args, rules, current)
        keep = None if self._settings.pass_all_nodes else nodes_to_pass(len(snapshot.nodes))
        decision = filter_nodes(args.pod, args.node_names, snapshot, rules, keep, reasons=False)
        if self._filter_log is not None:
            # For the bind (where else the pod may run) and, when every node refused
            # it, for a retry once migchain's view catches up with the scheduler's.
            self._filter_log.filtered(args.pod, args.node_names, not decision.passed, current)
        return wire.filter_result(args, decision)

    def _prioritize(self, body: bytes) -> object:
        args = wire.extender_args(body)
        rules = self._rules.current()
        return wire.host_priority_list(
            score_nodes(args.pod, args.node_names, self._snapshot(args, rules, self._store.snapshot()), rules)
        )

    @staticmethod
    def _snapshot(args: wire.ExtenderArgs, rules: ChainRules, current: Snapshot) -> Snapshot:
        """The cluster as this pod should see it: its own reservation free, pods nominated ahead of it served first."""
        return yield_to_nominated(wire.overlay(args, current.for_pod(args.pod.uid)), args.pod, current.nominated, rules)

    def _bind(self, body: bytes) -> object:
        args = wire.binding_args(body)
        if self._binder is None:
            raise _Refusal(503, "migchain runs standalone (no cluster connection) and cannot bind")
        outcome = self._binder.bind(args)
        kind = "none" if outcome.placement is None else "borrow" if outcome.placement.borrows else "exact"
        self._metrics.binds.labels("refused" if outcome.error else "bound", kind).inc()
        return wire.error_result(outcome.error)


def _send(
    start_response: StartResponse, status: int, document: object, headers: list[tuple[str, str]] | None = None
) -> list[bytes]:
    body = wire.encode(document)
    start_response(_STATUS[status], [_JSON, ("Content-Length", str(len(body))), *(headers or ())])
    return [body]


def _peer_certificate(environ: WSGIEnvironment) -> dict[str, object] | None:
    """The client certificate the TLS handshake verified, or None (plain HTTP, or none was shown)."""
    connection = environ.get("gunicorn.socket")
    getpeercert = getattr(connection, "getpeercert", None)
    certificate = getpeercert() if getpeercert is not None else None
    return certificate if isinstance(certificate, dict) else None


# -- Flask: every path but the verbs' ------------------------------------------------


def _json(document: object, status: int) -> Response:
    return Response(wire.encode(document), status=status, mimetype="application/json")


def _http_error(error: HTTPException) -> Response:
    return _json(wire.error_result(error.description or error.name), error.code or 500)


def _unexpected(metrics: Metrics, error: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.path)
    metrics.errors.count("http", "unexpected")
    return _json(wire.error_result(f"internal error: {type(error).__name__}"), 500)
