"""The floor for the extender's latency: a Flask app that only parses kube-scheduler's filter call and answers it.

It decides nothing: every node named passes. bench/filter_floor.py serves it
beside migchain, under gunicorn's threaded worker with one worker process as
migchain runs, so the difference between the two is what migchain's decision
and plumbing cost above parsing and answering.

Run alone: .venv/bin/gunicorn --worker-class gthread --threads 8 --bind 127.0.0.1:8088 bench.trivial_extender:app
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Flask, Response, request

app = Flask("trivial-extender", static_folder=None)


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
