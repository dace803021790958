"""The thin API client's error contract, against real sockets: every failure to reach the API server is an ApiError."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from kubernetes import client

from extender.kube.api import ApiError, Connection, KubeApi


def api_at(url: str) -> KubeApi:
    configuration = client.Configuration()
    configuration.host = url
    return KubeApi(Connection(configuration), timeout=2)


def test_no_answer_is_an_api_error_of_unknown_outcome():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens once the socket is closed
    with pytest.raises(ApiError) as raised:
        api_at(f"http://127.0.0.1:{port}").get("/api/v1/pods")
    assert raised.value.status == 0
    assert not raised.value.definitive  # a create may have gone through before the connection broke
    assert "/api/v1/pods" in str(raised.value)


class _HtmlErrors(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>502 Bad Gateway</html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def html_proxy() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxy_page_instead_of_a_status_is_an_api_error_with_its_text(html_proxy):
    with pytest.raises(ApiError) as raised:
        api_at(html_proxy).get("/api/v1/nodes")
    assert raised.value.status == 502
    assert "Bad Gateway" in raised.value.message
