"""A TLS-terminating proxy in front of kube-apiserver that can lose, hold back or drop chosen requests.

It relays bytes both ways (watches stream through unchanged) and looks only at
the first line of each request the client sends. A rule decides, from the
method and the path, what happens to it:

- "pass": relayed as is;
- "drop-answer": relayed, the API server's answer read and thrown away, the
  client's connection closed: the write happened, the client never hears so;
- "drop-request": never relayed, the client's connection closed: nothing happened,
  the client cannot tell;
- a number: relayed after that many seconds.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.controlplane import ADMIN_TOKEN, ControlPlane

Action = str | float
Rule = Callable[[str, str], Action]
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
REQUEST_LINE = re.compile(rb"^(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n")


def passing(method: str, resource: str) -> Action:
    return "pass"


class ApiProxy:
    def __init__(self, plane: ControlPlane, rule: Rule = passing) -> None:
        self.plane = plane
        self.rule = rule
        self.seen: list[tuple[str, str, Action]] = []  # every request that was not simply passed
        self._lock = threading.Lock()
        serving = plane.ca.issue("api-proxy", hosts=("127.0.0.1",), server=True)
        self._server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_context.load_cert_chain(serving.certificate, serving.key)
        self._server_context.set_alpn_protocols(["http/1.1"])
        self._client_context = ssl.create_default_context(cafile=str(plane.ca.path))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="api-proxy", daemon=True).start()

    def kubeconfig(self, folder: Path, name: str) -> Path:
        """A kubeconfig like the admin's, its server this proxy."""
        document: dict[str, Any] = self.plane.kubeconfig_document(ADMIN_TOKEN)
        document["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        file = folder / f"{name}.kubeconfig"
        file.write_text(yaml.safe_dump(document))
        return file

    def actions(self, action: Action) -> list[tuple[str, str]]:
        with self._lock:
            return [(method, resource) for method, resource, taken in self.seen if taken == action]

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self._server_context.wrap_socket(raw, server_side=True)
            upstream = self._client_context.wrap_socket(
                socket.create_connection(("127.0.0.1", self.plane.api_port)), server_hostname="127.0.0.1"
            )
        except (OSError, ssl.SSLError):
            raw.close()
            return
        try:
            self._relay(client, upstream)
        except OSError:  # either end cut the connection (ssl.SSLError included): this connection ends
            pass
        finally:
            for end in (client, upstream):
                with contextlib.suppress(OSError):
                    end.close()

    def _relay(self, client: ssl.SSLSocket, upstream: ssl.SSLSocket) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([client, upstream], [], [], 0.5)
            # Bytes TLS has decrypted already are not seen by select: they are read too.
            ready += [end for end in (client, upstream) if end.pending() and end not in ready]
            for end in ready:
                if not self._move(end, upstream if end is client else client, from_client=end is client):
                    return

    def _move(self, source: ssl.SSLSocket, target: ssl.SSLSocket, *, from_client: bool) -> bool:
        """Relay what `source` has; False once the connection is to end."""
        data = source.recv(65536)
        if not data:
            return False
        action = self._decide(data) if from_client else "pass"
        if action == "drop-request":
            return False
        if isinstance(action, float | int):
            self._stop.wait(float(action))
        if action == "drop-answer":
            self._forward_whole(source, target, data)
            target.settimeout(10)
            with contextlib.suppress(OSError):
                target.recv(65536)  # the API server has answered: the write is done
            return False
        target.sendall(data)
        return True

    @staticmethod
    def _forward_whole(source: ssl.SSLSocket, target: ssl.SSLSocket, data: bytes) -> None:
        """Send the whole request that `data` starts: its headers, then as many body bytes as they announce (the
        client may write them apart)."""
        while b"\r\n\r\n" not in data:
            data += source.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = CONTENT_LENGTH.search(head)
        wanted = int(length.group(1)) if length else 0
        while len(body) < wanted:
            body += source.recv(65536)
        target.sendall(head + b"\r\n\r\n" + body)

    def _decide(self, data: bytes) -> Action:
        match = REQUEST_LINE.match(data)
        if match is None:
            return "pass"
        method, resource = match.group(1).decode(), match.group(2).decode().split("?", 1)[0]
        action = self.rule(method, resource)
        if action != "pass":
            with self._lock:
                self.seen.append((method, resource, action))
        return action
