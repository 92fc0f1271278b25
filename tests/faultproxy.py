"""A fault-injecting HTTP/1.1 proxy for S3 tests: byte-exact forwarding plus scripted faults.

    proxy = FaultProxy("http://127.0.0.1:7480", rule).start()   # listens on 127.0.0.1:<free port>
    FaultProxy(upstream, rule, address="127.4.5.6")               # ... or on another loopback address
    env["AWS_ENDPOINT_URL"] = proxy.url
    ...
    proxy.stop()                                                 # or: with FaultProxy(...) as proxy:

A request is forwarded exactly as received (request line, every header including Host and
Authorization, body), so SigV4 signatures stay valid: the client signs the proxy's host:port,
and the upstream (radosgw) checks the Host header it receives, which is that same host:port.

Each request is shown to RULE(req) before anything is forwarded.  `req` has method, target,
path (decoded), query (decoded pairs), headers (lowercased names), n (1-based number of the
request in this proxy), attempt (1-based count of this distinct request: same method, target and
Range header), region (from the Authorization credential scope) and key (the object key,
without the bucket).  RULE returns None (forward unchanged) or one of:

    Reply(status, body, headers)   answer without contacting the upstream (see s3_error())
    Reset(keep)                    forward, then send the response head and KEEP body bytes
                                   and reset the connection (RST)
    Truncate(keep)                 forward, then send the head (its Content-Length unchanged)
                                   and KEEP body bytes, then close the connection (FIN)

KEEP is a byte count or a fraction (0.5) of the body; it is always kept below the body size.
A chunked body is cut in its raw (framed) bytes, so the client sees a broken chunked stream.

Safety: listens on a loopback address only (127.0.0.1 unless told), forwards only to a loopback
upstream, every socket has a timeout, every loop is bounded, and the proxy shuts itself down
after `lifetime` seconds even if stop() is never called.  Standard library only.
"""

import contextlib
import re
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from xml.sax.saxutils import escape as xml_escape

__all__ = ["FaultProxy", "LoopbackServer", "Overlap", "started_servers", "Reply", "Reset", "Truncate", "Request", "s3_error"]

IO_TIMEOUT = 30.0          # any single socket read/write
MAX_HEAD = 64 << 10        # request or response head
MAX_HEADERS = 200
MAX_BODY = 1 << 30         # a request body we are willing to relay
MAX_REQUESTS_PER_CONN = 10000
MAX_INTERIM = 10           # 1xx answers before the final one
MAX_CONNECTIONS = 10000    # over the proxy's life
CHUNK = 64 << 10
MAX_CUT_BODY = 64 << 20    # a body without Content-Length is read whole before it is cut
RESET_PAUSE = 0.05         # let the client read the partial body before the RST
DEFAULT_LIFETIME = 900.0

_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/")


class Reply:
    """Answer the request directly with STATUS, BODY and HEADERS (the upstream never sees it)."""

    def __init__(self, status, body=b"", headers=None, reason=None):
        self.status, self.body, self.headers = int(status), body, dict(headers or {})
        self.reason = reason or _REASONS.get(self.status, "Status")

    def __repr__(self):
        return "Reply(%d)" % self.status


class _Cut:
    def __init__(self, keep=0.5):
        self.keep = keep

    def bytes_to_send(self, length):
        """How many body bytes to pass on (always fewer than LENGTH, never negative)."""
        if isinstance(self.keep, float):
            n = int(length * self.keep)
        else:
            n = int(self.keep)
        return max(0, min(n, length - 1))

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self.keep)


class Reset(_Cut):
    """Forward; send the head and part of the body, then reset the connection."""


class Truncate(_Cut):
    """Forward; send the head (declared length unchanged) and part of the body, then close."""


_REASONS = {200: "OK", 204: "No Content", 301: "Moved Permanently", 400: "Bad Request",
            403: "Forbidden", 404: "Not Found", 500: "Internal Server Error",
            503: "Service Unavailable"}


