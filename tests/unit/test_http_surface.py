"""What the app serves: kube-scheduler's verbs, nothing else (no static files; the probes have their own port)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extender.reload import RulesInForce
from extender.store import SnapshotStore
from extender.web.app import WebSettings, create_app
from tests.unit.test_http import RULES


def test_flask_serves_no_static_files_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Flask adds /static/<path> by default, from a folder next to the app (here: the working directory)."""
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "secret.txt").write_text("not for you")
    monkeypatch.chdir(tmp_path)
    client = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore()).test_client()
    answer = client.get("/static/secret.txt")
    assert answer.status_code == 404
    assert answer.get_json() == {
        "Error": "The requested URL was not found on the server. "
        "If you entered the URL manually please check your spelling and try again."
    }


def test_the_app_routes_the_three_verbs_only():
    """The verbs are served in front of Flask (extender.web.app.Verbs), which routes nothing of its own."""
    app = create_app(WebSettings(), RulesInForce.fixed(RULES), SnapshotStore())
    assert list(app.url_map.iter_rules()) == []
    client = app.test_client()
    for verb in ("/bind", "/filter", "/prioritize"):
        assert client.post(verb, json={}).status_code == 400, verb  # answered: the body is not kube-scheduler's
    for other in ("/", "/static/app.js", "/filter/", "/preempt", "/healthz", "/metrics"):
        assert client.post(other, json={}).status_code == 404, other
