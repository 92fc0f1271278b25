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
import time

from faultproxy import LoopbackServer

__all__ = ["TLSRelay"]

IO_TIMEOUT = 30.0          # any single socket read/write (and the handshake)
CHUNK = 64 << 10
DEFAULT_LIFETIME = 600.0
POLL = 0.2                 # how often blocked loops look at the stop flag


class TLSRelay(LoopbackServer):
    """See the module docstring.  .url, .port, .start(), .stop(), and what it saw."""

    URL_SCHEME = "https"

    def __init__(self, upstream, certfile, keyfile, lifetime=DEFAULT_LIFETIME, name="tlsrelay"):
        super().__init__(upstream, lifetime, name)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certfile), str(keyfile))
        self.handshakes = 0
        self.failed_handshakes = []
        self.bytes_up = 0

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