def s3_error(status, code, message, resource="", extra_xml="", headers=None):
    """A Reply carrying an S3 XML error document (as S3 sends it)."""
    request_id = uuid.uuid4().hex[:16].upper()
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message>'
            '%s<Resource>%s</Resource><RequestId>%s</RequestId><HostId>faultproxy</HostId></Error>'
            % (xml_escape(code), xml_escape(message), extra_xml, xml_escape(resource), request_id)).encode()
    all_headers = {"Content-Type": "application/xml", "x-amz-request-id": request_id}
    all_headers.update(headers or {})
    return Reply(status, body, all_headers)


class Request:
    """What a rule sees of one request."""

    def __init__(self, method, target, headers, n, attempt):
        self.method, self.target, self.headers, self.n, self.attempt = method, target, headers, n, attempt
        parts = urllib.parse.urlsplit(target)
        self.path = urllib.parse.unquote(parts.path)
        self.query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        found = _SCOPE.search(headers.get("authorization", ""))
        self.region = found.group(1) if found else None

    @property
    def query_names(self):
        return {k for k, _ in self.query}

    @property
    def key(self):
        """The object key of a path-style request (/bucket/key), '' for bucket requests."""
        return self.path.lstrip("/").partition("/")[2]

    def __repr__(self):
        return "<Request #%d %s %s attempt=%d>" % (self.n, self.method, self.target, self.attempt)


class _Closed(Exception):
    """The peer went away (or sent something we will not relay)."""


class _Stream:
    """A socket with a bounded read buffer: lines and exact-size reads."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _fill(self):
        data = self.sock.recv(CHUNK)
        if not data:
            raise _Closed("eof")
        self.buf += data

    def read_head(self, allow_eof=False):
        """Bytes up to and including the blank line ending a head."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise _Closed("head too large")
            if allow_eof and not self.buf:
                try:
                    self._fill()
                except _Closed:
                    return None
            else:
                self._fill()
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def read_line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise _Closed("line too long")
            self._fill()
        end = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:end], self.buf[end:]
        return line

    def read_some(self, limit):
        """Up to LIMIT bytes (at least one)."""
        if not self.buf:
            self._fill()
        data, self.buf = self.buf[:limit], self.buf[limit:]
        return data

    def read_until_eof(self, limit):
        """Up to LIMIT bytes, b'' at end of stream."""
        if not self.buf:
            try:
                self._fill()
            except _Closed:
                return b""
        data, self.buf = self.buf[:limit], self.buf[limit:]
        return data


def _parse_head(head):
    """(first line, [(name, value)], {lowercase name: value}) of a raw head."""
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) > MAX_HEADERS + 3:
        raise _Closed("too many headers")
    pairs = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _Closed("bad header line %r" % line[:80])
        pairs.append((name.strip(), value.strip()))
    return lines[0], pairs, {n.lower(): v for n, v in pairs}


def _body_chunks(stream, headers, no_body=False):
    """Yield the raw bytes of a message body (framing kept) as they arrive.

    Returns via StopIteration; a body delimited by EOF is read to the end (bounded).
    """
    if no_body:
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        for _ in range(1 << 20):
            line = stream.read_line()
            yield line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                for _ in range(MAX_HEADERS):  # trailers, then the blank line
                    trailer = stream.read_line()
                    yield trailer
                    if trailer == b"\r\n":
                        return
                raise _Closed("too many trailers")
            total += size
            if total > MAX_BODY:
                raise _Closed("chunked body too large")
            remaining = size + 2  # data and its CRLF
            while remaining:
                data = stream.read_some(min(CHUNK, remaining))
                remaining -= len(data)
                yield data
        raise _Closed("too many chunks")
    if "content-length" in headers:
        remaining = int(headers["content-length"])
        if remaining < 0 or remaining > MAX_BODY:
            raise _Closed("bad Content-Length")
        while remaining:
            data = stream.read_some(min(CHUNK, remaining))
            remaining -= len(data)
            yield data


def _bounded(chunks, limit):
    """Pass CHUNKS on, refusing more than LIMIT bytes in all."""
    total = 0
    for data in chunks:
        total += len(data)
        if total > limit:
            raise _Closed("body too large")
        yield data


def _is_loopback(host):
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(
        info[4][0].startswith("127.") or info[4][0] == "::1" for info in infos)


