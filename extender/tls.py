"""The extender's TLS credentials, reloaded when their files change; a broken or half-done rotation never replaces them.

gunicorn asks its `ssl_context` hook for a context on every connection. Left
to itself it reads the certificate, key and client CA files anew each time:
a renewal that lands between reading the certificate and reading the key
fails that handshake, and a broken file fails every handshake until it is
fixed. Here one context is kept and replaced only by one that loaded whole
from files that did not move while they were read. Files are watched as
extender/reload.py watches the chain rules: a mounted Secret is updated by
swapping its `..data` symlink, which changes every file's resolved path at once.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from extender.reload import Fingerprint, fingerprint

log = logging.getLogger(__name__)

# How often a connection may look at the files: a stat of three files a second
# costs nothing, and a renewed certificate is served within a second of kubelet's swap.
CHECK_EVERY = 1.0


@dataclass(frozen=True)
class CertificateStatus:
    """What the metrics show: expiry times (Unix time; 0 when unknown) and reloads."""

    serving_not_after: float  # the certificate the extender serves
    client_ca_not_after: float  # the last CA of the client CA bundle to expire
    client_not_after: float  # the last verified client certificate seen (kube-scheduler's)
    last_reload: float  # when the credentials in use were loaded
    failures: int  # changed files that could not be loaded; the credentials before them stayed


class _Moving(Exception):
    """The files changed while they were read: try again at the next check."""


@dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    seen: Fingerprint


class ServingCredentials:
    """One SSLContext for every connection, rebuilt when the certificate, key or client CA files change."""

    def __init__(
        self,
        certificate: str | Path,
        key: str | Path,
        client_ca: str | Path | None = None,
        *,
        verify_mode: ssl.VerifyMode = ssl.CERT_NONE,
        check_every: float = CHECK_EVERY,
    ) -> None:
        """Load the files now; raises (OSError, ssl.SSLError, ValueError) when they do not make a context."""
        self._paths = [Path(certificate), Path(key), *([Path(client_ca)] if client_ca else [])]
        self._verify_mode = verify_mode
        self._check_every = check_every
        self._status = CertificateStatus(0.0, 0.0, 0.0, 0.0, 0)
        self._status_lock = threading.Lock()  # connections report client certificates while a reload runs
        self._socket_class = _observing(self._saw_client)
        self._loaded = self._load()
        self._rejected: Fingerprint | None = None  # files that failed to load; retried once they change
        self._next_check = time.monotonic() + check_every
        self._lock = threading.Lock()  # one reload at a time; connections never wait for it

    @classmethod
    def at_start(
        cls, program: str, certificate: str, key: str, client_ca: str | None, verify_mode: ssl.VerifyMode
    ) -> ServingCredentials | None:
        """For a process starting up: the credentials, or None after printing why they cannot be used (exit 2)."""
        try:
            return cls(certificate, key, client_ca, verify_mode=verify_mode)
        except (OSError, ssl.SSLError, ValueError, _Moving) as error:
            files = ", ".join(filter(None, (certificate, key, client_ca)))
            print(f"{program}: cannot serve TLS with {files}: {error}", file=sys.stderr)
            return None

    def status(self) -> CertificateStatus:
        return self._status

    def context(self) -> ssl.SSLContext:
        """The context to serve this connection with; checks the files at most every `check_every` seconds."""
        if time.monotonic() >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = time.monotonic() + self._check_every
                self.reload_if_changed()
            except Exception:  # a reload bug must not fail a connection: the credentials in use stay
                log.exception("checking the TLS files failed")
            finally:
                self._lock.release()
        return self._loaded.context

    def gunicorn_hook(self, conf: Any, default_factory: Any) -> ssl.SSLContext:
        """gunicorn's `ssl_context` setting: the kept context instead of one read from the files per connection."""
        return self.context()

    def reload_if_changed(self) -> bool:
        """Load the files if they changed since the last load or rejection; True when new credentials are in use."""
        seen = fingerprint(self._paths)
        if seen in (self._loaded.seen, self._rejected):
            return False
        try:
            loaded = self._load()
        except _Moving:
            return False  # kubelet is swapping them: next check
        except (OSError, ssl.SSLError, ValueError) as error:
            self._rejected = seen
            self._update(failures=self._status.failures + 1)
            log.error(
                "TLS files %s changed but cannot be used (%s); the credentials loaded at %s stay in use",
                ", ".join(map(str, self._paths)),
                error,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._status.last_reload)),
            )
            return False
        self._loaded = loaded
        log.info(
            "TLS credentials reloaded: serving certificate valid until %s",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._status.serving_not_after)),
        )
        return True

    def _load(self) -> _Loaded:
        before = fingerprint(self._paths)
        certificate, key, *client_ca = self._paths
        # What gunicorn's own factory builds (sock.ssl_context), from files that hold still.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca[0]) if client_ca else None)
        context.load_cert_chain(str(certificate), str(key))  # raises when the key is not the certificate's
        context.verify_mode = self._verify_mode
        context.sslsocket_class = self._socket_class
        serving = x509.load_pem_x509_certificate(certificate.read_bytes()).not_valid_after_utc
        bundle = x509.load_pem_x509_certificates(client_ca[0].read_bytes()) if client_ca else []
        if fingerprint(self._paths) != before:
            raise _Moving
        self._update(
            serving_not_after=serving.timestamp(),
            client_ca_not_after=max((c.not_valid_after_utc.timestamp() for c in bundle), default=0.0),
            last_reload=time.time(),
        )
        return _Loaded(context, before)

    def _saw_client(self, peer: dict[str, Any]) -> None:
        not_after = peer.get("notAfter")
        if isinstance(not_after, str):
            self._update(client_not_after=float(ssl.cert_time_to_seconds(not_after)))

    def _update(self, **fields: Any) -> None:
        with self._status_lock:
            self._status = replace(self._status, **fields)


def _observing(record: Any) -> type[ssl.SSLSocket]:
    """An SSLSocket that reports each verified client certificate: whether kube-scheduler uses its renewed one."""

    class ObservedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            peer = self.getpeercert()  # {} unless a client certificate was shown and verified
            if peer:
                record(peer)

    return ObservedSocket
