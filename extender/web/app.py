"""The Flask application: routes kube-scheduler's filter, prioritize and bind calls to the core; no decisions here.

The verbs only: the probes and /metrics have their own port (extender.probes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, UnsupportedMediaType

from extender.connections import certificate_names, shown_names
from extender.core.cluster import BindRequest, PodRequest, Snapshot
from extender.core.decide import Placement, filter_nodes, nodes_to_pass, score_nodes
from extender.core.preempt import yield_to_nominated
from extender.core.rules import ChainRules
from extender.metrics import Metrics
from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web import wire


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


@dataclass(frozen=True)
class _Context:
    rules: RulesInForce
    store: SnapshotStore
    binder: Binder | None
    metrics: Metrics
    pass_all_nodes: bool
    filter_log: FilterLog | None


routes = Blueprint("extender", __name__)
VERBS = {"/filter": "filter", "/prioritize": "prioritize", "/bind": "bind"}


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
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["migchain"] = _Context(
        rules, store, binder, metrics if metrics is not None else Metrics(), settings.pass_all_nodes, filter_log
    )
    app.register_blueprint(routes)
    app.before_request(_start_clock)
    if settings.require_client_certificate:
        app.before_request(partial(_require_scheduler, settings.client_identities))
    app.before_request(_require_cache_in_sync)
    app.after_request(_count)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(wire.WireError, _bad_request)
    app.register_error_handler(Exception, _unexpected)
    return app


def _context() -> _Context:
    context: _Context = current_app.extensions["migchain"]
    return context


def _json(document: object, status: int = 200) -> Response:
    return Response(wire.encode(document), status=status, mimetype="application/json")


def _body() -> bytes:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {request.mimetype or 'none'}")
    try:
        return request.get_data(cache=False)
    except HTTPException:
        raise  # the body-size limit: already a 400
    except Exception as error:
        # Reading bytes can only fail on the client's side of the wire (broken
        # chunking, a connection cut mid-body); gunicorn's parser raises its own
        # exception types for that, which this layer does not import.
        raise BadRequest(f"the body could not be read: {error}") from error


@routes.post("/filter")
def filter_() -> Response:
    args = wire.extender_args(_body())
    context = _context()
    rules = context.rules.current()
    current = context.store.snapshot()
    snapshot = _snapshot(args, rules, current)
    keep = None if context.pass_all_nodes else nodes_to_pass(len(snapshot.nodes))
    decision = filter_nodes(args.pod, args.node_names, snapshot, rules, keep)
    if context.filter_log is not None:
        # For the bind (where else the pod may run) and, when every node refused
        # it, for a retry once migchain's view catches up with the scheduler's.
        context.filter_log.filtered(args.pod, args.node_names, not decision.passed, current)
    return _json(wire.filter_result(args, decision))


@routes.post("/prioritize")
def prioritize() -> Response:
    args = wire.extender_args(_body())
    rules = _context().rules.current()
    return _json(wire.host_priority_list(score_nodes(args.pod, args.node_names, _snapshot(args, rules), rules)))


def _snapshot(args: wire.ExtenderArgs, rules: ChainRules, current: Snapshot | None = None) -> Snapshot:
    """The cluster as this pod should see it: its own reservation free, pods nominated ahead of it served first."""
    if current is None:
        current = _context().store.snapshot()
    return yield_to_nominated(wire.overlay(args, current.for_pod(args.pod.uid)), args.pod, current.nominated, rules)


@routes.post("/bind")
def bind() -> Response:
    args = wire.binding_args(_body())
    context = _context()
    if context.binder is None:
        return _json(wire.error_result("migchain runs standalone (no cluster connection) and cannot bind"), 503)
    outcome = context.binder.bind(args)
    kind = "none" if outcome.placement is None else "borrow" if outcome.placement.borrows else "exact"
    context.metrics.binds.labels("refused" if outcome.error else "bound", kind).inc()
    return _json(wire.error_result(outcome.error))


def _start_clock() -> None:
    g.started = time.perf_counter()


def _require_scheduler(identities: frozenset[str]) -> Response | None:
    certificate = _peer_certificate(request.environ)
    if not certificate:
        return _json(
            wire.error_result(f"{request.path} needs a client certificate signed by migchain's client CA"), 403
        )
    names = certificate_names(certificate)
    if identities and not names & identities:
        return _json(
            wire.error_result(
                f"the client certificate ({shown_names(names)}) is not kube-scheduler's: {sorted(identities)}"
            ),
            403,
        )
    return None


def _require_cache_in_sync() -> Response | None:
    """Until the first lists of nodes and pods are in, the verbs answer 503 and kube-scheduler retries the pod.

    A cache with the nodes listed and the pods not yet sees every slice free:
    a filter from it would pass full nodes and a bind would over-commit them.
    """
    if request.path not in VERBS:
        return None
    readiness = _context().store.readiness()
    if readiness.ready:
        return None
    return _json(wire.error_result(f"migchain is not ready: {readiness.detail}; retry later"), 503)


def _peer_certificate(environ: dict[str, object]) -> dict[str, object] | None:
    """The client certificate the TLS handshake verified, or None (plain HTTP, or none was shown)."""
    connection = environ.get("gunicorn.socket")
    getpeercert = getattr(connection, "getpeercert", None)
    certificate = getpeercert() if getpeercert is not None else None
    return certificate if isinstance(certificate, dict) else None


def _count(response: Response) -> Response:
    verb = VERBS.get(request.path)
    if verb is not None:
        context = _context()
        context.metrics.requests.labels(verb, str(response.status_code)).inc()
        context.metrics.latency.labels(verb).observe(time.perf_counter() - g.started)
    return response


def _bad_request(error: wire.WireError) -> Response:
    return _json(wire.error_result(str(error)), 400)


def _http_error(error: HTTPException) -> Response:
    # An oversized body is bad input like any other; kube-scheduler reads only `Error`.
    status = 400 if isinstance(error, RequestEntityTooLarge) else error.code or 500
    message = (
        f"body larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes"
        if isinstance(error, RequestEntityTooLarge)
        else error.description or error.name
    )
    return _json(wire.error_result(message), status)


def _unexpected(error: Exception) -> Response:
    # A bug, not bad input: log it with its trace, answer without one.
    log.exception("unexpected error in %s %s", request.method, request.path)
    _context().metrics.errors.count("http", "unexpected")
    return _json(wire.error_result(f"internal error: {type(error).__name__}"), 500)