class LoopbackServer:
    """What FaultProxy and tlsrelay.TLSRelay share: a listener on 127.0.0.1 with a thread per
    loopback client calling self._handle(sock), a bounded life, and a stop() that wakes
    every blocked thread.  Subclasses set URL_SCHEME and define _handle()."""

    URL_SCHEME = "http"

    def __init__(self, upstream, lifetime, name, address="127.0.0.1"):
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not _is_loopback(parts.hostname):
            raise ValueError("%s only forwards to a plain-HTTP loopback upstream, not %r"
                             % (type(self).__name__, upstream))
        self.upstream = (parts.hostname, parts.port or 80)
        self.lifetime, self.name = lifetime, name
        if not address.startswith("127."):
            raise ValueError("%s listens on loopback addresses only, not %r" % (type(self).__name__, address))
        self.address = address
        self.errors = []  # exceptions raised inside the server (other than peers going away)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = None
        self._thread = None
        self._socks = set()
        self._threads = []
        self.port = self.url = None

    # -- life cycle --

    def start(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.address, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = "%s://%s:%d" % (self.URL_SCHEME, self.address, self.port)
        self._deadline = time.monotonic() + self.lifetime
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=10.0):
        """Stop accepting, close every connection, and wait for the threads (bounded)."""
        self._stop.set()
        if self._listener is not None:
            with _suppress_os():  # wakes accept() at once
                self._listener.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for sock in socks:  # shutdown() wakes a thread blocked in recv(); close() alone does not
            with _suppress_os():
                sock.shutdown(socket.SHUT_RDWR)
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

    def _serve(self):
        try:
            accepted = 0
            while not self._stopping() and accepted < MAX_CONNECTIONS:
                try:
                    sock, peer = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not peer[0].startswith("127."):
                    _close_quietly(sock)
                    continue
                accepted += 1
                sock.settimeout(IO_TIMEOUT)
                thread = threading.Thread(target=self._handle, args=(sock,), daemon=True,
                                          name="%s-conn%d" % (self.name, accepted))
                with self._lock:
                    self._socks.add(sock)
                    self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()
        finally:
            _close_quietly(self._listener)
            self._stop.set()

    def _handle(self, sock):
        raise NotImplementedError


@contextlib.contextmanager
def started_servers(make):
    """Yield start(*args) -> make(*args).start(); afterwards stop them all, then check that none
    left a thread running or failed inside (the body of the fault_proxy and tls_relay fixtures)."""
    started = []

    def start(*args, **kwargs):
        server = make(*args, **kwargs).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
    for server in started:
        assert not server.alive_threads, "%s threads still running: %r" % (server.name, server.alive_threads)
        assert not server.errors, "%s itself failed: %r" % (server.name, server.errors)


class Overlap:
    """A rule that holds each request it picks for DELAY seconds and counts how many were held
    at once: .most is the highest overlap seen (requests the client sent concurrently)."""

    def __init__(self, picks, delay):
        self.picks, self.delay = picks, delay
        self.now = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, req):
        if self.picks(req):
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(self.delay)
            with self._lock:
                self.now -= 1
        return None


