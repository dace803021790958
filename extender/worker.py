"""gunicorn's threaded worker, hardened against stalled clients, answering unparseable requests with JSON; no app logic.

gunicorn's gthread worker hands each new connection to a request thread,
which then does the TLS handshake and reads the request head with blocking
calls and no time limit: eight clients that stop partway hold all eight
threads, for good (issue 17, finding 1). Here the worker's event loop, which
never blocks, does that part instead. It drives each handshake and reads
each request head without blocking, as the bytes come; a request thread gets
a connection only once its whole head is in, and from then on every socket
operation has a timeout. A connection has HEAD_TIMEOUT seconds from its
accept (or, kept alive, from the first byte of its next request) to finish
both; at most ARRIVING are on that clock at once, PER_PEER from one client
address, and past that the oldest is closed (extender.connections). Closing
lingers in the event loop too, not in it blocked (gunicorn's close_graceful
waits up to 2 s for the peer on the loop's thread). Idle kept-alive
connections wait in the loop as gunicorn has them, and are closed after its
`keepalive` seconds.

The answer leaves in one write, its head with the first piece of its body
(OneSendResponse): gunicorn sends the head alone first, which on a loaded
machine woke the client for a head it could do nothing with and let it take
the CPU before the body was out.

The worker overrides gthread methods of gunicorn 27.0 (pinned in
constraints.txt): accept, handle, handle_request, finish_request,
on_client_socket_readable, murder_pending, notify. HTTP/1.1 only (gunicorn's default;
its HTTP/2 must stay off).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import ssl
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import orjson
from gunicorn import http
from gunicorn import sock as gunicorn_sock
from gunicorn import util as gunicorn_util
from gunicorn.http import wsgi
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from extender.connections import Arrivals, certificate_names, shown_names

log = logging.getLogger("migchain.extender")

# kube-scheduler sends its request head right after the handshake, in one
# write; its own httpTimeout (5 s in scheduler-config.yaml) fails any call
# slower than this, so a connection still without a whole head by then is not
# kube-scheduler's.
HEAD_TIMEOUT = 5.0
# Reading the body and writing the answer, per socket operation, in a request
# thread. Past the TLS handshake only certificate holders get here (the verbs
# port requires one), so this bounds a slow peer, not an attacker.
IO_TIMEOUT = 10.0
# kube-scheduler opens a handful of connections; 100 stalled ones fit with room.
ARRIVING = 256
PER_PEER = 64
# kube-scheduler's heads are a few hundred bytes; gunicorn's parser checks the
# detail (line and field limits) in the request thread.
HEAD_LIMIT = 32 * 1024
# How long a closed connection may still send before its socket is let go (see _linger).
LINGER = 2.0
# How often the worker tells the arbiter it is alive. gunicorn's loop did it on
# every turn, several times a request (a utime() on a file each time, about 6 %
# of a small call's time); the arbiter acts only after `timeout` (30 s) without one.
HEARTBEAT = 1.0


def write_json_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it cannot parse (bad request line, headers, chunking), as JSON.

    Every other error the extender gives is `{"Error": ...}`; a client that
    speaks broken HTTP gets the same shape rather than gunicorn's HTML page.
    """
    body = orjson.dumps({"Error": f"{reason}: {message}" if message else reason})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


class _Gathered:
    """Stands for the socket while gunicorn writes a response's first piece: keeps what it writes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.parts.append(data)


class OneSendResponse(wsgi.Response):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's HTTP/1.1 response, its head sent with the first piece of the body in one write, not two.

    Two writes are two TLS records and two TCP segments (TCP_NODELAY), and wake
    the client twice; the first wake-up is for a head it cannot use alone.
    Everything else (framing, limits, HEAD, sendfile) is gunicorn's, unchanged.
    """

    sock: socket.socket | _Gathered
    headers_sent: bool

    def write(self, arg: bytes) -> None:
        if self.headers_sent:
            super().write(arg)
            return
        sock, gathered = self.sock, _Gathered()
        self.sock = gathered
        try:
            super().write(arg)  # the head, then (or as) the first piece of the body
        finally:
            self.sock = sock
        sock.sendall(b"".join(gathered.parts))


@dataclass(eq=False)
class _Arriving:
    """A connection whose handshake or request head is not complete yet."""

    conn: TConn
    secured: bool  # the TLS handshake is done (or there is none)
    head: bytearray = field(default_factory=bytearray)


class GuardedWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """gthread with the handshake and the request head read by the event loop, under a deadline (module docstring)."""

    alive: bool
    _next_heartbeat = 0.0  # monotonic time of the next heartbeat due (notify)

    def init_process(self) -> None:
        # gunicorn writes its errors through this module function and has no
        # hook for it; the worker process is ours alone, so replace it here.
        gunicorn_util.write_error = write_json_error
        self._arriving: Arrivals[_Arriving] = Arrivals(ARRIVING, PER_PEER)
        self._lingering: Arrivals[socket.socket] = Arrivals(ARRIVING, ARRIVING)
        # serve.py's application object carries them (gunicorn passes it to the worker).
        self._identities = frozenset(getattr(self.app, "client_identities", ()))
        super().init_process()

    def notify(self) -> None:
        """Tell the arbiter this worker is alive, at most once every HEARTBEAT seconds."""
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT
            super().notify()

    # -- a new connection: handshake and head in the event loop -----------------

    def accept(self, listener: socket.socket) -> None:
        try:
            client, address = listener.accept()
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        client.setblocking(False)
        if self.cfg.is_ssl:
            try:
                client = self._tls_context().wrap_socket(
                    client,
                    server_side=True,
                    do_handshake_on_connect=False,
                    suppress_ragged_eofs=self.cfg.suppress_ragged_eofs,
                )
            except (OSError, ssl.SSLError, ValueError) as error:
                log.warning("cannot start TLS with a client: %s", error)
                self.nr_conns -= 1
                gunicorn_util.close(client)
                return
        conn = TConn(self.cfg, client, address, listener.getsockname())
        conn.initialized = True  # gunicorn's TConn.init (a blocking handshake) must not run: _advance does it
        self._arrive(_Arriving(conn, secured=not self.cfg.is_ssl))

    def _tls_context(self) -> ssl.SSLContext:
        """The serving TLS context: serve.py hands gunicorn the one ServingCredentials keep and swap when the
        files are renewed (extender/tls.py), so this costs no per-connection build."""
        context: ssl.SSLContext = gunicorn_sock.ssl_context(self.cfg)
        return context

    def _arrive(self, arriving: _Arriving) -> None:
        peer = str(arriving.conn.client[0]) if isinstance(arriving.conn.client, tuple) else "local"
        for pushed in self._arriving.add(arriving, peer, time.monotonic() + HEAD_TIMEOUT):
            log.debug("closing a connection from %s to make room (too many unfinished at once)", peer)
            self._drop(pushed)
        self.poller.register(arriving.conn.sock, selectors.EVENT_READ, partial(self._advance, arriving))

    def _advance(self, arriving: _Arriving, _ready: object = None) -> None:
        """Move the handshake and the head on as far as the bytes in hand allow, without blocking."""
        sock = arriving.conn.sock
        try:
            if not arriving.secured:
                sock.do_handshake()
                arriving.secured = True
                if not self._is_scheduler(arriving):
                    self._drop(arriving)
                    return
                self._wait(arriving, selectors.EVENT_READ)
            while True:
                data = sock.recv(65536)
                if not data:  # the client hung up: the parser answers what it sent, if anything
                    if arriving.head:
                        self._dispatch(arriving)
                    else:
                        self._drop(arriving)
                    return
                arriving.head += data
                if b"\r\n\r\n" in arriving.head:
                    self._dispatch(arriving)
                    return
                if len(arriving.head) > HEAD_LIMIT:
                    self._refuse(arriving, 431, "Request Header Fields Too Large", f"longer than {HEAD_LIMIT} bytes")
                    return
        except ssl.SSLWantWriteError:
            self._wait(arriving, selectors.EVENT_WRITE)
        except (ssl.SSLWantReadError, BlockingIOError):
            self._wait(arriving, selectors.EVENT_READ)
        except (ssl.SSLError, OSError) as error:
            # Mostly a client without a valid certificate: refused at the handshake, which is the point.
            log.debug("closing a connection from %s: %s", arriving.conn.client, error)
            self._drop(arriving)

    def _is_scheduler(self, arriving: _Arriving) -> bool:
        """Whether the verified client certificate bears a --client-identity name (true when none is pinned).

        Checked here, right after the handshake, so that another certificate
        of the CA gets no request thread either (the app refuses it too).
        """
        if not self._identities:
            return True
        certificate = arriving.conn.sock.getpeercert()
        names = certificate_names(certificate) if isinstance(certificate, dict) else frozenset()
        if names & self._identities:
            return True
        log.warning(
            "closing a connection from %s: its client certificate (%s) is not kube-scheduler's (--client-identity)",
            arriving.conn.client,
            shown_names(names),
        )
        return False

    def _wait(self, arriving: _Arriving, events: int) -> None:
        self.poller.modify(arriving.conn.sock, events, partial(self._advance, arriving))

    def _dispatch(self, arriving: _Arriving) -> None:
        """The head is in: hand the connection to a request thread, with the bytes read so far in its parser."""
        self._arriving.remove(arriving)
        self.poller.unregister(arriving.conn.sock)
        conn = arriving.conn
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(arriving.head))
        self.enqueue_req(conn)

    def _refuse(self, arriving: _Arriving, status: int, reason: str, message: str) -> None:
        with contextlib.suppress(OSError):  # it would not take even that: nothing more to say
            write_json_error(arriving.conn.sock, status, reason, message)
        self._drop(arriving)

    def _drop(self, arriving: _Arriving) -> None:
        self._arriving.remove(arriving)
        with contextlib.suppress(KeyError, ValueError, OSError):  # not registered (yet), or already closed
            self.poller.unregister(arriving.conn.sock)
        self.nr_conns -= 1
        arriving.conn.close()

    # -- in a request thread: the head is in, everything else has a timeout -------

    def handle(self, conn: TConn) -> bool:
        """gthread's `handle` for a connection whose head _dispatch has put in the parser; no HTTP/2."""
        conn.sock.settimeout(IO_TIMEOUT)
        req = None
        try:
            req = next(conn.parser)
            if not req:
                return False
            return bool(self._keepalive_after(conn, self.handle_request(req, conn)))
        except http.errors.NoMoreData as error:
            self.log.debug("Ignored premature client disconnection. %s", error)
        except StopIteration as error:
            self.log.debug("Closing connection. %s", error)
        except TimeoutError:
            self.log.debug("Closing a connection whose client stopped sending or reading for %s s", IO_TIMEOUT)
        except ssl.SSLError as error:
            if error.args[0] == ssl.SSL_ERROR_EOF:
                self.log.debug("ssl connection closed")
            else:
                self.handle_error(req, conn.sock, conn.client, error)
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as error:
            self.handle_error(req, conn.sock, conn.client, error)
        return False

    def handle_request(self, req: http.Request, conn: TConn) -> bool:
        """gthread's `handle_request` (gunicorn 27.0) with OneSendResponse as the response."""
        environ: dict[str, object] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            request_start = datetime.now()
            resp, environ = wsgi.create(
                req, conn.sock, conn.client, conn.server, self.cfg, response_class=OneSendResponse
            )
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                resp.force_close()
            if not self.alive or not self.cfg.keepalive or len(self.keepalived_conns) >= self.max_keepalived:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):  # type: ignore[arg-type]
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, "close"):
                    respiter.close()
            if resp.should_close():
                self.log.debug("Closing connection.")
                return False
        except OSError:
            raise  # to `handle`
        except (Exception, SystemExit):
            if resp and resp.headers_sent:
                # Timeout abort is SystemExit. If the response has begun, writing a 500 on the same socket corrupts it.
                self.log.exception("Error handling request")
                gunicorn_util.close_graceful(conn.sock)
                raise StopIteration() from None
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return True

    # -- back in the event loop: keep alive, or close without blocking ------------

    def finish_request(self, conn: TConn, fs: Future[bool]) -> None:
        try:
            keep = not fs.cancelled() and bool(fs.result())
        except Exception:
            keep = False
        if not keep:
            self.nr_conns -= 1
            self._linger(conn.sock)
            return
        conn.sock.setblocking(False)
        leftover = conn.parser.unreader.take_buffered()
        if leftover or (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()):
            # The next request has begun already: bytes the poller would not report again.
            arriving = _Arriving(conn, secured=True, head=bytearray(leftover))
            self._arrive(arriving)
            self._advance(arriving)
            return
        conn.set_timeout()
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
        self.keepalived_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def on_client_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        """A kept-alive connection's next request has begun: its head is read like a new connection's."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        arriving = _Arriving(conn, secured=True)
        self._arrive(arriving)
        self._advance(arriving)

    def _linger(self, sock: socket.socket) -> None:
        """Close after the answer, as gunicorn's close_graceful, without blocking the loop.

        Half-close first and read what the client still sends until it closes
        too (or LINGER passes): closing with its bytes unread would make the
        kernel reset the connection, and the client could lose the answer.
        """
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            gunicorn_util.close(sock)
            return
        for pushed in self._lingering.add(sock, "", time.monotonic() + LINGER):
            self._let_go(pushed)
        self.poller.register(sock, selectors.EVENT_READ, self._drain)

    def _drain(self, sock: socket.socket) -> None:
        # One read a turn, whatever the client sends: a fast sender must not keep the loop here.
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._let_go(sock)

    def _let_go(self, sock: socket.socket) -> None:
        self._lingering.remove(sock)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)
        gunicorn_util.close(sock)

    def murder_pending(self) -> None:
        """Called once a round of the event loop: close what has run out of time."""
        super().murder_pending()
        now = time.monotonic()
        for arriving in self._arriving.expired(now):
            log.debug("closing a connection from %s: no whole request within %s s", arriving.conn.client, HEAD_TIMEOUT)
            self._drop(arriving)
        for sock in self._lingering.expired(now):
            self._let_go(sock)
