"""A thin JSON client of the Kubernetes API: auth and TLS from the `kubernetes` package, bodies as dicts.

The generated models of the `kubernetes` package cost more CPU and memory than
the extender can spend on 100,000 pods, so objects stay plain dicts parsed by
orjson; only configuration (kubeconfig, in-cluster, TLS, tokens) is borrowed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, urlencode

import orjson
import urllib3
from kubernetes import client, config

log = logging.getLogger(__name__)

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """A non-2xx answer of the API server, with its status and the Status message.

    Status 0: no answer at all (connection refused or cut, a timeout): the
    request may or may not have taken effect.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")

    @property
    def namespace_gone(self) -> bool:
        """The namespace is being deleted, or is gone: nothing can be created in it any more."""
        return (self.status == 403 and "because it is being terminated" in self.message) or (
            self.status == 404 and self.message.startswith('namespaces "')
        )

    @property
    def definitive(self) -> bool:
        """The request certainly had no effect (a 4xx other than a timeout or throttling)."""
        return 400 <= self.status < 500 and self.status not in (408, 429)


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate to it."""

    configuration: client.Configuration

    @classmethod
    def load(cls, kubeconfig: str | None) -> Connection:
        configuration = client.Configuration()
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
        return cls(configuration)


def path(*segments: str) -> str:
    return "/" + "/".join(quote(segment, safe="") for segment in segments)


class KubeApi:
    """Thread-safe: urllib3's pool is shared by the watch threads and the request threads."""

    def __init__(self, connection: Connection, pool_size: int = 16, timeout: float = 30.0) -> None:
        configuration = connection.configuration
        configuration.connection_pool_maxsize = pool_size
        self._configuration = configuration
        self._host = configuration.host.rstrip("/")
        self._pool = client.ApiClient(configuration).rest_client.pool_manager
        self._timeout = timeout

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": JSON, "User-Agent": "migchain"}
        if content_type:
            headers["Content-Type"] = content_type
        settings = cast(dict[str, dict[str, Any]], self._configuration.auth_settings())
        for setting in settings.values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers

    def _url(self, resource: str, query: Mapping[str, Any] | None) -> str:
        return self._host + resource + ("?" + urlencode(query) if query else "")

    def request(
        self,
        method: str,
        resource: str,
        body: Any = None,
        *,
        query: Mapping[str, Any] | None = None,
        content_type: str = JSON,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        try:
            response = self._pool.request(
                method,
                self._url(resource, query),
                body=None if body is None else orjson.dumps(body),
                headers=self._headers(content_type if body is not None else None),
                timeout=urllib3.Timeout(total=timeout or self._timeout),
                preload_content=True,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as error:
            # One exception type for callers: every failure to talk to the API server is an ApiError.
            raise ApiError(0, "NoAnswer", f"{method} {resource}: {error}") from error
        try:
            document = orjson.loads(response.data) if response.data else {}
        except orjson.JSONDecodeError:  # a proxy's HTML error page, say
            document = {"message": response.data[:200].decode(errors="replace")}
        if response.status >= 300:
            raise ApiError(response.status, document.get("reason", response.reason or ""), document.get("message", ""))
        return document if isinstance(document, dict) else {}

    def healthy(self, endpoint: str = "/readyz") -> bool:
        """Whether the API server answers 200 on a health endpoint (plain text, not JSON)."""
        response = self._pool.request(
            "GET",
            self._url(endpoint, None),
            headers=self._headers(None),
            timeout=urllib3.Timeout(total=5),
            retries=False,
        )
        return bool(response.status == 200)

    def get(self, resource: str, **query: Any) -> dict[str, Any]:
        return self.request("GET", resource, query=query or None)

    def create(self, resource: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", resource, body)

    def patch(self, resource: str, body: Any, content_type: str = MERGE_PATCH) -> dict[str, Any]:
        return self.request("PATCH", resource, body, content_type=content_type)

    def delete(self, resource: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.request("DELETE", resource, options)

    def list_all(self, resource: str, page: int = 500, **query: Any) -> tuple[list[dict[str, Any]], str]:
        """Every item of a collection, in pages; returns the items and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"limit": page, **query}
            if token:
                params["continue"] = token
            document = self.request("GET", resource, query=params, timeout=120)
            items.extend(document.get("items") or [])
            metadata = document.get("metadata") or {}
            token = metadata.get("continue") or ""
            if not token:
                return items, metadata.get("resourceVersion", "")

    def watch(
        self,
        resource: str,
        resource_version: str,
        timeout_seconds: int = 300,
        on_open: Callable[[Any], None] | None = None,
        **selectors: str,
    ) -> Iterator[dict[str, Any]]:
        """Watch events from `resource_version` on, with bookmarks; ends when the server closes the stream.

        `on_open` gets the response once it is open: its `shutdown()` ends the stream from another thread.
        """
        query = {
            **selectors,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout_seconds,
        }
        response = self._pool.request(
            "GET",
            self._url(resource, query),
            headers=self._headers(None),
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30),
            preload_content=False,
            retries=False,
        )
        if on_open is not None:
            on_open(response)
        try:
            if response.status >= 300:
                document = orjson.loads(response.read() or b"{}")
                raise ApiError(response.status, document.get("reason", ""), document.get("message", ""))
            buffer = b""
            for chunk in response.stream(64 * 1024):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield orjson.loads(line)
        finally:
            response.release_conn()