class FaultProxy(LoopbackServer):
    """See the module docstring.  .url, .log (one dict per request), .start(), .stop()."""

    def __init__(self, upstream, rule=None, lifetime=DEFAULT_LIFETIME, name="faultproxy", address="127.0.0.1"):
        super().__init__(upstream, lifetime, name, address)
        self.rule = rule or (lambda req: None)
        self.log = []
        self._counts = {}
        self._n = 0

    # -- one client connection --

    def _handle(self, sock):
        client = _Stream(sock)
        try:
            for _ in range(MAX_REQUESTS_PER_CONN):
                if self._stopping():
                    return
                if not self._one_request(sock, client):
                    return
        except (_Closed, OSError, ValueError):
            pass
        except Exception as e:  # a bug in the proxy or a rule: remember it for the test
            self.errors.append(e)
        finally:
            self._untrack(sock)

    def _one_request(self, sock, client):
        """Serve one request; False when the client connection must close."""
        head = client.read_head(allow_eof=True)
        if head is None:
            return False
        first, pairs, headers = _parse_head(head)
        method, target, version = first.split(" ", 2)
        identity = (method, target, headers.get("range", ""))
        with self._lock:
            self._n += 1
            self._counts[identity] = self._counts.get(identity, 0) + 1
            req = Request(method, target, headers, self._n, self._counts[identity])
        entry = {"n": req.n, "method": method, "target": target, "path": req.path, "key": req.key,
                 "query": req.query, "headers": headers, "region": req.region, "attempt": req.attempt,
                 "range": headers.get("range"), "action": "forward", "status": None,
                 "body_sent": 0, "body_length": None}
        with self._lock:
            self.log.append(entry)
        action = self.rule(req)
        request_body = _body_chunks(client, headers)
        if isinstance(action, Reply):
            for _ in request_body:  # drain what the client sends, then answer
                pass
            entry.update(action="reply", status=action.status, body_length=len(action.body))
            _send_reply(sock, action, method, version)
            entry["body_sent"] = 0 if method == "HEAD" else len(action.body)
            return headers.get("connection", "").lower() != "close"
        return self._forward(sock, head, request_body, method, headers, action, entry)

    def _forward(self, sock, head, request_body, method, headers, action, entry):
        up = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
        with self._lock:
            self._socks.add(up)
        try:
            up.sendall(head)
            for data in request_body:
                up.sendall(data)
            upstream = _Stream(up)
            for _ in range(MAX_INTERIM):  # pass on interim 1xx answers, then the real one
                resp_head = upstream.read_head()
                status_line, _, resp_headers = _parse_head(resp_head)
                status = int(status_line.split(" ", 2)[1])
                if status >= 200 or status == 101:
                    break
                sock.sendall(resp_head)
            else:
                raise _Closed("too many interim answers")
            entry["status"] = status
            no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            framed = no_body or "content-length" in resp_headers or \
                "chunked" in resp_headers.get("transfer-encoding", "").lower()
            if framed:
                body = _body_chunks(upstream, resp_headers, no_body)
            else:  # delimited by the upstream closing
                body = _bounded(iter(lambda: upstream.read_until_eof(CHUNK), b""), MAX_BODY)
            length = None if no_body else int(resp_headers.get("content-length", "-1"))
            if isinstance(action, _Cut) and length == -1:  # chunked or up to EOF: measure it first
                raw = b"".join(_bounded(body, MAX_CUT_BODY))
                length, body = len(raw), iter([raw])
            entry["body_length"] = length
            if isinstance(action, _Cut) and length and length > 0:
                keep = action.bytes_to_send(length)
                entry["action"] = "%s@%d/%d" % (type(action).__name__.lower(), keep, length)
                sock.sendall(resp_head)
                sent = 0
                for data in body:
                    part = data[:keep - sent]
                    if part:
                        sock.sendall(part)
                        sent += len(part)
                    if sent >= keep:
                        break
                entry["body_sent"] = sent
                if isinstance(action, Reset):
                    time.sleep(RESET_PAUSE)
                    _reset(sock)
                else:
                    with _suppress_os():
                        sock.shutdown(socket.SHUT_RDWR)
                return False
            sock.sendall(resp_head)
            sent = 0
            for data in body:
                sock.sendall(data)
                sent += len(data)
            entry["body_sent"] = sent
            if not framed:
                return False
            close = "close" in (resp_headers.get("connection", "").lower(),
                                headers.get("connection", "").lower())
            return not close
        finally:
            with self._lock:
                self._socks.discard(up)
            _close_quietly(up)


def _send_reply(sock, reply, method, version):
    headers = dict(reply.headers)
    headers.setdefault("Content-Length", str(len(reply.body)))
    headers.setdefault("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()))
    headers.setdefault("Server", "faultproxy")
    lines = ["HTTP/1.1 %d %s" % (reply.status, reply.reason)]
    lines += ["%s: %s" % kv for kv in headers.items()]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if method != "HEAD":
        data += reply.body
    sock.sendall(data)


def _reset(sock):
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    with _suppress_os():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close_quietly(sock)


class _suppress_os:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def _close_quietly(sock):
    if sock is not None:
        with _suppress_os():
            sock.close()
