"""A TLS-terminating TCP relay for S3 tests: HTTPS in front of radosgw's plain-HTTP endpoint.

    relay = TLSRelay("http://127.0.0.1:7480", "server-cert.pem", "server-key.pem").start()
    env["AWS_ENDPOINT_URL"] = relay.url          # https://127.0.0.1:<free port>
    ...
    relay.stop()                                 # or: with TLSRelay(...) as relay:

Each client connection is TLS-terminated with CERTFILE/KEYFILE, then its bytes are relayed
both ways, unchanged, to the upstream over plain TCP.  Nothing is parsed or rewritten, so
SigV4 signatures stay valid: the client signs the relay's host:port, and radosgw checks the
Host header it receives, which is that same host:port.

What the relay saw is kept for the tests: `handshakes` (completed TLS handshakes),
`failed_handshakes` (the reason of each handshake the client broke off, e.g. because it did
not trust the certificate), `bytes_up` (plain bytes passed on to the upstream) and `errors`
(exceptions in the relay itself, which a test should treat as a failure).

Safety: listens on 127.0.0.1 only, relays only to a loopback upstream, every socket has a
timeout, every loop is bounded, and the relay shuts itself down after `lifetime` seconds
even if stop() is never called.  Standard library only.
"""

import select
import socket
import ssl
import threading
import time
import urllib.parse

__all__ = ["TLSRelay"]

IO_TIMEOUT = 30.0          # any single socket read/write (and the handshake)
CHUNK = 64 << 10
MAX_CONNECTIONS = 10000    # over the relay's life
DEFAULT_LIFETIME = 600.0
POLL = 0.2                 # how often blocked loops look at the stop flag


class TLSRelay:
    """See the module docstring.  .url, .port, .start(), .stop(), and what it saw."""

    def __init__(self, upstream, certfile, keyfile, lifetime=DEFAULT_LIFETIME, name="tlsrelay"):
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("TLSRelay only relays to a plain-HTTP loopback upstream, not %r" % upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certfile), str(keyfile))
        self.lifetime, self.name = lifetime, name
        self.handshakes = 0
        self.failed_handshakes = []
        self.bytes_up = 0
        self.errors = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = None
        self._thread = None
        self._socks = set()
        self._threads = []
        self.port = None
        self.url = None

    # -- life cycle --

    def start(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL)
        self.port = self._listener.getsockname()[1]
        self.url = "https://127.0.0.1:%d" % self.port
        self._deadline = time.monotonic() + self.lifetime
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=10.0):
        """Stop accepting, close every connection, and wait for the threads (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for sock in socks:
            _shutdown_quietly(sock)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def alive_threads(self):
        with self._lock:
            threads = list(self._threads) + ([self._thread] if self._thread else [])
        return [t for t in threads if t.is_alive()]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _stopping(self):
        return self._stop.is_set() or time.monotonic() > self._deadline

    def _track(self, sock):
        with self._lock:
            self._socks.add(sock)

    def _untrack(self, sock):
        with self._lock:
            self._socks.discard(sock)
        _close_quietly(sock)

    # -- accepting --

    def _serve(self):
        try:
            for accepted in range(1, MAX_CONNECTIONS + 1):
                sock = None
                while sock is None and not self._stopping():
                    try:
                        sock, peer = self._listener.accept()
                    except socket.timeout:
                        continue
                    if not peer[0].startswith("127."):
                        _close_quietly(sock)
                        sock = None
                if sock is None:
                    return
                sock.settimeout(IO_TIMEOUT)
                self._track(sock)
                thread = threading.Thread(target=self._handle, args=(sock,), daemon=True,
                                          name="%s-conn%d" % (self.name, accepted))
                with self._lock:
                    self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()
        except OSError:
            pass
        finally:
            _close_quietly(self._listener)
            self._stop.set()

    # -- one client connection --

    def _handle(self, raw):
        tls = up = None
        try:
            tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self._untrack(raw)  # wrap_socket detached it; `tls` owns the file descriptor now
            self._track(tls)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as e:  # the client gave up on us, e.g. an untrusted cert
                with self._lock:
                    self.failed_handshakes.append(getattr(e, "reason", None) or str(e))
                return
            with self._lock:
                self.handshakes += 1
            up = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
            self._track(up)
            self._pump(tls, up)
        except (OSError, ValueError):
            pass  # a peer went away or we are stopping
        except Exception as e:  # a bug in the relay: remember it for the test
            self.errors.append(e)
        finally:
            for sock in (up, tls, raw):
                if sock is not None:
                    self._untrack(sock)

    def _pump(self, tls, up):
        """Relay until either side closes; one thread, so the SSL object is never shared."""
        idle_since = time.monotonic()
        while not self._stopping():
            if tls.pending():
                readable = [tls]
            else:
                readable, _, _ = select.select([tls, up], [], [], POLL)
            if not readable:
                if time.monotonic() - idle_since > IO_TIMEOUT * 4:
                    return
                continue
            idle_since = time.monotonic()
            if tls in readable:
                try:
                    data = tls.recv(CHUNK)
                except ssl.SSLWantReadError:  # only a part of a TLS record so far
                    data = None
                if data == b"":
                    return
                if data:
                    up.sendall(data)
                    with self._lock:
                        self.bytes_up += len(data)
            if up in readable:
                data = up.recv(CHUNK)
                if not data:
                    return
                tls.sendall(data)


def _shutdown_quietly(sock):
    """shutdown() wakes a thread blocked on the socket; close() alone does not."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


def _close_quietly(sock):
    if sock is not None:
        try:
            sock.close()
        except (OSError, ValueError):
            pass
