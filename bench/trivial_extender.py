"""The floor for an extender: a Flask app that only parses kube-scheduler's calls and answers them.

It decides nothing: every node named passes, and a bind only posts the
Binding. bench/filter_floor.py serves it beside migchain, under gunicorn's
threaded worker with one worker process as migchain runs, so the difference
between the two is what migchain's decision and plumbing cost above parsing and
answering. bench/scheduler_throughput.py wires it into kube-scheduler as its
extender (filter and bind, mutual TLS, as migchain is wired): the most pods a
second any extender served this way can let through on the same machine.

Run alone: .venv/bin/gunicorn --worker-class gthread --threads 8 --bind 127.0.0.1:8088 bench.trivial_extender:app
(set TRIVIAL_EXTENDER_KUBECONFIG for /bind)
"""

from __future__ import annotations

import functools
import os
from typing import Any

import orjson
from flask import Flask, Response, request

from extender.kube.api import Connection, KubeApi, path

app = Flask("trivial-extender", static_folder=None)


@functools.cache
def _api() -> KubeApi:
    """The same API client migchain binds with, so the floor pays the same for the Binding."""
    return KubeApi(Connection.load(os.environ["TRIVIAL_EXTENDER_KUBECONFIG"]))


@app.post("/filter")
def filter_() -> dict[str, Any]:
    """The floor as a Flask app is written: Flask's own JSON reading and answer."""
    args = request.get_json()
    return {"NodeNames": args["NodeNames"], "Nodes": None, "FailedNodes": {}, "FailedAndUnresolvableNodes": {}}


@app.post("/filter-orjson")
def filter_orjson() -> Response:
    """A stricter floor: the same with orjson, which migchain uses, for both reading and answering."""
    args = orjson.loads(request.get_data())
    result = {"NodeNames": args["NodeNames"], "Nodes": None, "FailedNodes": {}, "FailedAndUnresolvableNodes": {}}
    return Response(orjson.dumps(result), mimetype="application/json")


@app.post("/bind")
def bind() -> Response:
    """Post the Binding kube-scheduler asks for; nothing reserved, nothing checked."""
    args = orjson.loads(request.get_data())
    namespace, name = args["PodNamespace"], args["PodName"]
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace, "uid": args["PodUID"]},
        "target": {"apiVersion": "v1", "kind": "Node", "name": args["Node"]},
    }
    _api().create(path("api", "v1", "namespaces", namespace, "pods", name, "binding"), binding)
    return Response(b"{}", mimetype="application/json")
