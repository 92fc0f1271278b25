#!/usr/bin/env python3
"""dogestry: Docker images stored in S3 or a plain directory, no registry to run.

    dogestry push STORE IMAGE[:TAG]     store an image (layers are shared and never sent twice)
    dogestry pull STORE IMAGE[:TAG]     load it into a Docker engine (only the layers it lacks)
    dogestry import/export/copy         the same without an engine: archives, store to store

Standard library only; Python 3.8 or newer.  The module reads top to bottom:

     1. Errors
     2. Small helpers: digests, sizes, image references
     3. Progress reporting
     4. Docker Engine API client
     5. Stores: the key/value seam (local directory)
     6. SigV4 signing
     7. AWS configuration and credentials
     8. S3 client and store
     9. Store layout: tags, images, layers
    10. Reading `docker save` streams
    11. Compression
    12. Push
    13. Pull
    14. Store lifecycle: gc, prune, stats
    15. Fleets: -pullhosts, the lock file and the config file
    16. The registry API: manifests (made from images, or pushed), tags, blobs, referrers
    17. The registry API: blob uploads
    18. Moving images without an engine: import, export, copy
    19. The accelerator server (-server)
    20. Commands
    21. Command line and main()
"""

from __future__ import annotations  # annotations stay unevaluated: they may name lazily imported modules' types

import argparse
import base64
import binascii
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import itertools
import json
import os
import posixpath
import random
import re
import signal
import stat
import sys
import threading
import time
import urllib.parse
import weakref
import zlib
from typing import (IO, TYPE_CHECKING, Any, BinaryIO, Callable, Dict, FrozenSet, Iterable, Iterator, List,
                    Mapping, NamedTuple, Optional, Protocol, Sequence, Set, Tuple, Type, Union, cast)

# Start-up time: the modules below load only where a command needs them (a function imports
# what it uses), so version, help, a usage error and list answer fast.  The type checker
# reads them here; tests/test_static.py checks that every other use imports them itself.
if TYPE_CHECKING:
    import concurrent.futures
    import datetime
    import http.client
    import http.server
    import socket
    import socketserver
    import ssl

    class _ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
        """The bases of DogestryServer."""

    _HTTPRequestHandler = http.server.BaseHTTPRequestHandler
else:  # http.server loads only for -server: http_server_class() puts the server classes on these bases
    _ThreadingHTTPServer = _HTTPRequestHandler = object

__version__ = "0.1.0"

# === 1. Errors ===


class DogestryError(Exception):
    """A failure that main() reports as one line and exit status 1."""

    exit_code = 1


class UsageError(DogestryError):
    """The command line itself is wrong (exit status 2)."""

    exit_code = 2
    usage = ""  # the usage line of the command (or of dogestry) that was misused, printed after the error


class DockerError(DogestryError):
    """The Docker engine refused a request (status: its HTTP status) or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class StoreError(DogestryError):
    """The store failed to read or write a key."""


class NotFound(StoreError):
    """A key, tag or image is not in the store."""


class IntegrityError(DogestryError):
    """Stored bytes do not match the digest that names them."""


class FormatError(DogestryError):
    """A `docker save` stream or a stored document is malformed."""


class Refused(DogestryError):
    """The server's policy does not allow what a client asked for."""


class GcError(DogestryError):
    """gc cannot go on safely (an unreadable image, a run longer than half the grace period)."""


class TagImmutable(DogestryError):
    """A write would move a tag made immutable (`dogestry protect --immutable`) to other content."""


class Interrupted(DogestryError):
    """The user or the system asked us to stop (Ctrl-C, SIGTERM)."""

    exit_code = 130


# === 2. Small helpers: digests, sizes, image references ===

CHUNK = 1 << 20
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    """'sha256:<hex>' of a byte string."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex part of 'sha256:<hex>', checked so it is safe inside a key or a path."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX64.match(hexpart):
        raise FormatError("not a sha256 digest: %r" % digest[:80])
    return hexpart


def human_size(n: float) -> str:
    """Bytes as docker prints them: 1.5kB, 12.3MB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return ("%d%s" if unit == "B" else "%.1f%s") % (n, unit)
        n /= 1000.0
    return "%dB" % n


def chain_ids(diff_ids: Sequence[str]) -> List[str]:
    """Docker's layer chain IDs: chain[0] = diff[0], chain[i] = sha256(chain[i-1] + ' ' + diff[i])."""
    chains = []  # type: List[str]
    for diff_id in diff_ids:
        if chains:
            diff_id = sha256_digest((chains[-1] + " " + diff_id).encode())
        chains.append(diff_id)
    return chains


# Docker's reference grammar (distribution/reference): a name is path components of
# lowercase alphanumerics joined by separators, optionally after a registry host[:port].
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_NAME_RE = re.compile(r"^(?:%s/)?%s(?:/%s)*$" % (_DOMAIN, _NAME_COMPONENT, _NAME_COMPONENT))
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ID_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{4,64})$")


class ImageRef(NamedTuple):
    """A repository name and tag, e.g. hipache:latest."""

    name: str
    tag: str

    def __str__(self) -> str:
        return "%s:%s" % (self.name, self.tag)


def parse_image_ref(text: str) -> ImageRef:
    """Parse NAME[:TAG]; a bare name means NAME:latest. Digests are not supported."""
    if "@" in text:
        raise UsageError("invalid reference %r: digests (@sha256:...) are not supported, use a tag" % text)
    name, tag = text, "latest"
    slash, colon = text.rfind("/"), text.rfind(":")
    if colon > slash:
        name, tag = text[:colon], text[colon + 1:]
        if not _TAG_RE.match(tag):
            raise UsageError("invalid tag %r in %r" % (tag, text))
    if len(name) > 255 or not _NAME_RE.match(name):
        raise UsageError("invalid image name %r: names are lowercase letters, digits and "
                         "separators (. _ -), components joined by /" % name)
    return ImageRef(name, tag)


def image_id_prefix(text: str) -> Optional[str]:
    """The hex of an image ID or ID prefix (4+ hex digits, 'sha256:' optional), else None."""
    m = _ID_RE.match(text)
    return m.group(1) if m else None


DOCKER_HUB = "docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


def split_registry(name: str) -> Tuple[str, List[str]]:
    """(registry host, path components) of a docker image name, the docker CLI's way.

    The first component is a registry host if it has a '.' or ':' or is 'localhost';
    otherwise the name is on Docker Hub, whose implicit 'library/' namespace is dropped:
    hipache and docker.io/library/hipache are both ('docker.io', ['hipache']).
    """
    parts = name.split("/")
    host = DOCKER_HUB
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host, parts = parts[0].lower(), parts[1:]
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
        if len(parts) > 1 and parts[0] == "library":
            parts = parts[1:]
    return host, parts


def quiet_worker() -> None:
    """In a thread dogestry starts: leave SIGINT and SIGTERM to the main thread.  A signal the
    kernel hands to a worker never wakes a main thread that waits on a lock, so Ctrl-C would
    wait for whatever the main thread waits for."""
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no pthread_sigmask: nothing to do
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def thread_pool(workers: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of `workers` quiet worker threads."""
    import concurrent.futures  # lazy (start-up time): only parallel work needs it
    return concurrent.futures.ThreadPoolExecutor(max(1, workers), name, initializer=quiet_worker)


def start_thread(target: Callable[..., None], args: Sequence[Any] = (), name: str = "dogestry") -> threading.Thread:
    """A quiet daemon thread running target(*args), started."""
    def run() -> None:
        quiet_worker()
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def run_in_threads(func: Callable[[Any], None], items: Sequence[Any], most: int = 16) -> None:
    """func(item) for every item, at most `most` at once, on daemon threads: a call that hangs
    (a frozen host) never keeps the process from ending, and Ctrl-C or SIGTERM reach the caller
    at once.  The first exception a call raised is raised here once all are done."""
    errors = []  # type: List[BaseException]
    slots = threading.Semaphore(max(1, most))

    def run(item: Any) -> None:
        with slots:
            try:
                func(item)
            except BaseException as e:  # raised in the caller's thread below
                errors.append(e)

    threads = [start_thread(run, (item,), "dogestry-host") for item in items]
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# Text that reaches a terminal or a log from elsewhere (servers, stores, clients) loses its
# control characters, so nobody can move the cursor, retitle the window or forge lines.
_CONTROL_CHARS = {c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7f, 0xa0))}


def printable(text: str) -> str:
    """text with every control character (C0, DEL, C1) shown as \\xNN."""
    return text.translate(_CONTROL_CHARS)


DOCUMENT_LIMIT = 4 << 20  # the largest JSON document (manifest, config, index entry) read or written


def parse_json(data: bytes, what: str, shape: Any = None) -> Any:
    """A JSON document from bytes we did not write ourselves: size- and depth-bounded, and of
    the given shape (check_shape), if one is given."""
    if len(data) > DOCUMENT_LIMIT:
        raise FormatError("%s is larger than %s" % (what, human_size(DOCUMENT_LIMIT)))
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError("%s is not valid JSON: %s" % (what, e))
    except RecursionError:
        raise FormatError("%s is nested too deeply" % what)
    return doc if shape is None else check_shape(doc, shape, what)


# Every document read from an archive or a store is checked against a shape where it is read,
# so the code past that point can rely on it.  A shape is written as the document looks:
#   str, int, bool                   a value of that JSON type (int: not true or false)
#   Check("a size", test)            a value test() accepts (SIZE, DIGEST, one_of(...))
#   [shape]                          a list of values of that shape
#   {"key": shape, "opt?": shape}    an object with that key (and maybe opt); "*": the shape
#                                    of every other key's value (without it: anything)
#   OrNull(shape)                    null, or that shape


class Check(NamedTuple):
    """A shape: the values test() accepts, described in errors as `expected`."""

    expected: str
    test: Callable[[Any], bool]


class OrNull(NamedTuple):
    """A shape: null, or a value of the shape."""

    shape: Any


SIZE = Check("a size (an integer >= 0)", lambda v: type(v) is int and v >= 0)
DIGEST = Check("a sha256 digest", lambda v: isinstance(v, str) and v[:7] == "sha256:" and bool(_HEX64.match(v[7:])))
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def one_of(*values: str) -> Check:
    """The shape of a string that is one of values."""
    return Check(" or ".join(values), lambda v: isinstance(v, str) and v in values)


def check_shape(doc: Any, shape: Any, what: str) -> Any:
    """doc, if it has the shape; else a FormatError naming what and where (JSON-path-like) it differs."""
    problem = _shape_problem(doc, shape, "")
    if problem is not None:
        where, complaint = problem
        raise FormatError("%s%s %s" % (what, ": " + where if where else "", complaint))
    return doc


def _shape_problem(value: Any, shape: Any, path: str) -> Optional[Tuple[str, str]]:
    """(where, what is wrong) of the first part of value that does not have the shape, else None."""
    if isinstance(shape, OrNull):
        return None if value is None else _shape_problem(value, shape.shape, path)
    if isinstance(shape, Check):
        return None if shape.test(value) else (path, "is not " + shape.expected)
    if isinstance(shape, list):
        if type(value) is not list:
            return path, "is not a list"
        for i, item in enumerate(value):
            problem = _shape_problem(item, shape[0], "%s[%d]" % (path, i))
            if problem is not None:
                return problem
        return None
    if isinstance(shape, dict):
        return _object_problem(value, shape, path)
    return None if type(value) is shape else (path, "is not " + _TYPE_NAMES[shape])


def _object_problem(value: Any, shape: Dict[str, Any], path: str) -> Optional[Tuple[str, str]]:
    if type(value) is not dict:
        return path, "is not an object"
    named = set()
    for key, item_shape in shape.items():
        name = key.rstrip("?")
        if key == "*":
            continue
        named.add(name)
        if name not in value:
            if key.endswith("?"):
                continue
            return _key_path(path, name), "is missing"
        problem = _shape_problem(value[name], item_shape, _key_path(path, name))
        if problem is not None:
            return problem
    if "*" in shape:
        for name, item in value.items():
            if name not in named:
                problem = _shape_problem(item, shape["*"], _key_path(path, name))
                if problem is not None:
                    return problem
    return None


def _key_path(path: str, key: str) -> str:
    """path.key, or path["key"] for a key that is no identifier (shown printable, at most 60 characters)."""
    if key.isidentifier():
        return "%s.%s" % (path, key) if path else key
    return "%s[%s]" % (path, printable(json.dumps(key[:60])))


class HashingReader:
    """Wraps a readable, hashing and counting what passes through, calling on_read(n)."""

    def __init__(self, raw: IO[bytes], on_read: Optional[Callable[[int], None]] = None):
        self.raw, self.sha, self.count, self.on_read = raw, hashlib.sha256(), 0, on_read

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        if self.on_read and data:
            self.on_read(len(data))
        return data

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class ByteSource(Protocol):
    """Anything read like a binary file: read(n) gives at most n bytes, b"" at the end."""

    def read(self, __n: int = -1) -> bytes: ...


class ByteSink(Protocol):
    """Anything written like a binary file."""

    def write(self, __data: bytes) -> int: ...


READ_AHEAD_PIECES = 8  # pieces of CHUNK a ReadAhead holds at most


class ReadAhead:
    """A stream read by a thread of its own, up to READ_AHEAD_PIECES pieces ahead of the reader.

    For sockets whose sender blocks as soon as a few hundred KB wait unread (docker save over
    a unix socket): they are drained while the reader hashes, compresses or writes.  An error
    of the stream is raised to the reader where the stream broke; close() stops the thread,
    which then closes the stream.
    """

    def __init__(self, source: Any, depth: int = READ_AHEAD_PIECES):
        import queue  # lazy (start-up time): only work in threads needs it
        self._queue = queue.Queue(depth)  # type: queue.Queue
        self._stop = threading.Event()
        self._piece, self._pos = b"", 0
        self._end = None  # type: Optional[BaseException]  # what the reader met last: EOFError at the end
        self._thread = start_thread(self._run, (source,), "dogestry-read")

    def _run(self, source: Any) -> None:
        try:
            while not self._stop.is_set():
                data = source.read(CHUNK)
                self._queue.put(data)
                if not data:
                    break
        except BaseException as e:  # handed to the reader
            self._queue.put(e)
        finally:
            with contextlib.suppress(Exception):
                source.close()

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (n < 0: to the end); fewer only at the end of the stream."""
        parts, want = [], (n if n >= 0 else 1 << 62)
        while want > 0:
            if self._pos == len(self._piece) and not self._next_piece():
                break
            if self._pos == 0 and len(self._piece) <= want:
                chunk = self._piece  # a whole piece: no copy
            else:
                chunk = self._piece[self._pos:self._pos + want]
            self._pos += len(chunk)
            want -= len(chunk)
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _next_piece(self) -> bool:
        if self._end is None:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._end = item
            elif not item:
                self._end = EOFError()
            else:
                self._piece, self._pos = item, 0
                return True
        if isinstance(self._end, EOFError):
            return False
        raise self._end

    def close(self) -> None:
        """Stop reading ahead; the thread closes the stream once its current read returns."""
        import queue  # lazy (start-up time): only work in threads needs it
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # room for the piece the thread may be putting, so it sees the stop
                self._queue.get_nowait()


class TransferReport:
    """What a push, pull, import or copy sent, for --json: each blob it wrote to the store (or a
    pull loaded into the engine) with its bytes, and the tag and multi-platform index it wrote."""

    def __init__(self) -> None:
        self.sent = {}  # type: Dict[str, int]  # blob digest -> bytes
        self.tag = None  # type: Optional[str]
        self.index = None  # type: Optional[str]  # the digest of the index the tag names, if it names one
        self.platform = None  # type: Optional[str]
        self.image_id = ""
        self.layers = []  # type: List[LayerRecord]
        self.chunks_sent = {}  # type: Dict[str, int]  # chunk key -> bytes written
        self.chunks_kept = 0  # chunks the store had already
        self._lock = threading.Lock()

    def add(self, digest: str, size: int) -> None:
        """Note a blob sent (threads may call this)."""
        with self._lock:
            self.sent[digest] = size

    def add_chunk(self, key: str, size: Optional[int]) -> None:
        """Note a chunk of a chunked layer written (size), or found stored (None)."""
        with self._lock:
            if size is None:
                self.chunks_kept += 1
            else:
                self.chunks_sent[key] = size

    def to_json(self, chunks: bool = True) -> Dict[str, Any]:
        """The image's part of a --json document (README: JSON output); chunks: with the counts of
        chunks written and found (a command that writes to stores)."""
        doc = {"image_id": self.image_id, "tag": self.tag, "index": self.index, "platform": self.platform,
               **layers_json(self.layers, self.sent)}  # type: Dict[str, Any]
        if chunks:
            doc["bytes_sent"] += sum(self.chunks_sent.values())
            doc["chunks_sent"], doc["chunks_skipped"] = len(self.chunks_sent), self.chunks_kept
        return doc


def layers_json(layers: Sequence["LayerRecord"], sent: Mapping[str, int]) -> Dict[str, Any]:
    """An image's layers for --json: digests, stored size, whether this command sent each, and the bytes."""
    return {"layers": [{"diff_id": r.diff_id, "digest": r.digest, "size": r.size, "sent": r.digest in sent}
                       for r in layers],
            "bytes_sent": sum(r.size for r in {r.digest: r for r in layers}.values() if r.digest in sent),
            "bytes_skipped": sum(r.size for r in {r.digest: r for r in layers}.values() if r.digest not in sent)}


# === 3. Progress reporting ===

ROW_LABEL = 12         # labels are padded to a short ID's 12 hex digits, so that rows line up
REDRAW_INTERVAL = 0.1  # the least time between redraws of a TTY's rows as bytes move
BAR_WIDTH = 30         # the widest bar: narrower when the terminal leaves less room


class TaskSink(Protocol):
    """One row of work being reported (one layer): bytes as they move, its steps, then a short status."""

    def advance(self, n: int) -> None: ...

    def rename(self, label: str) -> None: ...

    def phase(self, action: str, total: Optional[int], summary: Optional[str] = None) -> None: ...

    def finish(self, status: str = "done") -> None: ...


class ProgressSink(Protocol):
    """What push and pull report to: Progress on a terminal, a fleet host's HostProgress, or
    the server's JSON lines to a docker client."""

    def note(self, message: str) -> None: ...

    def task(self, label: str, action: str, total: Optional[int]) -> TaskSink: ...


def terminal_size(stream: Any) -> Tuple[int, int]:
    """(columns, lines) of the terminal stream writes to; (80, 24) if it has none."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 80, 24
    return size.columns or 80, size.lines or 24


class Progress:
    """Per-task progress on stderr: redrawn rows on a TTY (fitted to its width, which is read
    at every redraw so that rows follow a resize), plain lines otherwise, nothing with -q."""

    def __init__(self, stream: IO[str], quiet: bool = False, tty: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic,
                 size: Optional[Callable[[], Tuple[int, int]]] = None):
        self.stream, self.quiet, self.clock = stream, quiet, clock
        self.tty = (stream.isatty() if hasattr(stream, "isatty") else False) if tty is None else tty
        self.size = size or functools.partial(terminal_size, stream)
        self._lock = threading.Lock()
        self._tasks = []  # type: List[ProgressTask]  # the rows being redrawn, top to bottom
        self._drawn = 0
        self._last_draw = 0.0

    def note(self, message: str) -> None:
        """A plain status line (suppressed by -q)."""
        if self.quiet:
            return
        with self._lock:
            self._write_above(printable(message))

    def warn(self, message: str) -> None:
        """A line "dogestry: warning: ...", shown even with -q: it explains a wait (S3 retrying)
        that would otherwise look like a hang, and goes to stderr, never into a command's output."""
        with self._lock:
            self._write_above("dogestry: warning: " + printable(message))

    def task(self, label: str, action: str, total: Optional[int]) -> "ProgressTask":
        """Start tracking a transfer of `total` bytes: one row."""
        task = ProgressTask(self, printable(label), action, total)
        with self._lock:
            self._tasks.append(task)
            self._redraw(force=True)
        return task

    def _write_above(self, message: str) -> None:
        if self.tty and self._drawn:
            self.stream.write("\x1b[%dA\x1b[J" % self._drawn)
            self._drawn = 0
        self.stream.write(message + "\n")
        if self.tty:
            self._redraw(force=True)
        self.stream.flush()

    def _redraw(self, force: bool = False) -> None:
        """Draw the rows again in place (the caller holds the lock).  Every row is cut to the
        terminal's width, so that each takes one line and moving up len(rows) lines finds the
        first; finished rows above every unfinished one are left where they are, never drawn again."""
        if self.quiet or not self.tty:
            return
        now = self.clock()
        if not force and now - self._last_draw < REDRAW_INTERVAL:
            return
        self._last_draw = now
        columns, lines = self.size()
        width = max(columns - 1, 1)  # the last column left empty: some terminals wrap on it
        shown = self._tasks[-max(lines - 1, 1):]  # moving up more lines than the screen has fails
        out = ["\x1b[%dA" % self._drawn] if self._drawn else []
        out.extend("\x1b[2K" + task.render(now, width)[:width] + "\n" for task in shown)
        out.append("\x1b[J")  # lines a taller drawing left below
        hidden = len(self._tasks) - len(shown)
        settled = next((i for i, t in enumerate(self._tasks) if not t.done), len(self._tasks))
        self._tasks = self._tasks[settled:]
        self._drawn = len(shown) - max(settled - hidden, 0)
        self.stream.write("".join(out))
        self.stream.flush()

    def _finished(self, task: "ProgressTask", message: str) -> None:
        with self._lock:
            if self.quiet:
                return
            if self.tty:
                self._redraw(force=True)
            else:
                self.stream.write(message + "\n")
                self.stream.flush()


class ProgressTask:
    """One row: advance(n) as bytes move, phase() for its next step (the upload after the
    compression), rename() once its ID is known, finish() at the end, which freezes it."""

    def __init__(self, owner: Progress, label: str, action: str, total: Optional[int]):
        self.owner, self.label, self.summary = owner, label, ""
        self.done, self.ended = False, 0.0
        self._begin(action, total)

    def _begin(self, action: str, total: Optional[int]) -> None:
        self.action, self.status, self.total = action, action, total
        self.done_bytes, self.started = 0, self.owner.clock()

    def advance(self, n: int) -> None:
        """Count n more bytes (none once finished)."""
        with self.owner._lock:
            if self.done:
                return
            self.done_bytes += n
            self.owner._redraw()

    def rename(self, label: str) -> None:
        """Show the row under another label from now on (its layer's ID, once known)."""
        with self.owner._lock:
            self.label = printable(label)
            self.owner._redraw(force=True)

    def phase(self, action: str, total: Optional[int], summary: Optional[str] = None) -> None:
        """Start the row's next step: bytes and time count from zero again; summary (if given):
        what the earlier steps did, shown while the step has no bar and once finished."""
        with self.owner._lock:
            if self.done:
                return
            self._begin(printable(action), total)
            if summary is not None:
                self.summary = printable(summary)
            self.owner._redraw(force=True)

    def finish(self, status: str = "done") -> None:
        """Mark the task finished with a short status word; its row no longer changes."""
        with self.owner._lock:
            if self.done:
                return
            self.done, self.status, self.ended = True, printable(status), self.owner.clock()
            message = self.render(self.ended)
        self.owner._finished(self, message)

    def render(self, now: float, width: int = 80) -> str:
        """One row: label, status, then (bar,) bytes, rate and ETA while running, or what was
        done, how long the last step took and its rate, frozen, once finished."""
        elapsed = max((self.ended if self.done else now) - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        head = (self.label + ":").ljust(ROW_LABEL + 1) + " "
        if self.done:
            done = " " + self.summary if self.summary else ""
            if self.done_bytes:
                done += "%s in %.1fs (%s/s)" % ("" if self.summary else " " + human_size(self.done_bytes),
                                                elapsed, human_size(rate))
            return head + self.status + done
        head += "%-11s " % self.status
        if not self.total:
            return head + (self.summary if self.summary and not self.done_bytes else
                           "%s %s/s" % (human_size(self.done_bytes), human_size(rate)))
        eta = " ETA %ds" % ((self.total - self.done_bytes) / rate) if rate > 0 else ""
        tail = "%s/%s %s/s%s" % (human_size(self.done_bytes), human_size(self.total), human_size(rate), eta)
        room = min(width - len(head) - len(tail) - 3, BAR_WIDTH)  # 3: the brackets and a space
        if room < 10:
            return head + tail
        fill = int(min(self.done_bytes / self.total, 1.0) * room)
        return head + "[" + "=" * fill + (">" if fill < room else "") + " " * (room - 1 - fill) + "] " + tail


# === 4. Docker Engine API client ===

DOCKER_DEFAULT_SOCKET = "/var/run/docker.sock"
DOCKER_MIN_API = "1.24"
DOCKER_ERROR_LIMIT = 64 << 10     # the most of an error answer we read
DOCKER_ANSWER_LIMIT = 64 << 20    # the largest JSON answer (image lists of big hosts)
LOAD_BATCH = 64 << 20             # pulls load big images in several docker loads of at least this (section 13)
CLEANUP_TIMEOUT = 10.0            # the longest a clean-up request after a failure may take


def load_batch_setting(environ: Mapping[str, str]) -> int:
    """Bytes of layers per docker load: LOAD_BATCH, or DOGESTRY_LOAD_BATCH MiB (0: one load per image)."""
    text = environ.get("DOGESTRY_LOAD_BATCH", "")
    if not text:
        return LOAD_BATCH
    if not text.isdigit() or int(text) > 1 << 20:
        raise UsageError("DOGESTRY_LOAD_BATCH=%s is not a number of MiB (0 loads every image at once)" % text)
    return int(text) << 20


def chunked_body(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """A body in HTTP/1.1 chunked framing (RFC 9112 section 7.1), each piece sent as it is:
    http.client's own framing copies every piece to prepend its size line."""
    for piece in pieces:
        if piece:
            yield b"%X\r\n" % len(piece)
            yield piece
            yield b"\r\n"
    yield b"0\r\n\r\n"


def quick_ack(sock: Optional[socket.socket]) -> None:
    """Acknowledge the answer's first segment at once (Linux TCP_QUICKACK, which the kernel
    resets, hence before every answer): a server that leaves Nagle's algorithm on (radosgw)
    otherwise holds its body back for our delayed ACK, 40 ms on every small GET."""
    import socket  # lazy (start-up time): only commands that talk to a network need it
    if sock is not None and hasattr(socket, "TCP_QUICKACK") and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


@functools.lru_cache(maxsize=None)
def unix_http_connection() -> Type[http.client.HTTPConnection]:
    """The class of HTTP connections over an AF_UNIX socket (the Docker daemon's default endpoint)."""
    import http.client  # lazy (start-up time): only commands that talk HTTP need it
    import socket  # lazy (start-up time): only commands that talk to a network need it

    class UnixHTTPConnection(http.client.HTTPConnection):
        def __init__(self, path: str, timeout: Optional[float] = None):
            super().__init__("localhost", timeout=timeout)
            self.unix_path = path

        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.unix_path)
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixHTTPConnection


class DockerEndpoint(NamedTuple):
    """Where the Docker API lives: a unix socket path or a tcp host:port, maybe TLS."""

    url: str
    unix_path: Optional[str]
    host: Optional[str]
    port: Optional[int]
    tls: Optional[ssl.SSLContext]

    def connect(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        """A fresh, unconnected HTTP connection to this endpoint."""
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        if self.unix_path:
            return unix_http_connection()(self.unix_path, timeout=timeout)
        assert self.host is not None
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def docker_tls_context(environ: Mapping[str, str], home: str) -> Optional[ssl.SSLContext]:
    """TLS settings the docker CLI way: DOCKER_TLS_VERIFY / DOCKER_TLS and DOCKER_CERT_PATH."""
    import ssl  # lazy (start-up time): only TLS needs it
    verify = bool(environ.get("DOCKER_TLS_VERIFY"))
    if not verify and not environ.get("DOCKER_TLS"):
        return None
    cert_dir = environ.get("DOCKER_CERT_PATH") or os.path.join(home, ".docker")
    ca, cert, key = (os.path.join(cert_dir, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    if os.path.exists(cert) != os.path.exists(key):
        raise DockerError("TLS client files in %s: %s is there but %s is not"
                          % ((cert_dir,) + (("cert.pem", "key.pem") if os.path.exists(cert) else ("key.pem", "cert.pem"))))
    try:
        if verify:
            ctx = ssl.create_default_context(cafile=ca if os.path.exists(ca) else None)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    except (OSError, ssl.SSLError) as e:
        raise DockerError("cannot use %s: %s" % (ca, e))
    try:
        if os.path.exists(cert):
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise DockerError("cannot use the TLS client certificate %s with key %s: %s" % (cert, key, e))
    return ctx


def docker_endpoint(url: Optional[str], environ: Mapping[str, str], home: str) -> DockerEndpoint:
    """Parse a Docker host URL (unix://PATH, tcp://HOST[:PORT]); default DOCKER_HOST or the socket."""
    import ssl  # lazy (start-up time): only TLS needs it
    url = url or environ.get("DOCKER_HOST") or "unix://" + DOCKER_DEFAULT_SOCKET
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UsageError("invalid Docker host %r: expected unix:///path or tcp://host:port" % url)
    if scheme == "unix":
        if not rest.startswith("/"):
            raise UsageError("invalid Docker host %r: a unix socket needs an absolute path" % url)
        return DockerEndpoint(url, rest, None, None, None)
    if scheme in ("tcp", "http", "https"):
        tls = docker_tls_context(environ, home)
        if scheme == "https" and tls is None:
            tls = ssl.create_default_context()
        parsed = urllib.parse.urlsplit("//" + rest)
        try:
            port = parsed.port or (2376 if tls else 2375)
        except ValueError:
            raise UsageError("invalid Docker host %r: bad port" % url)
        if not parsed.hostname:
            raise UsageError("invalid Docker host %r: no host name" % url)
        return DockerEndpoint(url, None, parsed.hostname, port, tls)
    raise UsageError("unsupported Docker host scheme %r in %r (use unix:// or tcp://)" % (scheme, url))


def _docker_message(body: bytes) -> str:
    try:
        doc = json.loads(body.decode("utf-8", "replace"))
        return str(doc.get("message") or doc.get("cause") or doc)
    except (ValueError, AttributeError, RecursionError):
        return body.decode("utf-8", "replace").strip()[:300]


class DockerClient:
    """The parts of the Docker Engine API that dogestry needs, over http.client."""

    def __init__(self, endpoint: DockerEndpoint, timeout: float = 60.0, stream_timeout: Optional[float] = None,
                 load_batch: int = LOAD_BATCH):
        self.endpoint, self.timeout, self.stream_timeout = endpoint, timeout, stream_timeout
        self.load_batch = load_batch
        self._api_version = None  # type: Optional[str]
        self._partial_loads = None  # type: Optional[bool]
        self._local = threading.local()

    # -- transport --

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.timeout != timeout:
            conn = self.endpoint.connect(timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Close the calling thread's connection (if it has one)."""
        self._drop_connection()

    def _http10_connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        """A connection of its own that asks in HTTP/1.0: the engine then sends its answer
        unchunked, to the end of the connection.  (Go's net/http makes a chunk of each 32 KiB
        write, and http.client decodes chunks in Python: a fifth of a docker save's streaming time.)"""
        conn = self.endpoint.connect(timeout)
        conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
        return conn

    def request(self, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
                timeout: Optional[float] = -1.0, versioned: bool = True,
                http10: bool = False) -> http.client.HTTPResponse:
        """Send a request; return the response (status checked, body unread).  http10: for a
        long answer without a body sent, over a connection of its own (_http10_connection)."""
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        if versioned:
            path = "/v%s%s" % (self.api_version(), path)
        timeout = self.timeout if timeout == -1.0 else timeout
        headers = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body, headers["Transfer-Encoding"] = chunked_body(body), "chunked"
        conn = self._http10_connection(timeout) if http10 else self._connection(timeout)
        drop = conn.close if http10 else self._drop_connection
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
        except DogestryError:
            drop()
            raise
        except (OSError, http.client.HTTPException) as e:
            drop()
            raise DockerError("cannot talk to Docker at %s: %s" % (self.endpoint.url, _os_reason(e)))
        if resp.status >= 400:
            try:
                message = _docker_message(resp.read(DOCKER_ERROR_LIMIT))
            except (OSError, http.client.HTTPException) as e:
                message = "(the answer broke off: %s)" % _os_reason(e)
            if "HTTP request to an HTTPS server" in message:
                message += " (the daemon uses TLS: set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH)"
            drop()
            raise DockerError("docker %s %s: %s (HTTP %d)" % (method, path.split("?")[0], message, resp.status),
                              resp.status)
        return resp

    def json(self, method: str, path: str, timeout: Optional[float] = -1.0) -> Any:
        """A request whose answer is one JSON document (at most DOCKER_ANSWER_LIMIT bytes)."""
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        resp = self.request(method, path, timeout=timeout)
        try:
            data = resp.read(DOCKER_ANSWER_LIMIT + 1)
            if len(data) > DOCKER_ANSWER_LIMIT:
                raise ValueError("the answer is larger than %s" % human_size(DOCKER_ANSWER_LIMIT))
            return json.loads(data)
        except (ValueError, RecursionError, OSError, http.client.HTTPException) as e:
            self._drop_connection()
            raise DockerError("bad answer from Docker at %s to %s %s: %s"
                              % (self.endpoint.url, method, path.split("?")[0], _os_reason(e)))

    # -- API --

    def api_version(self) -> str:
        """The API version to speak, negotiated once from GET /_ping; DockerError if what
        answers is not a Docker engine (a Docker engine, podman's service and a dogestry
        server answer "OK", Docker since 1.13 and podman with an Api-Version header too)."""
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        if self._api_version is None:
            try:
                resp = self.request("GET", "/_ping", timeout=min(self.timeout, 10.0), versioned=False)
                body = resp.read(DOCKER_ERROR_LIMIT)
            except DockerError as e:
                if e.status == 0 or "HTTP request to an HTTPS server" in str(e):
                    raise
                raise self._not_docker("HTTP %d" % e.status)
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                raise DockerError("cannot talk to Docker at %s: %s" % (self.endpoint.url, _os_reason(e)))
            version = resp.getheader("Api-Version")
            if not version and body.strip() != b"OK":
                kind = resp.getheader("Content-Type") or "no Content-Type"
                raise self._not_docker("HTTP %d, %s" % (resp.status, kind.split(";")[0]))
            self._api_version = version or DOCKER_MIN_API
        return self._api_version

    def _not_docker(self, answer: str) -> DockerError:
        """The error for an endpoint that is not a Docker engine (status 0: no request of ours reached one)."""
        self._drop_connection()
        return DockerError("%s is not a Docker engine: GET /_ping answered %s, where an engine answers OK"
                           % (self.endpoint.url, answer))

    def version(self) -> Dict[str, Any]:
        """GET /version."""
        return self.json("GET", "/version")

    def platform(self) -> "Platform":
        """The engine's platform: GET /version's Os and Arch (Go's names); for 32-bit arm, the
        variant from GET /info's Architecture (uname's armv7l)."""
        return engine_platform(self.version(), lambda: self.json("GET", "/info"))

    def takes_partial_loads(self) -> bool:
        """Whether a load may leave out layers the engine has (and so come in batches): Docker's
        own layer store takes them by chain ID; podman (its Docker API calls itself "Podman
        Engine") and Docker's containerd image store look for every layer in the tar."""
        if self._partial_loads is None:
            version = self.version()
            components = version.get("Components") if isinstance(version, dict) else None
            docker = isinstance(components, list) and any(
                isinstance(c, dict) and c.get("Name") == "Engine" for c in components)
            self._partial_loads = docker and not uses_containerd_store(self.json("GET", "/info"))
        return self._partial_loads

    def remove_image(self, image_id: str, timeout: Optional[float] = -1.0) -> bool:
        """DELETE /images/{id} of an untagged image; False if the engine has no such image."""
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        try:
            self.request("DELETE", "/images/%s" % urllib.parse.quote(image_id, safe=":"), timeout=timeout).read()
        except DockerError as e:
            if e.status == 404:
                return False
            raise
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection()
            raise DockerError("cannot talk to Docker at %s: %s" % (self.endpoint.url, _os_reason(e)))
        return True

    def inspect_image(self, ref: str) -> Optional[Dict[str, Any]]:
        """GET /images/{ref}/json, or None when the engine has no such image."""
        try:
            info = self.json("GET", "/images/%s/json" % urllib.parse.quote(ref, safe="/:@"))
        except DockerError as e:
            if e.status == 404:
                return None
            raise
        if not isinstance(info, dict) or not isinstance(info.get("Id"), str):
            raise DockerError("bad answer from Docker at %s: no image Id for %s" % (self.endpoint.url, ref))
        return info

    def list_images(self, label: Optional[str] = None) -> List[Dict[str, Any]]:
        """GET /images/json?all=1: every image, or those with a label (KEY or KEY=VALUE)."""
        query = "" if label is None else "&filters=" + urllib.parse.quote(json.dumps({"label": [label]}))
        images = self.json("GET", "/images/json?all=1" + query)
        if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("Id"), str)
                                                   for i in images):
            raise DockerError("bad answer from Docker at %s: the image list is not a list of images"
                              % self.endpoint.url)
        return images

    def layer_chains(self) -> Set[str]:
        """The chain IDs of every layer the engine has (from all its images' RootFS)."""
        chains = set()  # type: Set[str]
        for summary in self.list_images():
            info = self.inspect_image(summary["Id"])
            if info:
                chains.update(chain_ids(image_diff_ids(info)))
        return chains

    def save(self, image_id: str) -> ReadAhead:
        """GET /images/get: the `docker save` tar stream of one image, read ahead (close it)."""
        return ReadAhead(self.request("GET", "/images/get?names=" + urllib.parse.quote(image_id), timeout=None,
                                      http10=True))

    def load(self, body: Iterable[bytes]) -> str:
        """POST /images/load with a streamed tar; return what the engine said it loaded."""
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        resp = self.request("POST", "/images/load?quiet=1", body=body, timeout=self.stream_timeout,
                            headers={"Content-Type": "application/x-tar"})
        messages = []
        try:
            for line in resp.read(DOCKER_ANSWER_LIMIT).decode("utf-8", "replace").splitlines():
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except (ValueError, RecursionError):
                    doc = None
                if not isinstance(doc, dict):
                    messages.append(line.strip()[:300])
                    continue
                if doc.get("errorDetail") or doc.get("error"):
                    err = (doc.get("errorDetail") or {}).get("message") or doc.get("error")
                    raise DockerError("docker load failed: %s" % err)
                if doc.get("stream"):
                    messages.append(doc["stream"].strip())
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection()
            raise DockerError("docker load failed: %s" % e)
        return "; ".join(m for m in messages if m)

    def tag(self, image_id: str, ref: ImageRef) -> None:
        """POST /images/{id}/tag."""
        query = urllib.parse.urlencode({"repo": ref.name, "tag": ref.tag})
        self.request("POST", "/images/%s/tag?%s" % (image_id, query)).read()


def engine_platform(version: Any, info: Callable[[], Any]) -> "Platform":
    """The platform of an engine from its GET /version answer (and GET /info's, asked only for arm)."""
    fields = version if isinstance(version, dict) else {}
    os_name, arch = fields.get("Os"), fields.get("Arch")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        raise DockerError("the engine's GET /version names no Os and Arch: its platform is unknown (use --platform)")
    platform = make_platform(os_name, arch)
    if platform.architecture == "arm" and not platform.variant:
        answer = info()
        machine = answer.get("Architecture") if isinstance(answer, dict) else None
        if isinstance(machine, str):
            platform = platform._replace(variant=make_platform(os_name, machine).variant)
    return platform


def uses_containerd_store(info: Any) -> bool:
    """Whether GET /info describes Docker's containerd image store (driver-type
    io.containerd.snapshotter.v1 in DriverStatus) rather than its own layer store."""
    status = info.get("DriverStatus") if isinstance(info, dict) else None
    return isinstance(status, list) and any(
        isinstance(pair, list) and len(pair) == 2 and pair[0] == "driver-type"
        and str(pair[1]).startswith("io.containerd.snapshotter") for pair in status)


def image_diff_ids(info: Mapping[str, Any]) -> List[str]:
    """The layer diffIDs in an engine's image inspect answer (RootFS.Layers), checked."""
    rootfs = info.get("RootFS")
    layers = (rootfs.get("Layers") if isinstance(rootfs, dict) else None) or []
    if not isinstance(layers, list) or not all(isinstance(d, str) for d in layers):
        raise DockerError("bad answer from Docker: RootFS.Layers of %s is not a list of digests" % info.get("Id"))
    return list(layers)


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


# === 5. Stores: the key/value seam (local directory) ===
#
# A store is a flat namespace of '/'-separated keys holding immutable bytes.  Every
# store offers the same five verbs, streaming, so push and pull never care whether the
# bytes live in a directory or (later) in an S3 bucket.

_KEY_COMPONENT = re.compile(r"^[^/\x00]+$")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store: empty, absolute, '.' or '..' components."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or not _KEY_COMPONENT.match(p) for p in parts):
        raise StoreError("refusing unsafe store key %r" % key)
    return key


class StoreEntry(NamedTuple):
    """A key as a listing shows it: its size, seconds since it was last written, and (S3) its
    ETag, the MD5 of its bytes for objects written in one PUT."""

    key: str
    size: int
    age: float
    etag: Optional[str] = None


class Store:
    """The store interface: stat/open/put/list/delete of keys (subclasses implement it)."""

    url = ""
    keeps_files = False  # True: put_file(consume=True) moves the file in (write it with write_through)

    def stat(self, key: str) -> Optional[int]:
        """Size of the object at key, or None if absent."""
        raise NotImplementedError

    def open(self, key: str, size: Optional[int] = None) -> BinaryIO:
        """A readable stream of the object's bytes (NotFound if absent); size, if known, helps."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        """Store a small object, atomically (if_absent: keep an object already there)."""
        raise NotImplementedError

    def put_file(self, key: str, path: str, size: int, digest: Optional[str] = None,
                 on_progress: Callable[[int], None] = lambda n: None, if_absent: bool = False,
                 consume: bool = False) -> bool:
        """Store a file's `size` bytes (sha256 `digest` if known), atomically; False if if_absent
        found the object there already (nothing was written).

        consume=True lets the store take the file itself (a rename) instead of a copy.
        """
        raise NotImplementedError

    def spool_dir(self) -> Optional[str]:
        """Where temp files are best kept for this store (None: the system's temp dir)."""
        return None

    def open_range(self, key: str, first: int, last: int) -> BinaryIO:
        """A readable stream of bytes first..last of an object (S3 stores; a directory store is sent with sendfile)."""
        raise NotImplementedError

    def cancel(self, interrupted: bool = False) -> None:
        """Stop work in progress at once (a failed push, or an interrupt): later requests fail."""

    def bucket_root(self) -> Optional["Store"]:
        """The same bucket without a prefix, for an S3 store with one (else None)."""
        return None

    def list(self, prefix: str) -> Iterator[str]:
        """Every key starting with prefix, in sorted order."""
        raise NotImplementedError

    def list_sizes(self, prefix: str) -> Iterator[Tuple[str, int]]:
        """(key, size) of every key starting with prefix (stores that list sizes override this)."""
        for key in self.list(prefix):
            yield key, self.stat(key) or 0

    def delete(self, key: str) -> None:
        """Remove key (no error if absent)."""
        raise NotImplementedError

    def list_entries(self, prefix: str) -> Iterator["StoreEntry"]:
        """Every key starting with prefix, with its size and age, in sorted order (gc, prune)."""
        raise NotImplementedError

    def age(self, key: str) -> Optional[float]:
        """Seconds since key was last written, on the store's own clock (None if absent)."""
        raise NotImplementedError

    def touch(self, key: str) -> bool:
        """Make key count as just written, its bytes unchanged (False if absent)."""
        raise NotImplementedError

    def sweep_leftovers(self, older_than: float, ours: Callable[[str], bool]) -> int:
        """Remove what killed writers left behind (temp files, multipart uploads) older than that
        many seconds, where ours(key) says the key (or the temp file's path) is the caller's to
        clean; return how many."""
        return 0

    def delete_many(self, keys: Sequence[str], racing_writes_win: bool = False) -> None:
        """Remove several keys (racing_writes_win: a key whose delete fails because a write of it
        raced the delete is left as that write made it, instead of deleted again)."""
        for key in keys:
            self.delete(key)

    def kind(self) -> str:
        """What sort of store this is, for people."""
        return type(self).__name__

    def stores_below(self, looks: int) -> Tuple[List[str], int]:
        """The names (`team/`) of stores right below this one, among the first `looks` directories
        or prefixes here, and how many there are in all (bounded work: for hints only)."""
        return [], 0

    def ensure(self) -> None:
        """Create the store if it can be (a missing directory), before writing."""

    def check(self) -> None:
        """Raise NotFound unless the store exists."""

    # Compare-and-swap: writes that depend on what a key held (a tag that hosts add platforms to).

    def read_versioned(self, key: str) -> Tuple[bytes, str]:
        """A small object's content and its version, which changes whenever the content does
        (NotFound if absent)."""
        raise self.cannot_swap()

    def put_if_version(self, key: str, data: bytes, version: Optional[str]) -> bool:
        """Store a small object, atomically, only if key still holds that version (None: only if
        it is absent); False if not (read it again and retry)."""
        raise self.cannot_swap()

    def delete_if_version(self, key: str, version: str) -> bool:
        """Remove key only if it still holds that version; False if not."""
        raise self.cannot_swap()

    def cannot_swap(self) -> "CannotSwap":
        """The error of a store that cannot write a key only if it is unchanged."""
        return CannotSwap("%s cannot write a key only if it is unchanged (compare-and-swap), so updates of a "
                          "tag by several hosts at once could be lost; nothing was written" % self.url)

    # Conveniences built on the five verbs.

    def get_bytes(self, key: str, limit: int = 64 << 20) -> bytes:
        """A small object's whole content."""
        with contextlib.closing(self.open(key)) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StoreError("%s: %s is larger than %s" % (self.url, key, human_size(limit)))
        return data


SWAP_ATTEMPTS = 12      # reads and conditional writes a compare-and-swap tries before it gives up
SWAP_BACKOFF = 0.05     # seconds: the first backoff between them (doubling, jittered, at most SWAP_BACKOFF_MAX)
SWAP_BACKOFF_MAX = 2.0


class SwapConflict(StoreError):
    """A key kept changing while a compare-and-swap tried to update it."""


class CannotSwap(StoreError):
    """The store cannot write a key only if it is unchanged (an S3 store without conditional writes)."""


def swap_versioned(store: Store, key: str, change: Callable[[Optional[bytes]], Optional[bytes]], what: str,
                   sleep: Callable[[float], None] = time.sleep, rand: Callable[[], float] = random.random,
                   attempts: int = SWAP_ATTEMPTS, write_same: bool = False) -> Optional[bytes]:
    """Replace what key holds (None: absent) with change(it) (None: remove the key), unless another
    writer changes it in between: then read it afresh and apply change again, after a jittered
    backoff, up to `attempts` times (SwapConflict after).  change runs once per attempt: it may
    store what its result names (idempotent writes); a result equal to what is there is written
    only if write_same (a tag's age is its push time).  Return what key holds afterwards."""
    for attempt in range(attempts):
        if attempt:
            sleep(rand() * min(SWAP_BACKOFF_MAX, SWAP_BACKOFF * 2 ** (attempt - 1)))
        try:
            current, version = store.read_versioned(key)  # type: Tuple[Optional[bytes], Optional[str]]
        except NotFound:
            current, version = None, None
        new = change(current)
        if new == current and not (write_same and new is not None):
            return current
        if new is None:
            if store.delete_if_version(key, str(version)):
                return None
        elif store.put_if_version(key, new, version):
            return new
    raise SwapConflict("%s: %s changed under every one of %d attempts to update it (other hosts writing it at the "
                       "same time); nothing was changed: run the command again" % (store.url, what, attempts))


# Work dirs: where push and fleet pulls spool layers (a directory store's own root, or $TMPDIR).
WORK_PREFIX = ".tmp-dogestry-"
WORK_LOCK = ".tmp-dogestry.lock"  # inside a work dir, flock'ed by its run for as long as it lives
ABANDONED_UNLOCKED_AGE = 24 * 3600


@contextlib.contextmanager
def work_directory(tempdir: Optional[str]) -> Iterator[str]:
    """A private temp dir under -tempdir, always removed afterwards (by the next run if we are killed)."""
    import shutil  # lazy (start-up time): only work directories need it
    import tempfile  # lazy (start-up time): only writes and work directories need it
    base = tempdir or tempfile.gettempdir()
    try:
        path = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=base)
        lock = open(os.path.join(path, WORK_LOCK + ".new"), "wb")
    except OSError as e:
        raise DogestryError("cannot create a temp dir in %s: %s" % (base, _os_reason(e)))
    try:
        # Lock first, then give the lock its name: a sweeper never sees a named, unlocked lock
        # of a live run.  The kernel drops the lock when the process dies, even by SIGKILL.
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        os.rename(lock.name, os.path.join(path, WORK_LOCK))
        remove_abandoned_work_dirs(base)
        yield path
    finally:
        lock.close()
        shutil.rmtree(path, ignore_errors=True)


def remove_abandoned_work_dirs(base: str) -> None:
    """Remove the temp dirs that killed runs left in BASE: their lock is free (or, from older
    versions, missing for a day)."""
    import shutil  # lazy (start-up time): only work directories need it
    try:
        names = [n for n in os.listdir(base) if n.startswith(WORK_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            fd = os.open(os.path.join(path, WORK_LOCK), os.O_RDONLY)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(path).st_mtime > ABANDONED_UNLOCKED_AGE:
                    shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue  # someone else's
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # locked: its run is alive
        finally:
            os.close(fd)


class LocalStore(Store):
    """A store in a directory: key 'a/b' is the file ROOT/a/b, written via rename."""

    keeps_files = True

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def path(self, key: str) -> str:
        """The file that holds key."""
        return self._path(key)

    def kind(self) -> str:
        return "local directory"

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise NotFound("store %s does not exist (or is not a directory)" % self.root)

    def ensure(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError("cannot create store directory %s: %s" % (self.root, _os_reason(e)))

    def _stat_file(self, key: str) -> Optional[os.stat_result]:
        """The file's stat, or None if there is no file (or a directory) at key."""
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise StoreError("%s: cannot read %s: %s" % (self.url, key, _os_reason(e)))
        return None if stat.S_ISDIR(st.st_mode) else st

    def stat(self, key: str) -> Optional[int]:
        st = self._stat_file(key)
        return None if st is None else st.st_size

    def open(self, key: str, size: Optional[int] = None) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound("%s: no %s in the store" % (self.url, key))
        except OSError as e:
            raise StoreError("%s: cannot read %s: %s" % (self.url, key, _os_reason(e)))

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        if not (if_absent and self.stat(key) is not None):
            self._put(key, lambda out: out.write(data), len(data))

    def put_file(self, key: str, path: str, size: int, digest: Optional[str] = None,
                 on_progress: Callable[[int], None] = lambda n: None, if_absent: bool = False,
                 consume: bool = False) -> bool:
        if if_absent and self.stat(key) == size:
            return False
        if consume and os.path.getsize(path) == size and self._move_into_place(key, path):
            on_progress(size)
            return True
        with open(path, "rb") as f:
            self._put(key, lambda out: copy_stream(HashingReader(f, on_progress), WriteThrough(out), size),  # type: ignore
                      size)
        return True

    def spool_dir(self) -> Optional[str]:
        return self.root if os.path.isdir(self.root) else None

    def _move_into_place(self, key: str, path: str) -> bool:
        """Rename a finished temp file into the store (same filesystem only); False to copy instead."""
        target = self._path(key)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(path, 0o644)
            os.rename(path, target)
        except OSError as e:
            if e.errno == errno.EXDEV:
                return False
            raise StoreError("%s: cannot write %s: %s" % (self.url, key, _os_reason(e)))
        return True

    def _put(self, key: str, write: Callable[[BinaryIO], int], size: int) -> None:
        """Write a key's file via a temp file: write(out) writes its bytes and says how many."""
        import tempfile  # lazy (start-up time): only writes and work directories need it
        path = self._path(key)
        tmp = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as out:
                copied = write(out)
                out.flush()
                os.fsync(out.fileno())
            if copied != size:
                raise StoreError("%s: short write of %s (%d of %d bytes)" % (self.url, key, copied, size))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            raise StoreError("%s: cannot write %s: %s" % (self.url, key, _os_reason(e)))
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root
        keys = []  # type: List[str]
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirnames[:] = [d for d in dirnames if not d.startswith(".tmp-") and (
                (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/"))]
            keys.extend(rel + f for f in filenames if not f.startswith(".tmp-") and (rel + f).startswith(prefix))
        return iter(sorted(keys))

    def list_entries(self, prefix: str) -> Iterator[StoreEntry]:
        now = time.time()
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted since it was listed
                st = os.stat(self._path(key))
                yield StoreEntry(key, st.st_size, now - st.st_mtime)

    def age(self, key: str) -> Optional[float]:
        st = self._stat_file(key)
        return None if st is None else time.time() - st.st_mtime

    def touch(self, key: str) -> bool:
        try:
            os.utime(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise StoreError("%s: cannot write %s: %s" % (self.url, key, _os_reason(e)))
        return True

    def sweep_leftovers(self, older_than: float, ours: Callable[[str], bool]) -> int:
        """Temp files of writes that never finished (in the caller's directories), and work dirs of
        killed pushes."""
        removed, now = 0, time.time()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if not rel:
                work_dirs = [d for d in dirnames if d.startswith(WORK_PREFIX)]
                dirnames[:] = [d for d in dirnames if not d.startswith(".tmp-")]
                remove_abandoned_work_dirs(self.root)
                removed += sum(1 for d in work_dirs if not os.path.exists(os.path.join(self.root, d)))
            for name in filenames:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if name.startswith(".tmp-") and ours(rel + name) and now - os.stat(path).st_mtime > older_than:
                        os.unlink(path)
                        removed += 1
        return removed

    def stores_below(self, looks: int) -> Tuple[List[str], int]:
        try:
            names = sorted(n for n in os.listdir(self.root) if not n.startswith(".tmp-")
                           and os.path.isdir(os.path.join(self.root, n)))
        except OSError:
            return [], 0
        found = [n + "/" for n in names[:looks] if os.path.isdir(os.path.join(self.root, n, "repositories"))]
        return found, len(names)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError("%s: cannot delete %s: %s" % (self.url, key, _os_reason(e)))
        self._prune_dirs(os.path.dirname(path))

    def _prune_dirs(self, path: str) -> None:
        while path.startswith(self.root + os.sep):
            try:
                os.rmdir(path)
            except OSError:
                return
            path = os.path.dirname(path)

    # Compare-and-swap: the key's directory is flock'ed (no lock file appears among the keys)
    # while its file is compared and replaced; its version is the sha256 of its bytes.

    def read_versioned(self, key: str) -> Tuple[bytes, str]:
        data = self.get_bytes(key, limit=DOCUMENT_LIMIT)
        return data, hashlib.sha256(data).hexdigest()

    def put_if_version(self, key: str, data: bytes, version: Optional[str]) -> bool:
        return self._swap(key, version, data)

    def delete_if_version(self, key: str, version: str) -> bool:
        if not self._swap(key, version, None):
            return False
        self._prune_dirs(os.path.dirname(self._path(key)))
        return True

    def _swap(self, key: str, version: Optional[str], data: Optional[bytes]) -> bool:
        """Write data to key (None: remove it) if it holds that version, under the directory's lock."""
        directory, name = os.path.split(self._path(key))
        for _ in range(100):
            try:
                with self._locked_directory(directory) as dir_fd:
                    if self._version_at(dir_fd, name) != version:
                        return False
                    if data is None:
                        os.unlink(name, dir_fd=dir_fd)
                    else:
                        self._replace_at(dir_fd, name, data)
                    return True
            except FileNotFoundError:
                continue  # the directory was removed (rm of its last key) or the key was: look again
            except OSError as e:
                raise StoreError("%s: cannot write %s: %s" % (self.url, key, _os_reason(e)))
        raise StoreError("%s: cannot write %s: its directory keeps disappearing" % (self.url, key))

    @contextlib.contextmanager
    def _locked_directory(self, directory: str) -> Iterator[int]:
        """The directory (made if need be), open and flock'ed; FileNotFoundError if it was removed
        meanwhile (a file made in a removed directory would be lost)."""
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not os.path.samestat(os.fstat(fd), os.stat(directory)):
                raise FileNotFoundError(errno.ENOENT, "replaced while it was locked", directory)
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _version_at(dir_fd: int, name: str) -> Optional[str]:
        """The version of a file in an open directory (None if absent)."""
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            return hashlib.sha256(f.read(DOCUMENT_LIMIT + 1)).hexdigest()

    @staticmethod
    def _replace_at(dir_fd: int, name: str, data: bytes) -> None:
        """Write a file in an open directory via a temp file and a rename (FileNotFoundError if
        the directory was removed)."""
        tmp = ".tmp-%s-%s" % (name[:100], binascii.hexlify(os.urandom(8)).decode())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o644)
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise


def copy_stream(src: ByteSource, dst: ByteSink, limit: Optional[int] = None,
                abort: Optional[threading.Event] = None) -> int:
    """Copy up to `limit` bytes (all if None) in CHUNK pieces; return the count."""
    copied = 0
    while limit is None or copied < limit:
        if abort is not None and abort.is_set():
            raise Interrupted("stopped")
        data = src.read(CHUNK if limit is None else min(CHUNK, limit - copied))
        if not data:
            break
        dst.write(data)
        copied += len(data)
    return copied


WRITE_THROUGH_WINDOW = 8 << 20


class WriteThrough:
    """Writes to a file that is made durable anyway (a directory store fsyncs what it names):
    every WRITE_THROUGH_WINDOW bytes go to disk and leave the page cache.

    The final fsync then has little left to write, and the next window reuses the pages just
    dropped instead of taking fresh ones (on a VM that reports free memory to its host, each
    fresh page costs a fault in the host: writing 512 MiB took 2-3x longer that way here).
    """

    def __init__(self, file: IO[bytes]):
        self.file, self.pending = file, 0

    def write(self, data: bytes) -> int:
        n = self.file.write(data)
        self.pending += n
        if self.pending >= WRITE_THROUGH_WINDOW:
            self.pending = 0
            self.file.flush()
            fd = self.file.fileno()
            getattr(os, "fdatasync", os.fsync)(fd)
            if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the pages just stay cached
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return n


class OutputFile:
    """A file being written: an OSError (a full disk, say) becomes one clear DogestryError.
    write_through: the file is bound for a directory store (see WriteThrough)."""

    def __init__(self, path: str, write_through: bool = False):
        self.path = path
        try:
            self.file = self._open(path)
        except OSError as e:
            raise self._error(e)
        self._sink = WriteThrough(self.file) if write_through else self.file  # type: ByteSink

    def _open(self, path: str) -> IO[bytes]:
        return open(path, "wb")

    def _error(self, e: OSError) -> DogestryError:
        return DogestryError("cannot write %s: %s" % (self.path, _os_reason(e)))

    def write(self, data: bytes) -> int:
        try:
            return self._sink.write(data)
        except OSError as e:
            raise self._error(e)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            raise self._error(e)

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            with contextlib.suppress(OSError):
                self.file.close()


# === 6. SigV4 signing ===
#
# AWS Signature Version 4, as pure functions of (request, credentials, region, time).
# Paths are passed unencoded; S3 encodes them once and keeps '//' and dot segments,
# other services (STS) normalise and encode twice (AWS General Reference, "Create a
# canonical request for Signature Version 4").

SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEADER_SPACE = re.compile(r"[ \t\r\n]+")


class Credentials(NamedTuple):
    """AWS credentials; token for temporary ones, expires as a Unix time (None: never)."""

    access_key: str
    secret_key: str
    token: Optional[str] = None
    expires: Optional[float] = None
    source: str = ""


def uri_encode(text: str, safe: str = "") -> str:
    """Percent-encode UTF-8 bytes the AWS way: keep A-Za-z0-9-._~ (and safe), %XX the rest."""
    keep = _UNRESERVED.union(safe.encode("ascii"))
    return "".join(chr(b) if b in keep else "%%%02X" % b for b in text.encode("utf-8"))


def amz_date(now: datetime.datetime) -> str:
    """The X-Amz-Date form of a time (naive times are taken as UTC)."""
    import datetime  # lazy (start-up time): only dated documents and signatures need it
    if now.tzinfo is not None:
        now = now.astimezone(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def _pairs(items: Any) -> List[Tuple[str, Any]]:
    if items is None:
        return []
    return list(items.items()) if hasattr(items, "items") else list(items)


def remove_dot_segments(path: str) -> str:
    """Normalise a path: drop empty and '.' segments, resolve '..' (generic services only)."""
    out = []  # type: List[str]
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    result = "/" + "/".join(out)
    return result + "/" if path.endswith("/") and result != "/" else result


def canonical_uri(path: str, normalize: bool = False, double_encode: bool = False) -> str:
    """The canonical URI of an unencoded path."""
    path = path or "/"
    if normalize:
        path = remove_dot_segments(path)
    encoded = uri_encode(path, safe="/")
    return uri_encode(encoded, safe="/") if double_encode else encoded


def canonical_query(query: Any) -> str:
    """Sorted, encoded key=value pairs ('key=' for empty values)."""
    encoded = sorted((uri_encode(str(k)), uri_encode("" if v is None else str(v))) for k, v in _pairs(query))
    return "&".join("%s=%s" % pair for pair in encoded)


def canonical_headers(headers: Any) -> Tuple[str, str]:
    """(canonical header block, signed header names): lowercased, trimmed, repeats joined by ','."""
    merged = {}  # type: Dict[str, List[str]]
    for name, value in _pairs(headers):
        values = value if isinstance(value, (list, tuple)) else [value]
        merged.setdefault(name.strip().lower(), []).extend(
            _HEADER_SPACE.sub(" ", str(v)).strip(" ") for v in values)
    names = sorted(merged)
    return "".join("%s:%s\n" % (n, ",".join(merged[n])) for n in names), ";".join(names)


def canonical_request(method: str, path: str, query: Any, headers: Any, payload_hash: str,
                      normalize: bool = False, double_encode: bool = False) -> str:
    """The SigV4 canonical request (headers are exactly the signed ones)."""
    block, signed = canonical_headers(headers)
    return "\n".join([method.upper(), canonical_uri(path, normalize, double_encode),
                      canonical_query(query), block, signed, payload_hash])


def credential_scope(timestamp: str, region: str, service: str) -> str:
    return "%s/%s/%s/aws4_request" % (timestamp[:8], region, service)


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    """Algorithm, time, scope and the hash of the canonical request."""
    return "\n".join([SIGV4_ALGORITHM, timestamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])


def signing_key(secret: str, timestamp: str, region: str, service: str) -> bytes:
    """HMAC chain: date, region, service, 'aws4_request'."""
    import hmac  # lazy (start-up time): only signatures and password checks need it
    key = ("AWS4" + secret).encode("utf-8")
    for part in (timestamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def _signature(creds: Credentials, timestamp: str, region: str, service: str, canonical: str) -> str:
    import hmac  # lazy (start-up time): only signatures and password checks need it
    key = signing_key(creds.secret_key, timestamp, region, service)
    to_sign = string_to_sign(timestamp, credential_scope(timestamp, region, service), canonical)
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _service_path_rules(service: str, normalize: Optional[bool], double: Optional[bool]) -> Tuple[bool, bool]:
    generic = service != "s3"
    return (generic if normalize is None else normalize, generic if double is None else double)


def sign_request(method: str, path: str, query: Any, headers: Any, payload_hash: str,
                 creds: Credentials, region: str, service: str, now: datetime.datetime,
                 normalize: Optional[bool] = None, double_encode: Optional[bool] = None,
                 content_sha256: Optional[bool] = None, sign_token: bool = True) -> Dict[str, str]:
    """Sign a request; return the headers to add (X-Amz-Date, X-Amz-Content-SHA256, token, Authorization)."""
    normalize, double_encode = _service_path_rules(service, normalize, double_encode)
    timestamp = amz_date(now)
    added = {"X-Amz-Date": timestamp}
    if creds.token:
        added["X-Amz-Security-Token"] = creds.token
    if service == "s3" if content_sha256 is None else content_sha256:
        added["X-Amz-Content-SHA256"] = payload_hash
    replaced = {n.lower() for n in added} | {"authorization"}
    signed = [(k, v) for k, v in _pairs(headers) if k.strip().lower() not in replaced]
    signed += [(k, v) for k, v in added.items() if sign_token or k != "X-Amz-Security-Token"]
    canonical = canonical_request(method, path, query, signed, payload_hash, normalize, double_encode)
    names = canonical_headers(signed)[1]
    added["Authorization"] = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        SIGV4_ALGORITHM, creds.access_key, credential_scope(timestamp, region, service), names,
        _signature(creds, timestamp, region, service, canonical))
    return added


def presign_query(method: str, host: str, path: str, query: Any, creds: Credentials, region: str,
                  service: str, now: datetime.datetime, expires: int, headers: Any = None,
                  payload_hash: Optional[str] = None, normalize: Optional[bool] = None,
                  double_encode: Optional[bool] = None, sign_token: bool = True) -> List[Tuple[str, str]]:
    """The query pairs of a presigned request, X-Amz-Signature last."""
    if not 1 <= int(expires) <= 7 * 24 * 3600:
        raise UsageError("presigned URLs expire within 1 second to 7 days")
    normalize, double_encode = _service_path_rules(service, normalize, double_encode)
    if payload_hash is None:
        payload_hash = UNSIGNED_PAYLOAD if service == "s3" else EMPTY_SHA256
    timestamp = amz_date(now)
    signed = [("host", host)] + [(k, v) for k, v in _pairs(headers) if k.strip().lower() != "host"]
    params = [(str(k), "" if v is None else str(v)) for k, v in _pairs(query)] + [
        ("X-Amz-Algorithm", SIGV4_ALGORITHM),
        ("X-Amz-Credential", "%s/%s" % (creds.access_key, credential_scope(timestamp, region, service))),
        ("X-Amz-Date", timestamp),
        ("X-Amz-Expires", str(int(expires))),
        ("X-Amz-SignedHeaders", canonical_headers(signed)[1])]
    if creds.token and sign_token:
        params.append(("X-Amz-Security-Token", creds.token))
    canonical = canonical_request(method, path, params, signed, payload_hash, normalize, double_encode)
    signature = _signature(creds, timestamp, region, service, canonical)
    if creds.token and not sign_token:
        params.append(("X-Amz-Security-Token", creds.token))
    return params + [("X-Amz-Signature", signature)]


def presign_url(method: str, scheme: str, host: str, path: str, creds: Credentials, region: str,
                now: datetime.datetime, expires: int, query: Any = None) -> str:
    """A presigned S3 URL (query-string authentication) valid for `expires` seconds."""
    params = presign_query(method, host, path, query, creds, region, "s3", now, expires)
    return "%s://%s%s?%s" % (scheme, host, uri_encode(path or "/", safe="/"), canonical_query(params[:-1])
                             + "&X-Amz-Signature=" + params[-1][1])


def presign_signatures(method: str, host: str, paths: Sequence[str], creds: Credentials, region: str,
                       now: datetime.datetime, expires: int) -> Tuple[str, List[str]]:
    """presign_url of many S3 paths at one time: the query their URLs share (without
    X-Amz-Signature) and each path's signature; the URL of a path is
    SCHEME://HOST<uri_encode(path, safe="/")>?<query>&X-Amz-Signature=<signature>.  The query is
    encoded and the signing key derived once, so each path costs one hash and one HMAC."""
    import hmac  # lazy (start-up time): only signatures and password checks need it
    if not paths:
        return "", []
    query = canonical_query(presign_query(method, host, paths[0], None, creds, region, "s3", now, expires)[:-1])
    timestamp = amz_date(now)
    scope = credential_scope(timestamp, region, "s3")
    key = signing_key(creds.secret_key, timestamp, region, "s3")
    block, signed = canonical_headers([("host", host)])
    signatures = []
    for path in paths:
        canonical = "\n".join([method.upper(), canonical_uri(path), query, block, signed, UNSIGNED_PAYLOAD])
        signatures.append(hmac.new(key, string_to_sign(timestamp, scope, canonical).encode("utf-8"),
                                   hashlib.sha256).hexdigest())
    return query, signatures


# === 7. AWS configuration and credentials ===
#
# The AWS SDKs' order: environment, shared profile files, web identity (STS),
# container credentials (ECS/EKS), EC2 instance metadata (IMDSv2, v1 fallback).

CREDENTIAL_REFRESH_MARGIN = 300.0
METADATA_TIMEOUT = 2.0


def _parse_xml(body: bytes) -> Any:
    """An XML document with namespaces stripped from tags, or None if it does not parse."""
    from xml.etree import ElementTree  # lazy (start-up time): only S3 answers need it
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    for elem in root.iter():
        elem.tag = elem.tag.rsplit("}", 1)[-1]
    return root


def _xml_text(root: Any, path: str) -> Optional[str]:
    """Text of the first element at path, or None."""
    found = root.find(path) if root is not None else None
    return found.text if found is not None else None


def _http_time(text: Optional[str]) -> Optional[float]:
    """Unix time of an HTTP date (RFC 9110 section 5.6.7: Date, Last-Modified), or None."""
    import email.utils  # lazy (start-up time): only S3 answers need it
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return email.utils.parsedate_to_datetime(text or "").timestamp()
    return None


def _answer_error(body: bytes) -> Optional[str]:
    """The code of an <Error> S3 sent inside a 200 answer (CopyObject, CompleteMultipartUpload
    may fail after their 200, says the S3 API reference), or None."""
    root = _parse_xml(body)
    return (root.findtext("Code") or "InternalError") if root is not None and root.tag == "Error" else None


def _iso_time(text: Optional[str]) -> Optional[float]:
    """Unix time of an ISO 8601 timestamp like 2026-11-27T21:00:00Z or 2026-11-27T21:00:00.123Z
    (fractions of a second kept: radosgw's listings have milliseconds, AWS's whole seconds), or None."""
    import datetime  # lazy (start-up time): only dated documents and signatures need it
    if not text:
        return None
    text = text.strip().replace("Z", "+00:00")
    fraction = re.search(r"\.(\d+)", text)  # Python < 3.11 reads 3 or 6 digits only
    if fraction:
        text = text[:fraction.start()] + text[fraction.end():]
    try:
        seconds = datetime.datetime.fromisoformat(text).timestamp()
        return seconds + (float("0." + fraction.group(1)) if fraction else 0.0)
    except ValueError:
        return None


def http_connection(url: str, context: Optional[ssl.SSLContext], timeout: float) -> http.client.HTTPConnection:
    """An unconnected HTTP or HTTPS connection to the host and port of url."""
    import http.client  # lazy (start-up time): only commands that talk HTTP need it
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=context)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def http_call(url: str, method: str = "GET", headers: Optional[Dict[str, str]] = None,
              body: Optional[bytes] = None, timeout: float = METADATA_TIMEOUT,
              context: Optional[ssl.SSLContext] = None) -> Tuple[int, bytes]:
    """One small HTTP exchange (metadata services, STS); returns (status, body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http_connection(url, context, timeout)
    try:
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(1 << 20)
    finally:
        conn.close()


class AwsConfig:
    """AWS settings from the environment and ~/.aws/{credentials,config}, SDK conventions."""

    def __init__(self, environ: Mapping[str, str], home: str):
        self.environ, self.home = environ, home
        self.profile = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
        self.credentials_file = environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials")
        self.config_file = environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
        self._sections = None  # type: Optional[Dict[str, str]]

    def _read(self, path: str, section: str) -> Optional[Dict[str, str]]:
        """A section's keys, or None when the file has no such section."""
        import configparser  # lazy (start-up time): only AWS and fleet config files need it
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError) as e:
            raise DogestryError("cannot read AWS settings in %s: %s" % (path, str(e).splitlines()[0]))
        return dict(parser.items(section)) if parser.has_section(section) else None

    def settings(self) -> Dict[str, str]:
        """The profile's keys: config file ([profile NAME] or [default]) overlaid by the credentials file."""
        if self._sections is None:
            config_section = "default" if self.profile == "default" else "profile " + self.profile
            config = self._read(self.config_file, config_section)
            credentials = self._read(self.credentials_file, self.profile)
            explicit = self.environ.get("AWS_PROFILE") or self.environ.get("AWS_DEFAULT_PROFILE")
            if explicit and config is None and credentials is None:
                raise DogestryError("AWS profile %r not found in %s or %s"
                                    % (self.profile, self.credentials_file, self.config_file))
            self._sections = dict(config or {}, **(credentials or {}))
        return self._sections

    def region(self) -> Optional[str]:
        """AWS_REGION, AWS_DEFAULT_REGION, or the profile's region."""
        return self.environ.get("AWS_REGION") or self.environ.get("AWS_DEFAULT_REGION") or \
            self.settings().get("region") or None

    def ca_context(self) -> ssl.SSLContext:
        """TLS verification with the system CAs, or AWS_CA_BUNDLE."""
        import ssl  # lazy (start-up time): only TLS needs it
        bundle = self.environ.get("AWS_CA_BUNDLE") or self.settings().get("ca_bundle")
        try:
            return ssl.create_default_context(cafile=bundle or None)
        except (OSError, ssl.SSLError) as e:
            raise DogestryError("cannot use the CA bundle %s: %s" % (bundle, e))


class CredentialChain:
    """Finds credentials once, the SDK way, and refreshes temporary ones before they expire."""

    def __init__(self, config: AwsConfig, clock: Callable[[], float] = time.time,
                 force_metadata: bool = False, http: Callable[..., Tuple[int, bytes]] = http_call):
        self.config, self.clock, self.force_metadata, self.http = config, clock, force_metadata, http
        self._lock = threading.Lock()
        self._current = None  # type: Optional[Credentials]

    def get(self, force_refresh: bool = False) -> Credentials:
        """Current credentials (looked up on first use, refreshed near expiry)."""
        with self._lock:
            current = self._current
            stale = current is None or force_refresh or (
                current.expires is not None and current.expires - self.clock() < CREDENTIAL_REFRESH_MARGIN)
            if stale:
                try:
                    self._current = current = self._resolve()
                except DogestryError:
                    still_valid = current is not None and not force_refresh and (
                        current.expires is None or current.expires > self.clock())
                    if not still_valid:
                        raise
            assert current is not None
            return current

    def _resolve(self) -> Credentials:
        if self.force_metadata:
            found = self._from_instance_metadata(required=True)
            assert found is not None
            return found
        for source in (self._from_environment, self._from_profile, self._from_web_identity,
                       self._from_container, self._from_instance_metadata):
            found = source()
            if found is not None:
                return found
        raise DogestryError(
            "no AWS credentials found: looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_ACCESS_KEY/AWS_SECRET_KEY, profile %r in %s and %s, web identity "
            "(AWS_WEB_IDENTITY_TOKEN_FILE), container credentials and EC2 instance metadata"
            % (self.config.profile, self.config.credentials_file, self.config.config_file))

    def _from_environment(self) -> Optional[Credentials]:
        env = self.config.environ
        for key_var, secret_var in (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
                                    ("AWS_ACCESS_KEY", "AWS_SECRET_KEY")):
            if env.get(key_var) and env.get(secret_var):
                return Credentials(env[key_var], env[secret_var], env.get("AWS_SESSION_TOKEN") or None,
                                   None, "environment (%s)" % key_var)
            if bool(env.get(key_var)) != bool(env.get(secret_var)):
                present, absent = (key_var, secret_var) if env.get(key_var) else (secret_var, key_var)
                raise DogestryError("%s is set but %s is not" % (present, absent))
        return None

    def _from_profile(self) -> Optional[Credentials]:
        s = self.config.settings()
        if s.get("aws_access_key_id") and s.get("aws_secret_access_key"):
            return Credentials(s["aws_access_key_id"], s["aws_secret_access_key"],
                               s.get("aws_session_token") or None, None, "profile %s" % self.config.profile)
        return None

    def _from_web_identity(self) -> Optional[Credentials]:
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        env, s = self.config.environ, self.config.settings()
        token_file = env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or s.get("web_identity_token_file")
        role = env.get("AWS_ROLE_ARN") or s.get("role_arn")
        if not token_file or not role:
            return None
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise DogestryError("cannot read the web identity token %s: %s" % (token_file, _os_reason(e)))
        region = self.config.region() or "us-east-1"
        endpoint = env.get("AWS_ENDPOINT_URL_STS") or env.get("AWS_ENDPOINT_URL") or \
            "https://sts.%s.amazonaws.com" % region
        form = urllib.parse.urlencode({
            "Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": role,
            "RoleSessionName": env.get("AWS_ROLE_SESSION_NAME") or s.get("role_session_name") or
            "dogestry-%d" % int(self.clock()), "WebIdentityToken": token}).encode()
        try:
            status, body = self.http(endpoint.rstrip("/") + "/", "POST", {
                "Content-Type": "application/x-www-form-urlencoded"}, form, 10.0, self.config.ca_context())
        except (OSError, http.client.HTTPException) as e:
            raise DogestryError("cannot reach STS at %s for web identity credentials: %s" % (endpoint, _os_reason(e)))
        root = _parse_xml(body)
        if status != 200 or root is None:
            code = _xml_text(root, ".//Code") or ("HTTP %d" % status if status != 200 else "unreadable answer")
            raise DogestryError("STS AssumeRoleWithWebIdentity for %s failed: %s" % (role, code))
        return self._temporary(_xml_text(root, ".//Credentials/AccessKeyId"),
                               _xml_text(root, ".//Credentials/SecretAccessKey"),
                               _xml_text(root, ".//Credentials/SessionToken"),
                               _xml_text(root, ".//Credentials/Expiration"), "web identity (%s)" % role)

    def _temporary(self, key: Optional[str], secret: Optional[str], token: Optional[str],
                   expiration: Optional[str], source: str) -> Credentials:
        if not key or not secret:
            raise DogestryError("%s returned no usable credentials" % source)
        return Credentials(key, secret, token or None, _iso_time(expiration), source)

    def _from_container(self) -> Optional[Credentials]:
        env = self.config.environ
        if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
            url = "http://169.254.170.2" + env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
        elif env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            url = env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        else:
            return None
        headers = {}
        token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
        if env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"):
            try:
                with open(env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"], encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                raise DogestryError("cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE %s: %s"
                                    % (env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"], _os_reason(e)))
        if token:
            headers["Authorization"] = token
        doc = self._metadata_json(url, headers, "container credentials")
        return self._temporary(doc.get("AccessKeyId"), doc.get("SecretAccessKey"), doc.get("Token"),
                               doc.get("Expiration"), "container credentials")

    def _metadata_json(self, url: str, headers: Dict[str, str], what: str) -> Dict[str, Any]:
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        try:
            status, body = self.http(url, "GET", headers, None, METADATA_TIMEOUT)
            doc = json.loads(body.decode("utf-8")) if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DogestryError("cannot get %s from %s: %s" % (what, url, _os_reason(e)))
        if not isinstance(doc, dict):
            raise DogestryError("cannot get %s from %s: %s" % (what, url, "HTTP %d" % status if status != 200
                                                                else "unreadable answer"))
        return doc

    def _from_instance_metadata(self, required: bool = False) -> Optional[Credentials]:
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        import socket  # lazy (start-up time): only commands that talk to a network need it
        env = self.config.environ
        if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true" and not required:
            return None
        base = (env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254").rstrip("/")
        headers = {}  # type: Dict[str, str]
        try:
            # IMDSv2 first; any other answer (403/404/405 from v1-only services) or a timeout
            # (a container behind a hop limit of 1) falls back to v1 requests.
            with contextlib.suppress(socket.timeout):
                status, token = self.http(base + "/latest/api/token", "PUT",
                                          {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, b"", METADATA_TIMEOUT)
                if status == 200:
                    headers["X-aws-ec2-metadata-token"] = token.decode("ascii", "replace").strip()
            status, body = self.http(base + "/latest/meta-data/iam/security-credentials/", "GET",
                                     headers, None, METADATA_TIMEOUT)
        except (OSError, http.client.HTTPException) as e:
            if required:
                raise DogestryError("cannot reach EC2 instance metadata at %s: %s" % (base, _os_reason(e)))
            return None
        roles = body.decode("utf-8", "replace").split() if status == 200 else []
        if not roles:
            if required:
                raise DogestryError("EC2 instance metadata at %s has no IAM role (HTTP %d)" % (base, status))
            return None
        doc = self._metadata_json(base + "/latest/meta-data/iam/security-credentials/" + roles[0],
                                  headers, "instance credentials")
        return self._temporary(doc.get("AccessKeyId"), doc.get("SecretAccessKey"), doc.get("Token"),
                               doc.get("Expiration"), "EC2 instance metadata (%s)" % roles[0])


# === 8. S3 client and store ===
#
# S3 REST API over http.client: virtual-host addressing on AWS (path style for bucket
# names with dots and for custom endpoints), per-thread keep-alive connections, every
# request signed (SigV4, real payload hashes) and re-signed on each retry.

S3_SINGLE_PUT_MAX = 16 << 20
S3_VERIFIED_PUT_MAX = 256 << 20  # a blob someone else wrote goes up in one PUT up to this size: S3 checks its sha256
S3_MIN_PART = 8 << 20
S3_MAX_PARTS = 10000
S3_RANGE = 4 << 20
S3_COPY_MAX = 5 << 30     # the largest object one CopyObject copies; larger ones are copied in parts
S3_COPY_PART = 512 << 20  # the part size of those (UploadPartCopy)
S3_RETRY_BUDGET = 120.0   # seconds a failing request is retried when AWS_MAX_ATTEMPTS is not set
RETRY_NOTICE_AFTER = 5.0  # a request failing this long says so (one line) ...
RETRY_NOTICE_WINDOW = S3_RETRY_BUDGET  # ... and no other request of the client says it again within this
STALE_UPLOAD_AGE = 3600.0  # a multipart upload this old is abandoned: the next push of its blob aborts it
UPLOAD_CLOCK_MARGIN = 60.0  # uploads S3 says it began this long before ours count as ours after a retry
S3_ANSWER_LIMIT = 16 << 20  # the largest answer (XML) read whole
S3_ERROR_LIMIT = 64 << 10   # the most of an error answer we read
S3_RETRY_STATUSES = (500, 502, 503, 504)
S3_RETRY_CODES = ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                  "RequestTimeTooSkewed", "ExpiredToken", "TokenRefreshRequired")
S3_DELETE_RETRY_CODES = S3_RETRY_CODES + ("UnknownError",)  # a key's own result in DeleteObjects worth retrying
S3_REGION_CODES = ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException")


class S3Error(StoreError):
    """S3 answered with an error code (AccessDenied, NoSuchBucket, ...)."""

    def __init__(self, message: str, code: str = "", status: int = 0):
        super().__init__(message)
        self.code, self.status = code, status


UNKNOWN_HOST = "UnknownHost"  # the code of an S3Error for a host name that does not resolve


def unknown_host(e: BaseException) -> bool:
    """Is this the resolver saying the host name does not exist (EAI_NONAME, EAI_NODATA: no retry
    will change that), rather than that it could not find out now (EAI_AGAIN)?"""
    import socket  # lazy (start-up time): only commands that talk to a network need it
    permanent = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
    return isinstance(e, socket.gaierror) and e.errno in permanent


class S3Location(NamedTuple):
    """Where an S3 store lives: bucket, key prefix, and optional region and endpoint."""

    bucket: str
    prefix: str
    region: Optional[str]
    endpoint: Optional[str]
    profile: Optional[str] = None  # ?profile=NAME: this store's credentials come from that AWS profile


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{2,254}$", re.IGNORECASE)


def parse_s3_url(url: str) -> S3Location:
    """s3://bucket[/prefix/][?region=R&endpoint=URL&profile=NAME]: the original dogestry's form,
    plus a profile of ~/.aws for this store alone (as the AWS CLI's --profile)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3":
        raise UsageError("invalid S3 URL %r: expected s3://bucket/prefix/" % url)
    if not parts.netloc or not _BUCKET_RE.match(parts.netloc):
        raise UsageError("invalid S3 URL %r: expected s3://bucket/prefix/ (bucket names are 3-63 "
                         "letters, digits, dots and hyphens)" % url)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"region", "endpoint", "profile"}
    if unknown:
        raise UsageError("unknown S3 URL option %s in %r (known: region, endpoint, profile)"
                         % (", ".join(sorted(unknown)), url))
    prefix = urllib.parse.unquote(parts.path).strip("/")
    if prefix:
        check_key(prefix)
        prefix += "/"
    endpoint = (query.get("endpoint") or [""])[0] or None
    if endpoint and urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise UsageError("invalid S3 endpoint %r: expected http://host:port or https://host" % endpoint)
    profile = (query.get("profile") or [""])[0] or None
    if profile is not None and not re.match(r"^[A-Za-z0-9_.+=,@-]{1,64}$", profile):
        raise UsageError("invalid AWS profile name %r in %r" % (profile[:80], url))
    return S3Location(parts.netloc, prefix, (query.get("region") or [""])[0] or None, endpoint, profile)


def _s3_error(body: bytes) -> Tuple[str, str, Optional[str]]:
    """(code, message, region) from an S3 XML error body."""
    root = _parse_xml(body) if body else None
    if root is None:
        return "", "", None
    return (_xml_text(root, ".//Code") or "", _xml_text(root, ".//Message") or "",
            _xml_text(root, ".//Region"))


_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}[a-z0-9]$")


def s3_target(bucket: str, region: str, endpoint: Optional[str]) -> Tuple[str, str, int, str]:
    """Where a bucket's objects live: (scheme, host, port, path prefix).

    AWS: virtual-hosted style, path style for bucket names with dots; a custom endpoint:
    path style under the endpoint's own path.
    """
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        return scheme, parts.hostname or "", port, parts.path.rstrip("/") + "/" + bucket
    if not _REGION_RE.match(region):
        raise UsageError("invalid AWS region %r" % region[:80])
    host = "s3.%s.amazonaws.com" % region
    if "." in bucket or not re.match(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$", bucket):
        return "https", host, 443, "/" + bucket
    return "https", "%s.%s" % (bucket, host), 443, ""


def max_attempts_setting(environ: Mapping[str, str]) -> Optional[int]:
    """AWS_MAX_ATTEMPTS as a number (None when unset: retry for a time instead)."""
    text = (environ.get("AWS_MAX_ATTEMPTS") or "").strip()
    if not text:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise UsageError("AWS_MAX_ATTEMPTS must be a whole number from 1 to 1000 (got %r)" % text[:40])
    return int(text)


class S3Client:
    """Signed, retried S3 requests against one bucket.

    A failed request is tried again, with backoff, for S3_RETRY_BUDGET seconds (long enough to
    ride out a minute's outage in the middle of a transfer), or AWS_MAX_ATTEMPTS times if set.
    Once a request has failed for RETRY_NOTICE_AFTER, notify() gets one line saying so.  A host
    name that does not resolve (EAI_NONAME, EAI_NODATA) fails at once: retries will not help.
    """

    def __init__(self, location: S3Location, credentials: CredentialChain, config: AwsConfig,
                 clock: Callable[[], float] = time.time, sleep: Optional[Callable[[float], None]] = None,
                 rand: Callable[[], float] = random.random, max_attempts: Optional[int] = None,
                 presigned: Optional[Mapping[str, str]] = None, notify: Callable[[str], None] = lambda line: None):
        self.bucket = location.bucket
        self.notify = notify    # a warning for the user: requests keep failing, and are retried
        self._noticed_at = None  # type: Optional[float]  # when notify() was last told of retries
        self._notice_lock = threading.Lock()
        self.credentials, self.clock, self.rand = credentials, clock, rand
        self.cancelled = threading.Event()    # set by cancel(): no new requests, no more retries
        self.interrupted = threading.Event()  # and no clean-up retries or waits either
        self.sleep = sleep or self._wait
        self.presigned = presigned  # key -> URL: GET only these, with someone else's signatures
        env = config.environ
        self.endpoint = location.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        self.region = location.region or config.region() or "us-east-1"
        self.max_attempts = max_attempts or max_attempts_setting(env)  # None: retry for S3_RETRY_BUDGET
        self.tls = None  # type: Optional[ssl.SSLContext]
        self._config = config
        self._local = threading.local()
        self._skew = 0.0
        self._bare_etags = False  # If-Match takes ETags without their quotes here (radosgw, below)
        # every live thread's, for cancel(): weak, so a thread's connections close when it ends
        self._conns = weakref.WeakSet()  # type: weakref.WeakSet[http.client.HTTPConnection]
        self._conns_lock = threading.Lock()

    # -- addressing --

    def _target(self) -> Tuple[str, str, int, str]:
        """(scheme, host, port, path prefix for this bucket)."""
        return s3_target(self.bucket, self.region, self.endpoint)

    def _connection(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get((scheme, host, port))
        if conn is None:
            if scheme == "https":
                if self.tls is None:
                    self.tls = self._config.ca_context()
                conn = http.client.HTTPSConnection(host, port, timeout=60, context=self.tls, blocksize=CHUNK)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=60, blocksize=CHUNK)
            conns[(scheme, host, port)] = conn
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    def netloc(self) -> str:
        """host, or host:port, of where this bucket's requests go."""
        _, host, port, _ = self._target()
        return host if port in (80, 443) else "%s:%d" % (host, port)

    def _drop(self, scheme: str, host: str, port: int) -> None:
        conn = getattr(self._local, "conns", {}).pop((scheme, host, port), None)
        if conn is not None:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def describe(self, key: str = "") -> str:
        return "s3://%s/%s" % (self.bucket, key)

    # -- requests --

    def request(self, method: str, key: str = "", query: Any = None, headers: Optional[Dict[str, str]] = None,
                body: Optional[Callable[[], Any]] = None, payload_hash: str = EMPTY_SHA256,
                ok: Sequence[int] = (200,), idempotent: bool = True, cancellable: bool = True
                ) -> http.client.HTTPResponse:
        """Send a signed request, retrying transient failures; return the (unread) response.

        body is a factory returning bytes or a fresh file object, so a retry can resend it.
        """
        import datetime  # lazy (start-up time): only dated documents and signatures need it
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        import socket  # lazy (start-up time): only commands that talk to a network need it
        import ssl  # lazy (start-up time): only TLS needs it
        attempt, redirected, started = 0, False, self.clock()
        while True:
            attempt += 1
            if self.cancelled.is_set() and cancellable:
                raise Interrupted("stopped")
            scheme, host, port, base = self._target()
            if self.interrupted.is_set():  # cancel() broke every connection: clean up on a fresh one
                self._drop(scheme, host, port)
            path = base + "/" + key if key else (base or "/")
            netloc = host if port in (80, 443) else "%s:%d" % (host, port)
            all_headers = dict(headers or {})
            all_headers["Host"] = netloc
            creds = None  # type: Optional[Credentials]
            if self.presigned is None:
                creds = self.credentials.get()
                now = datetime.datetime.fromtimestamp(self.now(), datetime.timezone.utc)
                all_headers.update(sign_request(method, path, query, all_headers, payload_hash, creds,
                                                self.region, "s3", now))
                target = uri_encode(path, safe="/") + ("?" + canonical_query(query) if query else "")
            else:
                target = self._presigned_target(method, key, query)
            conn = self._connection(scheme, host, port)
            try:
                conn.request(method, target, body=body() if body else None, headers=all_headers)
                quick_ack(conn.sock)
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as e:  # will not go away by trying again
                self._drop(scheme, host, port)
                raise S3Error("%s %s: certificate verify failed for %s://%s: %s (a private CA is given with "
                              "AWS_CA_BUNDLE or ca_bundle in ~/.aws/config)"
                              % (method, self.describe(key), scheme, netloc, e.verify_message or e.reason))
            except (OSError, http.client.HTTPException) as e:
                self._drop(scheme, host, port)
                reason = self._failure(e, host)
                if unknown_host(e):
                    raise S3Error("%s %s: %s (%s)" % (method, self.describe(key), reason, self._endpoint_note()),
                                  UNKNOWN_HOST)
                if idempotent and self._wait_to_retry(attempt, started, _os_reason(e), netloc, cancellable):
                    continue
                raise S3Error("%s %s: %s (after %d attempt%s%s)" % (
                    method, self.describe(key), reason, attempt, "s" if attempt > 1 else "",
                    "; " + self._endpoint_note() if isinstance(e, socket.gaierror) else ""))
            except BaseException:  # an interrupted body (Ctrl-C, a cancelled upload): the connection is spent
                self._drop(scheme, host, port)
                raise
            if resp.status in ok:
                return resp
            try:
                data = resp.read(S3_ERROR_LIMIT)  # b"" for HEAD; reading frees the connection for reuse
            except (OSError, http.client.HTTPException):
                data = b""
                self._drop(scheme, host, port)
            if resp.getheader("Connection", "").lower() == "close" or resp.status >= 500 or not resp.isclosed():
                self._drop(scheme, host, port)
            code, message, region = _s3_error(data)
            code = code or {301: "PermanentRedirect", 403: "AccessDenied", 404: "NotFound",
                            412: "PreconditionFailed"}.get(resp.status, "HTTP%d" % resp.status)
            new_region = resp.getheader("x-amz-bucket-region") or region
            if code in S3_REGION_CODES or (resp.status in (301, 400) and resp.getheader("x-amz-bucket-region")):
                if new_region and new_region != self.region and not redirected:
                    self.region, redirected = new_region, True
                    attempt -= 1
                    continue
            if code == "RequestTimeTooSkewed":
                server = _http_time(resp.getheader("Date"))
                if server is not None:  # no Date, or nonsense: no correction
                    self._skew = server - self.clock()
            if code in ("ExpiredToken", "TokenRefreshRequired"):
                self.credentials.get(force_refresh=True)
            retriable = resp.status in S3_RETRY_STATUSES or code in S3_RETRY_CODES
            if retriable and idempotent and self._wait_to_retry(attempt, started, "%s, HTTP %d" % (code, resp.status),
                                                                netloc, cancellable):
                continue
            hint = ""
            if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "ExpiredToken"):
                hint = " [credentials from %s]" % ((creds.source or "the caller") if creds else "presigned URL")
            raise S3Error("%s %s: %s%s (HTTP %d)%s" % (method, self.describe(key), code,
                                                        ": " + message if message else "", resp.status, hint),
                          code, resp.status)

    def call(self, method: str, key: str = "", **kw: Any) -> Tuple[http.client.HTTPResponse, bytes]:
        """A request whose whole (small) answer is read; a break while reading is retried too."""
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        attempt, started = 0, self.clock()
        while True:
            attempt += 1
            resp = self.request(method, key, **kw)
            try:
                data = resp.read(S3_ANSWER_LIMIT + 1)
                if len(data) <= S3_ANSWER_LIMIT and resp.length:  # read(n) returns a cut-off body short
                    raise http.client.IncompleteRead(data, resp.length)
            except (OSError, http.client.HTTPException) as e:
                scheme, host, port, _ = self._target()
                self._drop(scheme, host, port)
                reason = "the answer broke off: %s" % _os_reason(e)
                if not kw.get("idempotent", True) or not self._wait_to_retry(attempt, started, reason, self.netloc(),
                                                                             kw.get("cancellable", True)):
                    raise S3Error("%s %s: %s" % (method, self.describe(key), reason))
                continue
            if len(data) > S3_ANSWER_LIMIT:
                raise S3Error("%s %s: the answer is larger than %s" % (method, self.describe(key),
                                                                        human_size(S3_ANSWER_LIMIT)))
            return resp, data

    def _presigned_target(self, method: str, key: str, query: Any) -> str:
        """The request target of a presigned URL for key (GET only, the URL's own query)."""
        url = (self.presigned or {}).get(key)
        if method != "GET" or query:
            raise StoreError("%s %s: only reads of presigned objects are possible" % (method, self.describe(key)))
        if url is None:
            raise NotFound("%s: not among the objects presigned for this pull" % self.describe(key))
        parts = urllib.parse.urlsplit(url)
        return parts.path + "?" + parts.query

    def presign(self, key: str, expires: int) -> str:
        """A presigned GET URL for key, valid for `expires` seconds."""
        import datetime  # lazy (start-up time): only dated documents and signatures need it
        scheme, host, port, base = self._target()
        netloc = host if port in (80, 443) else "%s:%d" % (host, port)
        now = datetime.datetime.fromtimestamp(self.now(), datetime.timezone.utc)
        return presign_url("GET", scheme, netloc, base + "/" + key, self.credentials.get(), self.region,
                           now, expires)

    def presign_many(self, keys: Sequence[str], expires: int) -> Tuple[str, List[str]]:
        """Presigned GETs of many keys, valid for `expires` seconds: the query their URLs share
        and each key's signature (presign_signatures; each URL is the one presign() would make)."""
        import datetime  # lazy (start-up time): only dated documents and signatures need it
        _, host, port, base = self._target()
        netloc = host if port in (80, 443) else "%s:%d" % (host, port)
        now = datetime.datetime.fromtimestamp(self.now(), datetime.timezone.utc)
        return presign_signatures("GET", netloc, [base + "/" + key for key in keys], self.credentials.get(),
                                  self.region, now, expires)

    def may_retry(self, attempt: int, started: float, cancellable: bool = True) -> bool:
        """Try a failing request once more, after `attempt` tries since `started`? Once cancelled,
        only the requests that clean up (not cancellable) are, and not after an interrupt."""
        if self.cancelled.is_set() and (cancellable or self.interrupted.is_set()):
            return False
        if self.max_attempts is not None:
            return attempt < self.max_attempts
        return self.clock() - started < S3_RETRY_BUDGET

    def _wait_to_retry(self, attempt: int, started: float, reason: str, host: str, cancellable: bool = True) -> bool:
        """Back off before trying a failing request once more (may_retry), or False to give up.  A
        request that will have been failing RETRY_NOTICE_AFTER by then sends notify() one line naming
        the host and the reason (and no request of this client does again for RETRY_NOTICE_WINDOW)."""
        if not self.may_retry(attempt, started, cancellable):
            return False
        delay = self._backoff_delay(attempt)
        now = self.clock()
        if now + delay - started >= RETRY_NOTICE_AFTER:
            with self._notice_lock:
                due = self._noticed_at is None or now - self._noticed_at >= RETRY_NOTICE_WINDOW
                if due:
                    self._noticed_at = now
            if due:
                limit = ("up to %d attempts (AWS_MAX_ATTEMPTS)" % self.max_attempts if self.max_attempts is not None
                         else "for up to %s" % human_duration(S3_RETRY_BUDGET))
                self.notify("S3 requests to %s keep failing (%s); retrying %s" % (host, reason, limit))
        self.sleep(delay)
        return True

    def _failure(self, e: BaseException, host: str) -> str:
        """What went wrong with a request that got no answer (a host name that did not resolve is named)."""
        import socket  # lazy (start-up time): only commands that talk to a network need it
        if isinstance(e, socket.gaierror):
            return "cannot resolve the host name %s: %s" % (host, _os_reason(e))
        return _os_reason(e)

    def _endpoint_note(self) -> str:
        """For a host name that did not resolve: where it came from."""
        if self.endpoint:
            return "the endpoint %s" % self.endpoint
        return ("no endpoint is set, so this is the bucket's host on AWS; for another S3-compatible store "
                "add ?endpoint=URL to the store or set AWS_ENDPOINT_URL")

    def _backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter (AWS Architecture Blog, 2015)."""
        return self.rand() * min(20.0, 0.25 * (2 ** attempt))

    def _wait(self, seconds: float) -> None:
        """Sleep, unless an interrupt comes first."""
        self.interrupted.wait(seconds)

    def cancel(self, interrupted: bool = False) -> None:
        """Stop: requests not yet sent fail with Interrupted, retries and the waits before them end;
        clean-up requests (aborting multipart uploads) still get their retries, unless interrupted."""
        import socket  # lazy (start-up time): only commands that talk to a network need it
        if interrupted:
            self.interrupted.set()
        self.cancelled.set()
        if interrupted:  # requests waiting on an answer end now, not when S3 answers
            with self._conns_lock:
                conns = list(self._conns)
            for conn in conns:
                sock = conn.sock
                if sock is not None:
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)

    # -- operations --

    def head(self, key: str) -> Optional[http.client.HTTPResponse]:
        """HEAD an object: its response (headers), or None if absent."""
        try:
            resp, _ = self.call("HEAD", key)
        except S3Error as e:
            if e.status == 404:
                return None
            raise
        return resp

    def check_bucket(self) -> None:
        """Check that the bucket exists and we may list it (a GET, so errors carry S3's code)."""
        try:
            self.call("GET", query=[("list-type", "2"), ("max-keys", "1")])
        except S3Error as e:
            if e.status == 404:
                raise NotFound("S3 bucket %s does not exist (%s)" % (self.bucket, self.region))
            raise

    def put(self, key: str, body: Callable[[], Any], size: int, sha256_hex: str,
            if_absent: bool = False, extra: Optional[Dict[str, str]] = None) -> bool:
        """PUT an object (Content-Length always set); False if if_absent and it already existed."""
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        headers.update(extra or {})
        if if_absent:
            headers["If-None-Match"] = "*"
        try:
            self.call("PUT", key, headers=headers, body=body, payload_hash=sha256_hex)
        except S3Error as e:
            if if_absent and e.status == 412:
                return False
            if if_absent and e.status == 501:  # a store without conditional writes
                return self.put(key, body, size, sha256_hex, False, extra)
            raise
        return True

    # Conditional writes (S3 User Guide, "conditional writes" and "conditional deletes"): a
    # version is the ETag as S3 sends it.  radosgw (Ceph 16) compares If-Match with its ETag
    # without the quotes, and refuses the quoted form that RFC 7232 and AWS use: when a quoted
    # If-Match fails though HEAD shows that very ETag, this client sends ETags bare from then on.

    def get_versioned(self, key: str) -> Tuple[bytes, str]:
        """A small object's bytes and ETag (NotFound if absent)."""
        try:
            resp, data = self.call("GET", key)
        except S3Error as e:
            if e.status == 404 or e.code == "NoSuchKey":
                raise NotFound("%s: no such key" % self.describe(key))
            raise
        etag = resp.getheader("ETag")
        if not etag:
            raise S3Error("GET %s: no ETag in the answer, so it cannot be updated only if unchanged"
                          % self.describe(key))
        return data, etag

    def put_if_match(self, key: str, data: bytes, etag: Optional[str]) -> bool:
        """PUT small bytes only if the object still has that ETag (None: only if it is absent);
        False if the condition failed."""
        if etag is None:
            return self._conditional("PUT", key, {"If-None-Match": "*"}, data)
        if self._conditional("PUT", key, {"If-Match": self._if_match(etag)}, data):
            return True
        if not self._etag_form_refused(key, etag):
            return False
        return self._conditional("PUT", key, {"If-Match": self._if_match(etag)}, data)

    def delete_if_match(self, key: str, etag: str) -> bool:
        """DELETE an object only if it still has that ETag; False if it has another (or is gone).
        radosgw (Ceph 16) ignores If-Match on DELETE: the HEAD before it is all the check there."""
        head = self.head(key)
        if head is None or head.getheader("ETag") != etag:
            return False
        return self._conditional("DELETE", key, {"If-Match": self._if_match(etag)}, None)

    def _if_match(self, etag: str) -> str:
        return etag.strip('"') if self._bare_etags else etag

    def _etag_form_refused(self, key: str, etag: str) -> bool:
        """After a quoted If-Match failed: does the object have that ETag all the same (so the store
        wants it bare, and gets it so from now on)?"""
        if self._bare_etags or etag == etag.strip('"'):
            return False
        head = self.head(key)
        if head is None or head.getheader("ETag") != etag:
            return False
        self._bare_etags = True
        return True

    def _conditional(self, method: str, key: str, condition: Dict[str, str], data: Optional[bytes]) -> bool:
        """A PUT (of data) or DELETE with a condition; False if it failed: 412, 409
        ConditionalRequestConflict (a concurrent conditional write), 404 (a concurrent delete)."""
        body = data if data is not None else b""
        headers = {"Content-Length": str(len(body))}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        headers.update(condition)
        try:
            self.call(method, key, headers=headers, body=lambda: body, payload_hash=hashlib.sha256(body).hexdigest(),
                      ok=(200, 204))
        except S3Error as e:
            if e.status in (409, 412) or (e.status == 404 and e.code != "NoSuchBucket"):
                return False
            if e.status == 501 or e.code == "NotImplemented":
                raise CannotSwap("%s %s: this S3 store cannot write an object only if it is unchanged (it answers "
                                 "%s to %s), so updates of a tag by several hosts at once could be lost; nothing "
                                 "was written" % (method, self.describe(key), e.code or "HTTP 501", ", ".join(condition)))
            raise
        return True

    def get(self, key: str, start: int = 0, end: Optional[int] = None) -> http.client.HTTPResponse:
        """GET an object, or a byte range of it (end inclusive)."""
        headers = {}
        if start or end is not None:
            headers["Range"] = "bytes=%d-%s" % (start, "" if end is None else end)
        try:
            return self.request("GET", key, headers=headers, ok=(200, 206))
        except S3Error as e:
            if e.status == 404 or e.code == "NoSuchKey":
                raise NotFound("%s: no such key" % self.describe(key))
            raise

    def list(self, prefix: str, page_size: int = 1000) -> Iterator[Tuple[str, int]]:
        """(key, size) of every object under prefix (ListObjectsV2, all pages)."""
        return ((key, size) for key, size, _, _ in self.list_ages(prefix, page_size))

    def now(self) -> float:
        """Our clock, corrected by the skew S3 told us of (if it did)."""
        return self.clock() + self._skew

    def server_time(self, resp: http.client.HTTPResponse) -> float:
        """The S3 server's clock when it answered (its Date header), or ours corrected by the known skew."""
        server = _http_time(resp.getheader("Date"))
        return self.now() if server is None else server

    def list_ages(self, prefix: str, page_size: int = 1000) -> Iterator[Tuple[str, int, float, Optional[str]]]:
        """(key, size, age, ETag) of every object under prefix; ages on S3's own clock, so the
        local clock's skew does not matter."""
        token = None  # type: Optional[str]
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("encoding-type", "url"), ("max-keys", str(page_size))]
            if token:
                query.append(("continuation-token", token))
            resp, body = self.call("GET", query=query)
            root, now = _parse_xml(body), self.server_time(resp)
            if root is None:
                raise S3Error("ListObjectsV2 on %s: unreadable answer" % self.describe(prefix))
            for item in root.findall("Contents"):
                key = urllib.parse.unquote_plus(item.findtext("Key") or "")
                modified = _iso_time(item.findtext("LastModified"))
                yield (key, int(item.findtext("Size") or 0), now - (now if modified is None else modified),
                       (item.findtext("ETag") or "").strip('"') or None)
            if (root.findtext("IsTruncated") or "").lower() != "true":
                return
            token = root.findtext("NextContinuationToken")
            if not token:
                return

    def child_prefixes(self, prefix: str) -> List[str]:
        """The prefixes right below `prefix` (`prefix` + `team/`): one ListObjectsV2 with delimiter /,
        its first page only."""
        query = [("list-type", "2"), ("prefix", prefix), ("delimiter", "/"), ("encoding-type", "url")]
        root = _parse_xml(self.call("GET", query=query)[1])
        if root is None:
            raise S3Error("ListObjectsV2 on %s: unreadable answer" % self.describe(prefix))
        return [urllib.parse.unquote_plus(p.findtext("Prefix") or "") for p in root.findall("CommonPrefixes")]

    def delete_many(self, keys: Sequence[str], racing_writes_win: bool = False) -> None:
        """DeleteObjects, 1000 keys a request; raise on the first key S3 could not delete.  Keys
        whose own result is a passing failure (InternalError; radosgw's UnknownError when a write of
        the key races the delete) are sent again in a request of their own, with backoff -- or, with
        racing_writes_win (gc: the write is someone relying on the key), left as they are."""
        for start in range(0, len(keys), 1000):
            batch, attempt, started = keys[start:start + 1000], 0, self.clock()
            while batch:
                failed = self._delete_batch(batch)
                batch = [key for key, code in failed if code in S3_DELETE_RETRY_CODES and not racing_writes_win]
                if racing_writes_win:
                    failed = [(key, code) for key, code in failed if code not in S3_DELETE_RETRY_CODES]
                attempt += 1
                lasting = [(key, code) for key, code in failed if code not in S3_DELETE_RETRY_CODES]
                reason = "DeleteObjects: %s" % (failed[0][1] if failed else "")
                if lasting or (batch and not self._wait_to_retry(attempt, started, reason, self.netloc())):
                    key, code = (lasting or failed)[0]
                    raise S3Error("DeleteObjects %s: %s" % (self.describe(key), code), code)

    def _delete_batch(self, batch: Sequence[str]) -> List[Tuple[str, str]]:
        """One DeleteObjects (quiet); the (key, error code) of each key S3 could not delete."""
        from xml.sax.saxutils import escape as xml_escape  # lazy (start-up time): it loads urllib.request and http.client
        body = ("<Delete><Quiet>true</Quiet>%s</Delete>" % "".join(
            "<Object><Key>%s</Key></Object>" % xml_escape(k) for k in batch)).encode()
        headers = {"Content-Type": "application/xml", "Content-Length": str(len(body)),
                   "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()}
        try:
            root = _parse_xml(self.call("POST", query=[("delete", "")], headers=headers,
                                        body=lambda: body, payload_hash=hashlib.sha256(body).hexdigest())[1])
        except S3Error as e:
            if e.status != 403:
                raise
            raise S3Error("DeleteObjects %s: %s (these credentials may not delete: s3:DeleteObject)"
                          % (self.describe(batch[0]), str(e).split(": ", 1)[-1]), e.code, e.status)
        if root is None:
            return []
        return [(error.findtext("Key") or "", error.findtext("Code") or "") for error in root.findall("Error")]

    def multipart_upload(self, key: str, path: str, size: int, workers: int,
                         on_progress: Callable[[int], None], check_digest: Optional[str] = None) -> None:
        """Upload a file in parallel parts (fewer than 10,000); abort the upload on any failure.

        Each part's sha256 (its signed payload hash) is computed here, in order, and the part
        goes up as soon as it is known; with check_digest, the same pass hashes the whole file
        and the upload is completed only if the file is that blob (else IntegrityError).
        Uploads of this key abandoned by earlier runs (older than STALE_UPLOAD_AGE) are aborted
        first; if creating the upload took retries, S3 may have created more than one, and
        those are aborted afterwards.
        """
        part_size = max(S3_MIN_PART, -(-size // (S3_MAX_PARTS - 1)))
        part_size = -(-part_size // (1 << 20)) << 20
        self.abort_uploads(key, before=self.now() - STALE_UPLOAD_AGE)
        with self._upload_session(key) as upload_id:
            try:
                ranges = [(n + 1, off, min(part_size, size - off)) for n, off in enumerate(range(0, size, part_size))]
                whole = hashlib.sha256() if check_digest else None
                with thread_pool(min(workers, len(ranges)), "dogestry-part") as pool:
                    futures = [pool.submit(self._upload_part, key, upload_id, path, r, part_sha256(path, r, whole),
                                           on_progress) for r in ranges]
                    etags = [f.result() for f in futures]
                if whole is not None and "sha256:" + whole.hexdigest() != check_digest:
                    raise IntegrityError("%s is not blob %s (its sha256 is %s); nothing was stored"
                                         % (path, check_digest, whole.hexdigest()))
                self._complete_upload(key, upload_id, [(n, etag) for (n, _, _), etag in zip(ranges, etags)])
            except S3Error as e:
                if e.code == "NoSuchUpload" and self.head_size(key) == size:
                    return  # a push of the same blob elsewhere finished it (and cleared ours away)
                raise

    @contextlib.contextmanager
    def _upload_session(self, key: str) -> Iterator[str]:
        """A multipart upload of key (its id), aborted if the block fails.  If creating it took
        retries, S3 may have created more than one: those are aborted afterwards."""
        since = self.now() - UPLOAD_CLOCK_MARGIN
        try:
            upload_id, retried = self._create_upload(key)
        except BaseException:  # an answer cut off (by an interrupt, say) may hide an upload S3 made
            self.abort_uploads(key, since=since)
            raise
        try:
            yield upload_id
        except BaseException:
            self._abort_upload(key, upload_id)
            raise
        finally:
            if retried:
                self.abort_uploads(key, since=since, keep=upload_id)

    def _create_upload(self, key: str) -> Tuple[str, bool]:
        """CreateMultipartUpload, retried here (a retry may leave an upload behind); (id, retried)."""
        attempt, started = 0, self.clock()
        while True:
            attempt += 1
            try:
                root = _parse_xml(self.call("POST", key, query=[("uploads", "")], idempotent=False,
                                            headers={"Content-Type": "application/octet-stream"})[1])
            except S3Error as e:
                if (e.status == 0 or e.status in S3_RETRY_STATUSES or e.code in S3_RETRY_CODES) \
                        and e.code != UNKNOWN_HOST and self._wait_to_retry(attempt, started, str(e), self.netloc()):
                    continue
                raise
            upload_id = _xml_text(root, ".//UploadId") if root is not None else None
            if not upload_id:
                raise S3Error("CreateMultipartUpload %s: no upload id in the answer" % self.describe(key))
            return upload_id, attempt > 1

    def _complete_upload(self, key: str, upload_id: str, parts: Sequence[Tuple[int, str]]) -> None:
        from xml.sax.saxutils import escape as xml_escape  # lazy (start-up time): it loads urllib.request and http.client
        body = ("<CompleteMultipartUpload>%s</CompleteMultipartUpload>" % "".join(
            "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag></Part>" % (n, xml_escape(etag))
            for n, etag in parts)).encode()
        _, answer_body = self.call("POST", key, query=[("uploadId", upload_id)], body=lambda: body,
                                   headers={"Content-Length": str(len(body)), "Content-Type": "application/xml"},
                                   payload_hash=hashlib.sha256(body).hexdigest())
        code = _answer_error(answer_body)
        if code is not None:
            raise S3Error("CompleteMultipartUpload %s: %s" % (self.describe(key), code), code)

    def _abort_upload(self, key: str, upload_id: str) -> None:
        """AbortMultipartUpload, retried within the budget (tried once after an interrupt); never raises."""
        with contextlib.suppress(DogestryError):
            self.call("DELETE", key, query=[("uploadId", upload_id)], ok=(204, 200, 404), cancellable=False)

    def age(self, key: str) -> Optional[float]:
        """Seconds since the object was last written, on S3's clock (None if absent)."""
        resp = self.head(key)
        if resp is None:
            return None
        modified = _http_time(resp.getheader("Last-Modified"))
        if modified is None:
            raise S3Error("HEAD %s: no Last-Modified in the answer" % self.describe(key))
        return self.server_time(resp) - modified

    def copy_in_place(self, key: str) -> bool:
        """CopyObject onto itself (a new Last-Modified, same bytes, no bytes through us); False if absent."""
        headers = {"x-amz-copy-source": uri_encode("/%s/%s" % (self.bucket, key), safe="/"),
                   "x-amz-metadata-directive": "REPLACE", "Content-Type": "application/octet-stream",
                   "Content-Length": "0"}
        try:
            _, body = self.call("PUT", key, headers=headers)
        except S3Error as e:
            if e.status == 404:
                return False
            raise
        code = _answer_error(body)
        if code is not None:
            raise S3Error("CopyObject %s: %s" % (self.describe(key), code), code)
        return True

    def copy_object(self, source_bucket: str, source_key: str, key: str, size: int,
                    single_max: int = S3_COPY_MAX, part_size: int = S3_COPY_PART, workers: int = 1) -> None:
        """Copy an object from another bucket (or key) on the same endpoint, server-side: no
        byte passes through us.  CopyObject up to single_max (5 GiB at most), above it
        UploadPartCopy of parts of part_size, `workers` at once (S3 API reference)."""
        source = uri_encode("/%s/%s" % (source_bucket, source_key), safe="/")
        if size <= single_max:
            _, body = self.call("PUT", key, headers={"x-amz-copy-source": source, "Content-Length": "0"})
            code = _answer_error(body)
            if code is not None:
                raise S3Error("CopyObject %s: %s" % (self.describe(key), code), code)
            return
        ranges = [(number, offset, min(offset + part_size, size) - 1)
                  for number, offset in enumerate(range(0, size, part_size), 1)]
        with self._upload_session(key) as upload_id:
            with thread_pool(min(workers, len(ranges)), "dogestry-copy") as pool:
                etags = list(pool.map(lambda r: self.copy_part(key, upload_id, r[0], source, r[1], r[2]), ranges))
            self._complete_upload(key, upload_id, [(r[0], etag) for r, etag in zip(ranges, etags)])

    def copy_part(self, key: str, upload_id: str, number: int, source: str,
                  first: Optional[int] = None, last: Optional[int] = None) -> str:
        """UploadPartCopy: part `number` of an upload of key is bytes first..last of source (an
        encoded /bucket/key; all of it without a range); its ETag."""
        headers = {"x-amz-copy-source": source, "Content-Length": "0"}
        if first is not None and last is not None:
            headers["x-amz-copy-source-range"] = "bytes=%d-%d" % (first, last)
        _, body = self.call("PUT", key, query=[("partNumber", str(number)), ("uploadId", upload_id)], headers=headers)
        root = _parse_xml(body)
        etag = _xml_text(root, ".//ETag") if root is not None else None
        if not etag:
            raise S3Error("UploadPartCopy %s part %d: %s" % (self.describe(key), number,
                                                             _answer_error(body) or "no ETag in the answer"))
        return etag

    def head_size(self, key: str) -> Optional[int]:
        """The size of an object, or None if it is absent."""
        resp = self.head(key)
        return None if resp is None else int(resp.getheader("Content-Length") or 0)

    def uploads(self, key: str) -> List[Tuple[str, float]]:
        """(upload id, initiated as Unix time) of the multipart uploads in progress for key."""
        return [(upload_id, initiated) for k, upload_id, initiated in self.uploads_under(key) if k == key]

    def uploads_under(self, prefix: str, pages: int = 100) -> List[Tuple[str, str, float]]:
        """(key, upload id, initiated as Unix time) of the multipart uploads in progress under prefix."""
        found, markers = [], []  # type: List[Tuple[str, str, float]], List[Tuple[str, str]]
        for _ in range(pages):  # pages of ListMultipartUploads
            root = _parse_xml(self.call("GET", query=[("uploads", ""), ("prefix", prefix)] + markers,
                                        cancellable=False)[1])
            if root is None:
                raise S3Error("ListMultipartUploads %s: unreadable answer" % self.describe(prefix))
            for upload in root.findall("Upload"):
                initiated = _iso_time(upload.findtext("Initiated"))
                if upload.findtext("Key") and upload.findtext("UploadId") and initiated is not None:
                    found.append((upload.findtext("Key") or "", upload.findtext("UploadId") or "", initiated))
            if (root.findtext("IsTruncated") or "").lower() != "true":
                break
            markers = [("key-marker", root.findtext("NextKeyMarker") or ""),
                       ("upload-id-marker", root.findtext("NextUploadIdMarker") or "")]
        return found

    def abort_uploads_under(self, prefix: str, before: float, ours: Callable[[str], bool] = lambda key: True) -> int:
        """Abort the uploads of keys under prefix that ours(key) accepts, initiated before
        `before` (abandoned); return how many."""
        stale = [(key, upload_id) for key, upload_id, initiated in self.uploads_under(prefix)
                 if initiated < before and ours(key)]
        for key, upload_id in stale:
            self._abort_upload(key, upload_id)
        return len(stale)

    def abort_uploads(self, key: str, before: Optional[float] = None, since: Optional[float] = None,
                      keep: str = "") -> None:
        """Abort the uploads of key initiated before `before` (abandoned) or since `since` (ours)."""
        with contextlib.suppress(DogestryError):
            for upload_id, initiated in self.uploads(key):
                if upload_id != keep and ((before is not None and initiated < before) or
                                          (since is not None and initiated >= since)):
                    self._abort_upload(key, upload_id)

    def _upload_part(self, key: str, upload_id: str, path: str, part: Tuple[int, int, int], sha256_hex: str,
                     on_progress: Callable[[int], None], piece: Optional[int] = None) -> str:
        """UploadPart of bytes offset..offset+length of a file (read `piece` bytes at a time, if given); its ETag."""
        number, offset, length = part
        resp, _ = self.call("PUT", key, query=[("partNumber", str(number)), ("uploadId", upload_id)],
                            headers={"Content-Length": str(length)},
                            body=lambda: FileRange(path, offset, length, on_progress, self.cancelled, piece),
                            payload_hash=sha256_hex)
        etag = resp.getheader("ETag")
        if not etag:
            raise S3Error("UploadPart %s part %d: no ETag in the answer" % (self.describe(key), number))
        return etag


def part_sha256(path: str, part: Tuple[int, int, int], whole: Any = None) -> str:
    """Hex sha256 of one part (number, offset, length) of a file; `whole`, a hash of the file so
    far, is fed the same bytes (parts are hashed in order)."""
    _, offset, length = part
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            remaining = length
            while remaining:
                data = f.read(min(CHUNK, remaining))
                if not data:
                    raise StoreError("%s shrank while it was uploaded" % path)
                digest.update(data)
                if whole is not None:
                    whole.update(data)
                remaining -= len(data)
    except OSError as e:
        raise StoreError("cannot read %s: %s" % (path, _os_reason(e)))
    return digest.hexdigest()


class FileRange:
    """A read-only window of a file, for request bodies; reports bytes as they are read, and
    stops the request (Interrupted) once `cancelled` is set."""

    def __init__(self, path: str, offset: int, length: int, on_read: Optional[Callable[[int], None]] = None,
                 cancelled: Optional[threading.Event] = None, most: Optional[int] = None):
        self.f = open(path, "rb")
        self.f.seek(offset)
        self.remaining, self.on_read, self.cancelled = length, on_read, cancelled
        self.most = most  # the most one read returns (None: what is asked)

    def read(self, n: int = -1) -> bytes:
        if self.cancelled is not None and self.cancelled.is_set():
            self.f.close()
            raise Interrupted("stopped")
        if self.remaining <= 0:
            self.f.close()
            return b""
        wanted = self.remaining if n is None or n < 0 else min(n, self.remaining)
        data = self.f.read(wanted if self.most is None else min(wanted, self.most))
        self.remaining -= len(data)
        if self.on_read and data:
            self.on_read(len(data))
        if not data or self.remaining <= 0:
            self.f.close()
        return data


class S3Reader(io.RawIOBase):
    """A GET that resumes where it broke (Range from the last byte received) and never returns short."""

    def __init__(self, client: S3Client, key: str, size: Optional[int] = None, start: int = 0,
                 end: Optional[int] = None):
        super().__init__()
        self.client, self.key, self.pos, self.end = client, key, start, end
        self.resp = None  # type: Optional[http.client.HTTPResponse]
        self.expected = None if end is None else end + 1
        self.failures = 0  # breaks so far (AWS_MAX_ATTEMPTS counts them all)
        self.failing_since = None  # type: Optional[float]  # the first break since the last progress

    def readable(self) -> bool:
        return True

    def start(self) -> None:
        """Send the first GET now."""
        self.resp = self._open()

    def _open(self) -> http.client.HTTPResponse:
        resp = self.client.get(self.key, self.pos, self.end)
        if self.pos or self.end is not None:  # a range was asked for: only that range will do
            first = re.match(r"^bytes (\d+)-", resp.getheader("Content-Range") or "")
            if resp.status != 206 or not first or int(first.group(1)) != self.pos:
                self.resp = resp
                self._close_response()
                raise S3Error("GET %s: asked for the bytes from %d on, got HTTP %d with Content-Range %r"
                              % (self.client.describe(self.key), self.pos, resp.status,
                                 (resp.getheader("Content-Range") or "")[:60]))
        if self.expected is None:
            total = resp.getheader("Content-Range", "").rpartition("/")[2]
            self.expected = int(total) if total.isdigit() else self.pos + int(resp.getheader("Content-Length") or 0)
        return resp

    def readinto(self, buffer: Any) -> int:
        import http.client  # lazy (start-up time): only commands that talk HTTP need it
        while True:
            if self.expected is not None and self.pos >= self.expected:
                return 0
            error = None  # type: Optional[BaseException]
            try:
                if self.resp is None:
                    self.resp = self._open()
                n = self.resp.readinto(memoryview(buffer)[:CHUNK])  # progress survives a reset
            except (OSError, http.client.HTTPException) as e:
                n, error = 0, e
            if n:
                self.pos += n
                self.failing_since = None  # progress: the next break gets a fresh time budget
                return n
            # EOF or a broken connection before the expected end: resume with a Range request.
            self._close_response()
            if self.expected is not None and self.pos >= self.expected:
                return 0
            self.failures += 1
            if self.failing_since is None:
                self.failing_since = self.client.clock()
            reason = "the body broke off: %s" % (_os_reason(error) if error else "short body")
            if not self.client._wait_to_retry(self.failures, self.failing_since, reason, self.client.netloc()):
                raise S3Error("GET %s: the body broke off at byte %d of %s (%s)" % (
                    self.client.describe(self.key), self.pos, self.expected, error or "short body"))

    def _close_response(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None
            scheme, host, port, _ = self.client._target()
            self.client._drop(scheme, host, port)

    def close(self) -> None:
        if self.resp is not None and not self.resp.isclosed():
            self._close_response()
        super().close()


class ParallelRangeReader(io.RawIOBase):
    """Reads a large object as parallel ranged GETs, in order, with a bounded window in memory."""

    def __init__(self, client: S3Client, key: str, size: int, workers: int = 4, piece: int = S3_RANGE):
        super().__init__()
        self.pool = thread_pool(workers, "dogestry-get")
        self.ranges = collections.deque((off, min(off + piece, size) - 1) for off in range(0, size, piece))
        self.client, self.key = client, key
        self.window = collections.deque()  # type: collections.deque
        self.piece, self.offset, self.workers = b"", 0, workers
        self._fill()

    def _fetch(self, start: int, end: int) -> bytes:
        piece = bytearray(end - start + 1)  # read straight into place: no growing copies
        view, got = memoryview(piece), 0
        with contextlib.closing(S3Reader(self.client, self.key, None, start, end)) as r:
            while got < len(piece):
                n = r.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != len(piece):
            raise S3Error("GET %s: range %d-%d came back short" % (self.client.describe(self.key), start, end))
        return piece  # type: ignore

    def _fill(self) -> None:
        while self.ranges and len(self.window) < max(1, self.workers - 1):  # + the piece being read
            start, end = self.ranges.popleft()
            self.window.append(self.pool.submit(self._fetch, start, end))

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.offset >= len(self.piece):
            self.piece = b""  # let the spent piece go before the next one is waited for
            if not self.window:
                return 0
            self.piece, self.offset = self.window.popleft().result(), 0
            self._fill()
        n = min(len(buffer), len(self.piece) - self.offset)
        buffer[:n] = memoryview(self.piece)[self.offset:self.offset + n]
        self.offset += n
        return n

    def close(self) -> None:
        for future in self.window:
            future.cancel()
        self.pool.shutdown(wait=True)
        self.piece = b""
        super().close()


class S3Store(Store):
    """A store in an S3 bucket under a key prefix."""

    def __init__(self, location: S3Location, client: S3Client, workers: int = 4):
        self.location, self.client, self.workers = location, client, workers
        self.url = "s3://%s/%s" % (location.bucket, location.prefix)

    def _key(self, key: str) -> str:
        return self.location.prefix + check_key(key)

    def kind(self) -> str:
        return "S3 bucket %s, region %s, %s" % (self.location.bucket, self.client.region,
                                                  self.client.endpoint or "AWS endpoint")

    def check(self) -> None:
        self.client.check_bucket()

    def ensure(self) -> None:
        self.client.check_bucket()

    def cancel(self, interrupted: bool = False) -> None:
        self.client.cancel(interrupted)

    def open_range(self, key: str, first: int, last: int) -> BinaryIO:
        return io.BufferedReader(S3Reader(self.client, self._key(key), None, first, last), CHUNK)  # type: ignore

    def bucket_root(self) -> Optional[Store]:
        if not self.location.prefix:
            return None
        return S3Store(self.location._replace(prefix=""), self.client, self.workers)

    def stat(self, key: str) -> Optional[int]:
        resp = self.client.head(self._key(key))
        return None if resp is None else int(resp.getheader("Content-Length") or 0)

    def open(self, key: str, size: Optional[int] = None) -> BinaryIO:
        if size is not None and size > S3_SINGLE_PUT_MAX:
            return io.BufferedReader(ParallelRangeReader(self.client, self._key(key), size, self.workers), CHUNK)  # type: ignore
        reader = S3Reader(self.client, self._key(key))
        reader.start()  # a missing key raises NotFound here, not at the first read
        return io.BufferedReader(reader, CHUNK)  # type: ignore

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        self.client.put(self._key(key), lambda: data, len(data), hashlib.sha256(data).hexdigest(), if_absent)

    def put_file(self, key: str, path: str, size: int, digest: Optional[str] = None,
                 on_progress: Callable[[int], None] = lambda n: None, if_absent: bool = False,
                 consume: bool = False) -> bool:
        if size > S3_SINGLE_PUT_MAX:
            if if_absent and self.stat(key) == size:
                return False
            self.client.multipart_upload(self._key(key), path, size, self.workers, on_progress)
            return True
        sha = digest_hex(digest) if digest else file_sha256(path)
        return self.client.put(self._key(key), lambda: FileRange(path, 0, size, on_progress, self.client.cancelled),
                               size, sha, if_absent)

    def put_verified(self, key: str, path: str, size: int, digest: str, on_progress: Callable[[int], None]) -> None:
        """Store a file someone else wrote as blob `digest`, checked as it goes (IntegrityError, and
        nothing stored, if it is not): one PUT up to S3_VERIFIED_PUT_MAX, whose payload S3 checks
        against the digest (nothing is hashed here); above, the file is hashed as a whole with its
        parts, and the multipart upload completed only if it is the blob."""
        if size > S3_VERIFIED_PUT_MAX:
            self.client.multipart_upload(self._key(key), path, size, self.workers, on_progress, digest)
            return
        try:
            self.client.put(self._key(key), lambda: FileRange(path, 0, size, on_progress, self.client.cancelled),
                            size, digest_hex(digest))
        except S3Error as e:
            if e.code == "XAmzContentSHA256Mismatch":
                raise IntegrityError("%s is not blob %s; nothing was stored" % (path, digest))
            raise

    def list(self, prefix: str) -> Iterator[str]:
        return (key for key, _ in self.list_sizes(prefix))

    def stores_below(self, looks: int) -> Tuple[List[str], int]:
        prefixes = self.client.child_prefixes(self.location.prefix)

        def holds_store(prefix: str) -> bool:  # one listing of at most one key
            return next(self.client.list_ages(prefix + "repositories/", page_size=1), None) is not None

        with thread_pool(min(looks, max(1, len(prefixes))), "dogestry-hint") as pool:
            held = list(pool.map(holds_store, prefixes[:looks]))
        start = len(self.location.prefix)
        return [p[start:] for p, yes in zip(prefixes, held) if yes], len(prefixes)

    def list_sizes(self, prefix: str) -> Iterator[Tuple[str, int]]:
        start = len(self.location.prefix)
        return iter(sorted((k[start:], size) for k, size in self.client.list(self.location.prefix + prefix)))

    def delete(self, key: str) -> None:
        self.client.call("DELETE", self._key(key), ok=(204, 200))

    def read_versioned(self, key: str) -> Tuple[bytes, str]:
        return self.client.get_versioned(self._key(key))

    def put_if_version(self, key: str, data: bytes, version: Optional[str]) -> bool:
        return self.client.put_if_match(self._key(key), data, version)

    def delete_if_version(self, key: str, version: str) -> bool:
        return self.client.delete_if_match(self._key(key), version)

    def delete_many(self, keys: Sequence[str], racing_writes_win: bool = False) -> None:
        self.client.delete_many([self._key(k) for k in keys], racing_writes_win)

    def list_entries(self, prefix: str) -> Iterator[StoreEntry]:
        start = len(self.location.prefix)
        for key, size, age, etag in self.client.list_ages(self.location.prefix + prefix):
            yield StoreEntry(key[start:], size, age, etag)

    def age(self, key: str) -> Optional[float]:
        return self.client.age(self._key(key))

    def touch(self, key: str) -> bool:
        return self.client.copy_in_place(self._key(key))

    def sweep_leftovers(self, older_than: float, ours: Callable[[str], bool]) -> int:
        """Multipart uploads of the caller's keys under the prefix that killed pushes left (S3
        charges for their parts)."""
        start = len(self.location.prefix)
        return self.client.abort_uploads_under(self.location.prefix, self.client.now() - older_than,
                                               lambda key: ours(key[start:]))


class PresignedS3Store(S3Store):
    """The objects of one pull, read through URLs their owner presigned: no keys, no writes."""

    def __init__(self, location: S3Location, client: S3Client, sizes: Mapping[str, int]):
        super().__init__(location, client)
        self.sizes = dict(sizes)

    def check(self) -> None:
        pass

    def stat(self, key: str) -> Optional[int]:
        return self.sizes.get(check_key(key))

    def list_sizes(self, prefix: str) -> Iterator[Tuple[str, int]]:
        return iter(sorted((k, n) for k, n in self.sizes.items() if k.startswith(prefix)))

    def _refuse(self, *args: Any, **kw: Any) -> None:
        raise StoreError("%s: presigned objects are read-only" % self.url)

    put_bytes = put_file = delete = delete_many = touch = put_if_version = delete_if_version = _refuse  # type: ignore


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in CHUNK pieces."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(CHUNK), b""):
            sha.update(data)
    return sha.hexdigest()


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")       # RFC 3986 section 3.1
_SCHEME_WITHOUT_COLON = re.compile(r"^(s3|file|https?)//", re.IGNORECASE)


def open_store(url: str, s3: Optional[Callable[[S3Location], Store]] = None) -> Store:
    """A store from a directory path, file:///path, or s3://bucket/prefix/ (built by the s3 factory).

    A location that starts with a URL scheme (`s3:`, `http:`, `foo:`) is a URL, and one that is
    not s3://... or file:///... is refused: a directory whose name looks like that is ./NAME."""
    if not url:
        raise UsageError("empty store location")
    match = _URL_SCHEME.match(url)
    if match is None:
        typo = _SCHEME_WITHOUT_COLON.match(url)
        if typo:
            raise UsageError("invalid store URL %r: did you mean %s:%s? (a directory of that name is given as ./%s)"
                             % (url, typo.group(1), url[len(typo.group(1)):], url))
        return LocalStore(url)
    scheme, rest = match.group(1).lower(), url[match.end():]
    if scheme == "file" and rest.startswith("/"):  # file:///path, file://localhost/path, file:/path (RFC 8089)
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise UsageError("file:// store URLs must be local: file:///path (got %r)" % url)
        return LocalStore(urllib.parse.unquote(parsed.path) or "/")
    if scheme == "s3" and rest.startswith("//"):
        location = parse_s3_url(url)
        if s3 is None:
            raise UsageError("s3:// stores need AWS settings here")
        return s3(location)
    raise UsageError("%s store URL %r: %s (a directory whose name starts with %r is given as ./%s)"
                     % ("invalid" if scheme in ("s3", "file") else "unsupported", url,
                        _STORE_FORMS.get(scheme, _STORE_FORMS[""]), match.group(0), url))


_STORE_FORMS = {
    "s3": "an S3 store is s3://bucket/prefix/",
    "file": "a file: URL names an absolute path, file:///path",
    "http": "S3 over HTTP is s3://bucket/prefix/?endpoint=http://HOST:PORT (or AWS_ENDPOINT_URL)",
    "https": "S3 over HTTPS is s3://bucket/prefix/?endpoint=https://HOST (or AWS_ENDPOINT_URL)",
    "": "a store is a directory, file:///path or s3://bucket/prefix/",
}


# === 9. Store layout: tags, images, layers ===
#
#   repositories/<name>/<tag>      the image ID (64 hex), as the original dogestry wrote it
#   images/<id>/config.json        the image config, byte for byte (its sha256 is the ID)
#   images/<id>/manifest.json      the layers in order; written after all of them are stored
#   layers/<diff-id hex>.json      which blob holds a layer (the dedup index)
#   blobs/sha256/<hex>             a layer as stored (gzip or raw), named by its own digest; for a
#                                  chunked layer, its recipe (below)
#   chunks/sha256/<hex>            a piece of some chunked layers' file contents, named by the sha256
#                                  of its bytes: one gzip member of them, or (as big as they are) the bytes
#
#   gc/untagged/<id>               an image rm, prune or a push took a tag from (gc spares it
#                                  for the grace period: pulls that read the tag before may need it)
#   gc/protected/<name>/<tag>      a tag prune never removes: empty, or {"immutable": true} for a
#                                  tag no push may move to other content (older versions: protected)
#   images/<v1-id>/migrated        `migrate --keep-legacy`: the image ID (64 hex) of the same image
#                                  in this layout (the tag keeps the v1 id for the original tool)
#   uploads/<32 hex>/{state.json,data,tail}  a blob upload session of the registry API (section 17)
#
# A chunked layer (push and import cut layers of at least CHUNKED_LAYER_MIN bytes) is stored as
# its recipe: a gzip member holding one line of JSON (RECIPE_MEDIA_TYPE: the diffID, the size,
# "chunks": [[hex, size], ...] and "runs": byte counts that alternate metadata, content,
# metadata ...), then a gzip member holding the metadata bytes (tar headers, padding, the end of
# the archive).  The tar is the runs in order: metadata from the second member, content from the
# chunks in order, so files' contents are shared by every layer holding them, whatever their
# headers say (section 11).  Its layer record says "compression": "chunked" (older versions
# refuse such a record as malformed: they never read a recipe as a layer).
#
# The original (Go) layout is read too: images/<v1-id>/{json,layer.tar,VERSION},
# chained by "parent", with repositories/<name>/<tag> naming the top v1 id.
#
# gc (section 14) deletes what no tag reaches once it is older than a grace period; an
# object's age is the store's own (S3's Last-Modified against S3's Date, or a file's mtime).
# A push keeps what it relies on young until its tag is written (Freshness, below).

MANIFEST_MEDIA_TYPE = "application/vnd.dogestry.image.v2+json"
UNTAGGED_PREFIX = "gc/untagged/"
PROTECTED_PREFIX = "gc/protected/"
IMAGE_LEAVES = ("config.json", "manifest.json", "migrated", "json", "layer.tar", "VERSION")  # ours, the original's

# The keys gc may delete, exactly: anything else under its prefixes is someone else's (a README,
# a store nested in this one, such as s3://bucket/layers/ inside s3://bucket/) and is left alone.
_GC_KEY = re.compile(r"^(?:images/[0-9a-f]{64}/(?:%s)|layers/[0-9a-f]{64}\.json|blobs/sha256/[0-9a-f]{64}"
                     r"|chunks/sha256/[0-9a-f]{64}|gc/untagged/[0-9a-f]{64}|uploads/[0-9a-f]{32}/(?:state\.json|data|tail)|manifests/sha256/[0-9a-f]{64}"
                     r"|manifests/referrers/[0-9a-f]{64}/[0-9a-f]{64}|manifests/tags/%s(?:/%s)*/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$"
                     % ("|".join(re.escape(leaf) for leaf in IMAGE_LEAVES), _NAME_COMPONENT, _NAME_COMPONENT))
# Where dogestry's killed writes leave temp files (a directory store) and multipart uploads (S3).
_GC_LEFTOVER = re.compile(r"^(?:blobs/sha256|chunks/sha256|layers|gc/untagged|images/[0-9a-f]{64}|uploads/[0-9a-f]{32})/[^/]+$")


def gc_owns(key: str) -> bool:
    """Is key of one of the exact shapes gc may delete?"""
    return bool(_GC_KEY.match(key))


def gc_leftover(path: str) -> bool:
    """Is path (a temp file's, a multipart upload's key) in one of the places dogestry writes keys?"""
    return bool(_GC_LEFTOVER.match(path))

GC_MIN_GRACE = 600.0      # the shortest grace gc accepts; pushes rely on it (DOGESTRY_GC_MIN_GRACE: tests)
GC_MIN_GRACE_FLOOR = 10.0  # ... and the shortest DOGESTRY_GC_MIN_GRACE
GC_RECHECK_WINDOW = 0.5   # gc sends a delete at most this long after the requests that re-checked its keys
PUSH_SETTLE = 1.0         # after refreshing old objects a push waits this long before checking they are there


def gc_min_grace(environ: Mapping[str, str]) -> float:
    """The shortest grace period gc accepts, which pushes rely on: GC_MIN_GRACE, or (for tests)
    DOGESTRY_GC_MIN_GRACE seconds -- every push and gc on a store must then see the same value."""
    text = environ.get("DOGESTRY_GC_MIN_GRACE", "")
    if not text:
        return GC_MIN_GRACE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not GC_MIN_GRACE_FLOOR <= value < 1e9:
        raise UsageError("DOGESTRY_GC_MIN_GRACE=%s is not a number of seconds of at least %g"
                         % (text, GC_MIN_GRACE_FLOOR))
    return value


class Freshness:
    """When each object a push relies on might come within reach of a gc, so the push refreshes
    what needs it and no more.

    gc deletes nothing younger than its grace G (at least min_grace) and stops after G/2.  An
    object younger than min_grace/2 when the tag is written is therefore safe from every gc:
    one that read the tags before the tag was written ends before the object is G old, and
    later ones see the tag.  So a push refreshes what is older than that, early (hiding the
    wait below behind its work) and again before the tag if the push took long.
    The race it closes: a gc re-checks an old object, a push refreshes and checks it, the gc's
    delete lands, the push writes its tag.  gc sends its deletes within GC_RECHECK_WINDOW of
    the re-check; a push checks no sooner than PUSH_SETTLE after its last refresh, so the
    check sees any such delete.
    """

    def __init__(self, store: "Store", min_grace: float = GC_MIN_GRACE, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, command: str = "push"):
        self.store, self.min_grace, self.clock, self.sleep = store, min_grace, clock, sleep
        self.command = command  # what the user ran (push, import, copy, migrate): errors name it
        self.started = clock()
        self.safe_until = {}  # type: Dict[str, float]  # key -> monotonic time it may become gc-able
        self.refreshed_at = None  # type: Optional[float]
        self.check_at_secure = set()  # type: Set[str]  # keys secure() checks even if no caller names them

    def seen(self, key: str, age: Optional[float]) -> None:
        """An object the push will rely on, as old as that when it was looked at."""
        until = self.clock() + self.min_grace - (age if age is not None else self.min_grace)
        self.safe_until[key] = min(until, self.safe_until.get(key, until))

    def written(self, key: str) -> None:
        """An object the push has just written."""
        self.safe_until[key] = self.clock() + self.min_grace

    def relied_on(self, key: str, age: float) -> None:
        """seen(), for an object no later step names (a chunk): secure() checks it is still
        there if it may have been near a gc's reach (older than a quarter of the grace)."""
        self.seen(key, age)
        if age > self.min_grace / 4:
            self.check_at_secure.add(key)

    def refreshed(self) -> None:
        """The push refreshed an object on its own: check no sooner than PUSH_SETTLE from now."""
        self.refreshed_at = self.clock()

    def refresh(self, within: float, rewrite: Mapping[str, Callable[[], None]]) -> None:
        """Refresh every object that may come within a gc's reach in the next `within` seconds
        (rewrite[key]() where it is gone; IntegrityError where it is gone and cannot be)."""
        deadline = self.clock() + within
        stale = sorted(k for k, until in self.safe_until.items() if until < deadline)
        if not stale:
            return

        def refresh_one(key: str) -> None:
            if not self.store.touch(key):
                if key not in rewrite:
                    raise self.deleted(key)
                rewrite[key]()

        self.refreshed()
        with thread_pool(min(8, len(stale)), "dogestry-refresh") as pool:
            list(pool.map(refresh_one, stale))
        for key in stale:
            self.written(key)

    def secure(self, rewrite: Mapping[str, Callable[[], None]], must_exist: Mapping[str, Optional[int]]) -> None:
        """Before a tag: refresh what may be within a gc's reach by then, wait out a gc delete
        that may be on its way, then check every must_exist key is there with its size (None:
        any size; IntegrityError if one is not)."""
        self.refresh(self.min_grace / 2, rewrite)
        if self.refreshed_at is not None:
            self.sleep(max(0.0, self.refreshed_at + PUSH_SETTLE - self.clock()))
        checked = {**{k: None for k in self.check_at_secure}, **must_exist}  # type: Dict[str, Optional[int]]
        keys = sorted(checked)
        with thread_pool(min(8, max(1, len(keys))), "dogestry-check") as pool:
            sizes = list(pool.map(self.store.stat, keys))
        for key, size in zip(keys, sizes):
            expected = checked[key]
            if size is None:
                raise self.deleted(key)
            if expected is not None and size != expected:
                raise IntegrityError("%s: %s is %d bytes, not the %d this %s relied on (changed by hand?); nothing "
                                     "was tagged: run the %s again" % (self.store.url, key, size, expected,
                                                                       self.command, self.command))

    def deleted(self, key: str) -> IntegrityError:
        """The error for an object the command relied on that is gone.  A gc cannot have taken it
        unless the command ran longer than half of gc's shortest grace: only then is that said."""
        ran = self.clock() - self.started
        why = ""
        if ran > self.min_grace / 2:
            why = (" (this %s ran %.0f s, longer than half of the shortest grace period gc takes, %s: a gc "
                   "that ran meanwhile may have reached it)" % (self.command, ran, human_duration(self.min_grace)))
        return IntegrityError("%s: %s was deleted while this %s relied on it (by a gc or by hand)%s; nothing was "
                              "tagged: run the %s again" % (self.store.url, key, self.command, why, self.command))


def tag_key(ref: ImageRef) -> str:
    return "repositories/%s/%s" % (ref.name, ref.tag)


def protection_key(ref: ImageRef) -> str:
    """The marker of a tag prune never removes (and rm removes only with --force)."""
    return PROTECTED_PREFIX + "%s/%s" % (ref.name, ref.tag)


IMMUTABLE_MARKER = b'{"immutable": true}'  # a protection marker's content for an immutable tag


def tag_is_immutable(store: Store, ref: ImageRef) -> bool:
    """Is a tag protected with `protect --immutable` (its marker holds {"immutable": true})?"""
    try:
        data = store.get_bytes(protection_key(ref), limit=4096)
    except NotFound:
        return False
    try:
        doc = json.loads(data.decode("utf-8")) if data.strip() else None
    except ValueError:  # UnicodeDecodeError too: a marker of someone else's making only protects
        return False
    return isinstance(doc, dict) and doc.get("immutable") is True


def check_tag_may_move(store: Store, ref: ImageRef, target: str, same: Sequence[str] = ()) -> None:
    """TagImmutable if writing `target` (an image hex, or `@sha256:<hex>`) to an immutable tag would
    change what it names; the same content again, or one of `same` (other names of that image), is fine."""
    if not tag_is_immutable(store, ref):
        return
    try:
        text = store.get_bytes(tag_key(ref), limit=4096).decode("ascii", "replace").strip()
    except NotFound:
        return  # no tag: nothing to move
    current = text[7:] if text.startswith("sha256:") else text
    if current == target or current in same:
        return

    def shown(content: str) -> str:
        return content[:12] if _HEX64.match(content) else printable(content[:80])

    raise TagImmutable("%s is immutable in %s: it names %s, and this would move it to %s; run 'dogestry unprotect "
                       "%s %s' first to move it" % (printable(str(ref)), store.url, shown(current), shown(target),
                                                    store.url, printable(str(ref))))


def image_key(image_hex: str, leaf: str) -> str:
    return "images/%s/%s" % (image_hex, leaf)


def layer_index_key(diff_id: str) -> str:
    return "layers/%s.json" % digest_hex(diff_id)


def blob_key(digest: str) -> str:
    return "blobs/sha256/" + digest_hex(digest)


CHUNK_PREFIX = "chunks/sha256/"


def chunk_key(chunk_hex: str) -> str:
    """Where a chunk of file contents is stored (its hex: the sha256 of its bytes)."""
    return CHUNK_PREFIX + chunk_hex


class LayerRecord(NamedTuple):
    """One layer as stored: its diffID, the blob holding it, and how that blob is encoded."""

    diff_id: str
    digest: str
    size: int
    compression: str  # "gzip", "zstd", "none", or "chunked" (the blob is the layer's recipe)
    raw_size: Optional[int] = None  # size of the uncompressed tar, when known (always, if chunked)
    members: Optional[Tuple[int, ...]] = None  # a gzip blob's independent members, their sizes in order
    unchecked: bool = False  # the diffID is a client's word, not checked against the blob (a registry push)

    def to_json(self) -> Dict[str, Any]:
        doc = {"diffID": self.diff_id, "digest": self.digest, "size": self.size,
               "compression": self.compression}  # type: Dict[str, Any]
        if self.raw_size is not None:
            doc["rawSize"] = self.raw_size
        if self.members:
            doc["members"] = list(self.members)
        if self.unchecked:
            doc["unchecked"] = True
        return doc

    @property
    def checked(self) -> bool:
        """Was the layer's diffID checked against the blob's unpacked bytes when it was stored?
        Only such a record may be a layer index entry (the layer index rule, below): a zstd blob
        cannot be unpacked here, and a layer pushed through the registry API is not unpacked, so
        their diffID is only the word of the image config naming them."""
        return not self.unchecked and self.compression != "zstd"

    @property
    def chunked(self) -> bool:
        """Is the layer stored as a recipe of chunks (its blob: the recipe)?"""
        return self.compression == "chunked"

    @property
    def tar_digest(self) -> str:
        """The digest of the layer as the registry API, export and copy hand it out: the stored
        blob, or for a chunked layer its uncompressed tar (the diffID: a recipe is no layer)."""
        return self.diff_id if self.chunked else self.digest

    @property
    def tar_size(self) -> int:
        """The size of what tar_digest names."""
        return self.raw_size or 0 if self.chunked else self.size

    @classmethod
    def from_json(cls, doc: Any, what: str = "a layer record") -> "LayerRecord":
        check_shape(doc, LAYER_RECORD_SHAPE, what)
        members = doc.get("members")
        record = cls(doc["diffID"], doc["digest"], doc["size"], doc["compression"], doc.get("rawSize"),
                     None if members is None else tuple(members), bool(doc.get("unchecked")))
        if record.members is not None and (record.compression != "gzip" or sum(record.members) != record.size):
            raise FormatError("%s is malformed: its gzip members do not add up to its blob" % what)
        if record.chunked and (record.raw_size is None or record.unchecked):
            raise FormatError("%s is malformed: a chunked layer without its size, or unchecked" % what)
        return record


# layers/<diffID>.json, and each of images/<id>/manifest.json's layers (what LayerRecord.to_json writes)
LAYER_RECORD_SHAPE = {"diffID": DIGEST, "digest": DIGEST, "size": SIZE, "compression": one_of("gzip", "zstd", "none", "chunked"),
                      "rawSize?": OrNull(SIZE), "members?": OrNull([Check("a size above 0", lambda v: type(v) is int
                                                                          and v > 0)]), "unchecked?": bool}
STORED_MANIFEST_SHAPE = {"config": {"digest": DIGEST, "size": SIZE}, "layers": [{}]}  # layers: LayerRecord.from_json
# images/<v1-id>/json of the original layout: what its reader uses (the rest goes into a config as it is)
V1_JSON_SHAPE = {"parent?": OrNull(str), "created?": OrNull(str), "author?": OrNull(str), "comment?": OrNull(str),
                 "container_config?": OrNull({"Cmd?": OrNull([str])})}


RECIPE_MEDIA_TYPE = "application/vnd.dogestry.layer.recipe.v1+json"
CHUNK_MAX = 2 << 20  # the most bytes a chunk holds (unpacked)
CHUNK_OBJECT_MAX = CHUNK_MAX + (CHUNK_MAX >> 6) + 4096  # the most bytes a chunk object is read with: a gzip
                                                        # member of CHUNK_MAX incompressible bytes and more
RECIPE_HEADER_LIMIT = 64 << 20  # the largest recipe JSON line read (some 700,000 files' runs)


class LayerRecipe(NamedTuple):
    """How a chunked layer's tar is made: runs of metadata and content bytes, in turn, and the
    chunks (sha256 hex, size) the content runs take their bytes from, in order."""

    diff_id: str
    size: int
    chunks: List[Tuple[str, int]]
    runs: List[int]  # byte counts: metadata, content, metadata, ... (metadata first, maybe 0)

    @property
    def metadata_size(self) -> int:
        """The bytes of the runs that are metadata (kept in the recipe)."""
        return sum(self.runs[0::2])

    def header(self) -> bytes:
        """The recipe's JSON line."""
        return json.dumps({"mediaType": RECIPE_MEDIA_TYPE, "diffID": self.diff_id, "size": self.size,
                           "chunks": [list(c) for c in self.chunks], "runs": self.runs},
                          separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_header(cls, data: bytes, what: str) -> "LayerRecipe":
        """A recipe from its JSON line (FormatError unless its parts add up)."""
        doc = parse_json(data, what, {"mediaType": one_of(RECIPE_MEDIA_TYPE), "diffID": DIGEST, "size": SIZE,
                                      "chunks": list, "runs": list})
        chunks, runs = doc["chunks"], doc["runs"]
        if not all(type(c) is list and len(c) == 2 and isinstance(c[0], str) and _HEX64.match(c[0])
                   and type(c[1]) is int and 0 < c[1] <= CHUNK_MAX for c in chunks):
            raise FormatError("%s is malformed: a chunk is not [sha256 hex, size of at most %s]"
                              % (what, human_size(CHUNK_MAX)))
        if not all(type(n) is int and n >= 0 for n in runs) or sum(runs) != doc["size"] \
                or sum(runs[1::2]) != sum(c[1] for c in chunks):
            raise FormatError("%s is malformed: its runs do not add up to its size and chunks" % what)
        return cls(doc["diffID"], doc["size"], [(c[0], c[1]) for c in chunks], runs)


class StoredImage(NamedTuple):
    """An image as the store describes it; legacy images carry their v1 chain instead."""

    image_id: str            # 'sha256:<hex>' (new layout) or the top v1 id (legacy)
    layers: List[LayerRecord]
    legacy_chain: List[str]  # v1 ids, bottom first (legacy only)
    config_size: int = 0     # the size of config.json (new layout)

    @property
    def legacy(self) -> bool:
        return bool(self.legacy_chain)


def read_json(store: Store, key: str, shape: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A stored JSON object (at most DOCUMENT_LIMIT bytes) of the shape (check_shape; default: any object)."""
    return parse_json(store.get_bytes(key, limit=DOCUMENT_LIMIT), "%s: %s" % (store.url, key), shape or {})


def json_document(doc: Any) -> bytes:
    """A JSON document as stored (sorted keys, so equal documents are equal bytes)."""
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def write_json(store: Store, key: str, doc: Any, if_absent: bool = False) -> None:
    """Store a JSON document as json_document() writes it."""
    store.put_bytes(key, json_document(doc), if_absent)


# The layer index rule.  layers/<diffID>.json is what every later push, import and copy trusts
# without reading the blob: a layer the index names is never uploaded again.  So an entry is
# written only for a layer whose diffID was checked against the blob's own unpacked bytes (a raw
# tar hashed, a gzip blob unpacked and hashed: LayerRecord.checked), and only such entries are
# trusted (stored_layer).  A layer that cannot be checked here (zstd) is stored under its blob
# digest and named only by the manifest of the image it came with; a pull of that image checks
# it (the engine unpacks it against the config's diffIDs), and a later push of the same layer
# stores a checked copy of its own.


def relied_key(record: LayerRecord) -> str:
    """The key an operation that stores an image with this layer keeps young until the tag:
    its index entry, or for a layer without one (unchecked), its blob."""
    return layer_index_key(record.diff_id) if record.checked else blob_key(record.digest)


def name_layer(store: Store, record: LayerRecord, freshness: "Freshness") -> None:
    """Write a stored layer's index entry, if the layer rule allows one (see above)."""
    if record.checked:
        write_json(store, layer_index_key(record.diff_id), record.to_json())
    freshness.written(relied_key(record))


MANIFEST_TAG = "@sha256:"  # a tag's content for a manifest pushed through the registry that is no single image


class NotAnImage(FormatError):
    """A tag names a manifest that is no single image (an index, an artifact)."""


class TagTarget(NamedTuple):
    """What a tag names: an image (its ID hex), or a manifest pushed through the registry API
    that is no single image (an index, an artifact: 'sha256:<hex>')."""

    image_hex: Optional[str]
    manifest: Optional[str] = None


def read_tag_target(store: Store, ref: ImageRef) -> TagTarget:
    """What a tag names (NotFound if the tag is absent)."""
    try:
        data = store.get_bytes(tag_key(ref), limit=4096)
    except NotFound:
        raise NotFound("%s not found in %s" % (ref, store.url))
    return tag_target_of(store, ref, data)


def tag_target_of(store: Store, ref: ImageRef, data: bytes) -> TagTarget:
    """What a tag's content names (FormatError if it names nothing)."""
    text = data.decode("ascii", "replace").strip()
    if text.startswith(MANIFEST_TAG) and _HEX64.match(text[len(MANIFEST_TAG):]):
        return TagTarget(None, text[1:])
    hexpart = text[7:] if text.startswith("sha256:") else text
    if not _HEX64.match(hexpart):
        raise FormatError("%s: tag %s holds %r, not an image id" % (store.url, ref, text[:80]))
    return TagTarget(hexpart)


def read_tag(store: Store, ref: ImageRef) -> str:
    """The image hex a tag points to (NotFound if the tag is absent; NotAnImage if it names an
    index or an artifact)."""
    target = read_tag_target(store, ref)
    if target.image_hex is None:
        raise NotAnImage("%s: %s names %s, pushed through the registry API, which is no single image (an image "
                         "index or an artifact)" % (store.url, ref, target.manifest))
    return target.image_hex


TAG_READERS = 8  # tag files read at once by list/inspect/remote: one request each on S3


def list_tag_targets(store: Store) -> List[Tuple[ImageRef, TagTarget]]:
    """Every tag in the store and what it names, in key order (by name, then tag); unreadable
    tags are left out."""
    refs = []
    for key in store.list("repositories/"):
        name, _, tag = key[len("repositories/"):].rpartition("/")
        if name:
            refs.append(ImageRef(name, tag))

    def read(ref: ImageRef) -> Optional[Tuple[ImageRef, TagTarget]]:
        try:
            return ref, read_tag_target(store, ref)
        except DogestryError:
            return None

    with thread_pool(min(TAG_READERS, len(refs)), "dogestry-tags") as pool:
        return [r for r in pool.map(read, refs) if r is not None]


def list_tags(store: Store) -> List[Tuple[ImageRef, str]]:
    """Every (ref, image hex) of the tags that name images, in key order (by name, then tag)."""
    return [(ref, target.image_hex) for ref, target in list_tag_targets(store) if target.image_hex is not None]


# Platforms and image indexes.  A tag that holds @sha256:<hex> of an image index (OCI image
# index, Docker manifest list) names one image per platform: each a manifest kept byte for byte
# under manifests/sha256/ (section 16) whose config has its image record as any image has.  A
# command that needs one image of such a tag picks the one for a platform: the engine's (GET
# /version), or --platform os/arch[/variant].  Matching follows the OCI image index spec's
# platform fields, with containerd's defaults for variants (arm64 is v8, arm v7, amd64 v1) and
# the variants a CPU runs besides its own (arm v7 runs v6 and v5; amd64 v3 runs v2 and v1).

ARCH_ALIASES = {"x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "aarch64": ("arm64", ""),
                "armhf": ("arm", "v7"), "armel": ("arm", "v6"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
                "i386": ("386", ""), "i686": ("386", "")}
DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7", "amd64": "v1"}
_RUNS_VARIANTS = {"arm": ("v8", "v7", "v6", "v5"), "amd64": ("v4", "v3", "v2", "v1")}  # newest first
_PLATFORM_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


class Platform(NamedTuple):
    """An image's platform as an OCI image index names it: os/architecture[/variant]."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in self if p)

    def normalized(self) -> "Platform":
        """The same platform with the architecture's default variant spelled out (arm64 is arm64/v8)."""
        return self._replace(variant=self.variant or DEFAULT_VARIANTS.get(self.architecture, ""))


def make_platform(os_name: str, architecture: str, variant: str = "") -> Platform:
    """A platform with the architecture's other spellings (x86_64, aarch64, armhf) made OCI's."""
    architecture, implied = ARCH_ALIASES.get(architecture.lower(), (architecture.lower(), ""))
    return Platform(os_name.lower(), architecture, (variant or implied).lower())


def parse_platform(text: str) -> Platform:
    """--platform os/arch[/variant] (an architecture alone means linux/ARCH)."""
    parts = text.strip().lower().split("/")
    if len(parts) == 1 and parts[0]:
        parts = ["linux"] + parts
    if not 2 <= len(parts) <= 3 or not all(_PLATFORM_PART.match(p) for p in parts):
        raise UsageError("invalid platform %r: expected os/arch[/variant], such as linux/amd64 or linux/arm64"
                         % printable(text[:100]))
    return make_platform(*parts)


def config_platform(config: Mapping[str, Any]) -> Platform:
    """The platform an image config names (os, architecture, variant); unknown parts are empty."""
    def field(name: str) -> str:
        value = config.get(name)
        return value if isinstance(value, str) and _PLATFORM_PART.match(value.lower()) else ""
    return make_platform(field("os"), field("architecture"), field("variant"))


def descriptor_platform(descriptor: Mapping[str, Any]) -> Optional[Platform]:
    """The platform an index's descriptor names, if it names one."""
    platform = descriptor.get("platform")
    if not isinstance(platform, dict):
        return None
    return config_platform(platform)


def platform_fits(wanted: Platform, offered: Platform) -> Optional[int]:
    """How well an image of `offered` runs where `wanted` is asked: 0 exactly, more for older
    variants of the architecture, None if it cannot."""
    want, have = wanted.normalized(), offered.normalized()
    if (want.os, want.architecture) != (have.os, have.architecture):
        return None
    if want.variant == have.variant:
        return 0
    order = _RUNS_VARIANTS.get(want.architecture, ())
    if want.variant in order and have.variant in order and order.index(have.variant) > order.index(want.variant):
        return order.index(have.variant) - order.index(want.variant)
    return None


class IndexEntry(NamedTuple):
    """One image of an image index: its manifest's digest, media type and size, and its platform."""

    digest: str
    media_type: str
    size: int
    platform: Platform


ATTESTATION_ANNOTATION = "vnd.docker.reference.type"  # buildx's attestation manifests in an index
ATTESTED_ANNOTATION = "vnd.docker.reference.digest"   # ... and the manifest each is about


def index_images(index: "PushedManifest") -> List[IndexEntry]:
    """The images an index names, in its order: entries with a platform, no attestations, no nested indexes."""
    entries = []
    for descriptor in index.doc["manifests"]:
        platform = descriptor_platform(descriptor)
        annotations = descriptor.get("annotations") or {}
        if platform is None or platform.os in ("", "unknown") or ATTESTATION_ANNOTATION in annotations or \
                descriptor["mediaType"] in INDEX_TYPES:
            continue
        entries.append(IndexEntry(descriptor["digest"], descriptor["mediaType"], descriptor["size"], platform))
    return entries


class NoMatchingPlatform(NotFound):
    """An index has no image for the platform asked for."""


def platform_list(entries: Sequence[IndexEntry]) -> str:
    """The platforms of an index's images, as messages list them."""
    return ", ".join(sorted({str(e.platform) for e in entries})) or "no image"


def choose_platform(entries: Sequence[IndexEntry], wanted: Platform, what: str) -> IndexEntry:
    """The image of an index (`what` names it in the error) that runs best on `wanted`."""
    ranked = sorted((rank, i) for i, rank in enumerate(platform_fits(wanted, e.platform) for e in entries)
                    if rank is not None)
    if not ranked:
        raise NoMatchingPlatform("%s has no image for %s; it has %s (choose one with --platform)"
                                 % (what, wanted, platform_list(entries)))
    return entries[ranked[0][1]]


def tag_index(store: Store, ref: ImageRef) -> Optional["PushedManifest"]:
    """The image index a tag names, or None if it names an image (NotFound if the tag is absent;
    FormatError if it names a manifest that is neither, or one that is not stored)."""
    return target_index(store, ref, read_tag_target(store, ref))


def target_index(store: Store, ref: ImageRef, target: TagTarget) -> Optional["PushedManifest"]:
    """The image index a tag's target (read already) is, or None if it is an image."""
    if target.manifest is None:
        return None
    index = read_pushed_manifest(store, target.manifest)
    if index is None:
        raise NotFound("%s: %s names %s, which is not stored" % (store.url, ref, target.manifest))
    if not index.is_index:
        raise NotAnImage("%s: %s names %s, an artifact, not an image" % (store.url, ref, target.manifest))
    return index


def index_tag(store: Store, text: str) -> Optional[Tuple[ImageRef, "PushedManifest"]]:
    """The tag and the image index it names, if NAME[:TAG] is a tag of the store that names one
    (resolve_image's rule: a tag comes before an image ID prefix)."""
    ref = None  # type: Optional[ImageRef]
    with contextlib.suppress(UsageError):
        ref = parse_image_ref(text)
    if ref is None or store.stat(tag_key(ref)) is None:
        return None
    index = tag_index(store, ref)
    return None if index is None else (ref, index)


def image_of_manifest(store: Store, digest: str) -> str:
    """The image ID hex of an image manifest stored under manifests/ (NotFound if it or its image is gone)."""
    manifest = read_pushed_manifest(store, digest)
    if manifest is None:
        raise NotFound("%s: manifest %s is not stored" % (store.url, digest))
    if manifest.is_index or not manifest.blobs:
        raise NotAnImage("%s: manifest %s is no image" % (store.url, digest))
    image_hex = digest_hex(manifest.blobs[0][0])
    if store.stat(image_key(image_hex, "manifest.json")) is None:
        raise NotFound("%s: the image of manifest %s is not stored" % (store.url, digest))
    return image_hex


PlatformSource = Callable[[], Platform]  # asked only when a tag names an index (a pull asks its engine)


def index_image_for(store: Store, ref: ImageRef, index: "PushedManifest", platform: Platform) -> Tuple[str, IndexEntry]:
    """The image hex and the entry of an index (tag ref's) that runs best on the platform."""
    entry = choose_platform(index_images(index), platform, "%s in %s" % (ref, store.url))
    return image_of_manifest(store, entry.digest), entry


def tag_image_choice(store: Store, ref: ImageRef,
                     platform: Optional[PlatformSource]) -> Tuple[str, Optional[IndexEntry]]:
    """The image hex a tag names (one read of the tag) and, of a multi-platform tag, the entry
    chosen for the platform (asked only for such a tag; NotAnImage listing the platforms if
    none is given)."""
    target = read_tag_target(store, ref)
    index = target_index(store, ref, target)
    if index is None:
        return str(target.image_hex), None
    if platform is None:
        raise NotAnImage("%s in %s is a multi-platform image (%s): choose one with --platform"
                         % (ref, store.url, platform_list(index_images(index))))
    return index_image_for(store, ref, index, platform())


def list_image_ids(store: Store) -> List[str]:
    """Every image id (hex) with a directory under images/."""
    ids = set()
    for key in store.list("images/"):
        parts = key.split("/")
        if len(parts) == 3 and _HEX64.match(parts[1]):
            ids.add(parts[1])
    return sorted(ids)


def resolve_image(store: Store, text: str, platform: Optional[PlatformSource] = None) -> Tuple[str, Optional[ImageRef]]:
    """Find an image by NAME[:TAG] (of a multi-platform tag: the platform's) or by (a prefix of)
    its ID; return (hex, ref or None)."""
    ref = None  # type: Optional[ImageRef]
    with contextlib.suppress(UsageError):
        ref = parse_image_ref(text)
    if ref is not None and store.stat(tag_key(ref)) is not None:
        return tag_image_choice(store, ref, platform)[0], ref
    prefix = image_id_prefix(text)
    if prefix is not None:
        matches = [i for i in list_image_ids(store) if i.startswith(prefix)]
        if len(matches) == 1:
            return matches[0], None
        if len(matches) > 1:
            raise UsageError("image id prefix %r is ambiguous in %s (%d matches)" % (text, store.url, len(matches)))
    if ref is None:
        parse_image_ref(text)  # raises the reference's own usage error
    raise NotFound("%s not found in %s" % (text, store.url))


class FoundImage(NamedTuple):
    """An image found in a store (or, for the original's images, at its bucket's root)."""

    store: Store
    image_hex: str            # the image's own ID (a v1 id for the original layout)
    ref: Optional[ImageRef]
    image: StoredImage
    named_hex: str = ""       # what the tag holds, if it differs (a v1 id `migrate --keep-legacy` kept)


def find_image(store: Store, text: str, progress: ProgressSink, platform: Optional[PlatformSource] = None) -> FoundImage:
    """Resolve NAME[:TAG] (of a multi-platform tag: the platform's image) or an ID prefix and
    read what the store holds for it.

    The original dogestry ignored the path of s3://bucket/path/ URLs and wrote at the bucket's
    root; when the prefix lacks the image and the root holds it in the original's layout, it
    is read from there (and progress says so).
    """
    try:
        image_hex, ref = resolve_image(store, text, platform)
    except NoMatchingPlatform:
        raise
    except NotFound as missing:
        root = store.bucket_root()
        if root is None:
            raise
        try:
            image_hex, ref = resolve_image(root, text)
            image = load_stored_image(root, image_hex)
        except NotFound:
            raise missing
        if not image.legacy:
            raise missing
        progress.note("%s is not in %s: using the original dogestry's image at the root of the bucket"
                      % (text, store.url))
        return FoundImage(root, image_hex, ref, image)
    image = load_stored_image(store, image_hex)
    own_hex = image_hex if image.legacy else digest_hex(image.image_id)
    return FoundImage(store, own_hex, ref, image, image_hex if own_hex != image_hex else "")


def original_images_at_root(store: Store) -> List[Tuple[ImageRef, str]]:
    """The tags at the root of an S3 prefix's bucket that name images in the original layout."""
    root = store.bucket_root()
    if root is None:
        return []
    images = collections.defaultdict(set)  # type: Dict[str, Set[str]]
    for key in root.list("images/"):
        parts = key.split("/")
        if len(parts) == 3:
            images[parts[1]].add(parts[2])
    legacy = {i for i, leaves in images.items() if "json" in leaves and "manifest.json" not in leaves}
    return [(ref, image_hex) for ref, image_hex in list_tags(root) if image_hex in legacy] if legacy else []


def load_stored_image(store: Store, image_hex: str) -> StoredImage:
    """Read an image's manifest (or, for the original layout, walk its v1 chain)."""
    if store.stat(image_key(image_hex, "manifest.json")) is not None:
        return stored_image_from(store, image_hex, read_json(store, image_key(image_hex, "manifest.json")))
    if store.stat(image_key(image_hex, "json")) is not None:
        migrated = migrated_image(store, image_hex)
        if migrated is not None:
            return load_stored_image(store, migrated)
        return StoredImage(image_hex, [], legacy_chain(store, image_hex))
    raise NotFound("%s: image %s is missing (the tag points to an image that is not stored)"
                   % (store.url, image_hex[:12]))


def stored_image_from(store: Store, image_hex: str, doc: Dict[str, Any]) -> StoredImage:
    """An image as its manifest.json (read from store) describes it; FormatError if it is malformed."""
    key = image_key(image_hex, "manifest.json")
    check_shape(doc, STORED_MANIFEST_SHAPE, "%s: %s" % (store.url, key))
    if doc["config"]["digest"] != "sha256:" + image_hex:
        raise FormatError("%s: manifest of %s names another config" % (store.url, image_hex[:12]))
    layers = [LayerRecord.from_json(d, "%s: %s: layers[%d]" % (store.url, key, i)) for i, d in enumerate(doc["layers"])]
    return StoredImage("sha256:" + image_hex, layers, [], doc["config"]["size"])


def migrated_image(store: Store, v1_hex: str) -> Optional[str]:
    """The image `migrate --keep-legacy` wrote for an image in the original layout, if any."""
    try:
        text = store.get_bytes(image_key(v1_hex, "migrated"), limit=4096).decode("ascii", "replace").strip()
    except NotFound:
        return None
    if not _HEX64.match(text) or store.stat(image_key(text, "manifest.json")) is None:
        return None
    return text


def legacy_chain(store: Store, top_hex: str) -> List[str]:
    """The v1 ids from the base layer up to top_hex, following "parent"."""
    chain, seen = [], set()  # type: List[str], Set[str]
    current = top_hex  # type: Optional[str]
    while current:
        if current in seen or len(chain) > 1000:
            raise FormatError("%s: legacy image %s has a parent loop" % (store.url, top_hex[:12]))
        if not _HEX64.match(current):
            raise FormatError("%s: legacy image names a bad parent %r" % (store.url, current[:80]))
        seen.add(current)
        chain.append(current)
        current = read_json(store, image_key(current, "json"), V1_JSON_SHAPE).get("parent") or None
    chain.reverse()
    return chain


# === 10. Reading `docker save` streams ===
#
# `docker save` writes one of three shapes (moby image/tarexport):
#  - dockerd <= 24: <v1-id>/{VERSION,json,layer.tar} directories, <config-hex>.json,
#    then manifest.json and repositories at the end; a layer seen twice is a symlink.
#  - dockerd 25+: an OCI layout (oci-layout, index.json, blobs/sha256/<hex>) plus a
#    manifest.json whose Layers name blobs/sha256/<diff-id> (uncompressed tars).
#  - dockerd 29 with the containerd store: the same, but layer blobs may be the stored
#    (compressed) blobs, so a blob's digest need not be its diffID.
# We spool each large member to disk while hashing it; the hash tells which layer it is.

SMALL_MEMBER = 1 << 20
SMALL_MEMBERS_LIMIT = 256 << 20  # the most bytes of small members (not layers) and names held in memory
TAR_BLOCK = 512
TAR_META_LIMIT = 1 << 20  # the largest PAX or GNU long-name header we read
# The most tar headers a save stream or an archive may have.  Generous: docker writes about four
# per layer (a directory, VERSION, json, layer.tar) and an image has at most ~128 layers, so this
# is some 25,000 layers: hundreds of the deepest images, thousands of common ones, in one archive.
TAR_MEMBER_LIMIT = 100000
NAME_LIMIT = 4096  # the longest member name (or link target) in bytes: PATH_MAX
# The members an image is made of: documents (manifest.json, index.json, configs), layers
# (<v1-id>/layer.tar, podman's <diffID>.tar, crane's <digest>.tar.gz) and OCI blobs.  The rest
# (VERSION, <v1-id>/json, repositories, oci-layout) is read by nothing, and skipped unread.
_IMAGE_MEMBER = re.compile(r"(?:\.json|\.tar|\.tar\.gz)$|^blobs/sha256/[0-9a-f]{64}$")


class Spool(NamedTuple):
    """A member of the save stream on disk: the file, its bytes' digest and size, and the
    digest and size of the member as docker sent it (before any compression we applied)."""

    path: str
    digest: str
    size: int
    raw_digest: str
    raw_size: int
    compression: str  # "gzip", "zstd" or "none": how the file's bytes are encoded
    members: Optional[Tuple[int, ...]] = None  # the sizes of the gzip members we wrote
    unpacked_digest: Optional[str] = None  # a gzip member as sent: the sha256 and size of its
    unpacked_size: Optional[int] = None    # unpacked bytes (spool(unpack=True); None if not gzip)

    @property
    def sent_raw(self) -> bool:
        """Was the member an uncompressed tar as sent (stored raw, or gzip'ed here)?"""
        return self.compression == "none" or self.digest != self.raw_digest

    @property
    def tar_digest(self) -> Optional[str]:
        """The sha256 of the member's tar, unpacked: its diffID, if it is a layer (None: not known, zstd)."""
        return self.raw_digest if self.sent_raw else self.unpacked_digest

    @property
    def tar_size(self) -> Optional[int]:
        """The size of the member's tar, unpacked (None: not known)."""
        return self.raw_size if self.sent_raw else self.unpacked_size


class SaveContents:
    """What a save stream held: small files in memory, large ones spooled, symlinks."""

    def __init__(self) -> None:
        self.small = {}     # type: Dict[str, bytes]
        self.spooled = {}   # type: Dict[str, Spool]
        self.links = {}     # type: Dict[str, str]
        self.digests = {}   # type: Dict[str, str]  # member name -> sha256 of its content
        self._documents = {}  # type: Dict[str, Any]     # member name -> its JSON, parsed
        self._checked = set()  # type: Set[Tuple[str, int]]  # (member, id of a shape it has)

    def resolve(self, name: str) -> str:
        """Follow symlinks (relative to the member's directory) to a regular member name."""
        for _ in range(40):
            if name not in self.links:
                return name
            target = self.links[name]
            name = os.path.normpath(os.path.join(os.path.dirname(name), target)).replace(os.sep, "/")
        raise FormatError("symlink loop in docker save stream at %r" % name)

    def read_small(self, name: str) -> bytes:
        name = self.resolve(name)
        if name in self.small:
            return self.small[name]
        spool = self.spooled.get(name)
        if spool is not None and spool.path and spool.compression == "none":
            with open(spool.path, "rb") as f:
                return f.read()
        raise FormatError("docker save stream has no %r" % name)

    def document(self, name: str, shape: Any, what: str) -> Any:
        """A JSON member of the shape (check_shape), read, parsed and checked once however often
        it is asked for (an archive may name one manifest or config thousands of times)."""
        name = self.resolve(name)
        if name not in self._documents:
            self._documents[name] = parse_json(self.read_small(name), what)
        if (name, id(shape)) not in self._checked:  # shapes are module constants: their ids do not change
            check_shape(self._documents[name], shape, what)
            self._checked.add((name, id(shape)))
        return self._documents[name]


class TarEntry(NamedTuple):
    """One tar member's header: name, size, and kind ('file', 'link' or 'other')."""

    name: str
    size: int
    kind: str
    linkname: str


class MemberReader:
    """Reads one tar member's data from the stream, never past its end."""

    def __init__(self, stream: ByteSource, size: int):
        self.stream, self.left = stream, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = read_exactly(self.stream, n) if n else b""
        self.left -= len(data)
        return data

    def skip(self) -> None:
        while self.left:
            self.read(CHUNK)


def read_exactly(stream: ByteSource, n: int) -> bytes:
    """n bytes from a stream, or a FormatError if it ends first."""
    data = stream.read(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            raise FormatError("docker save stream ended early (truncated tar)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pax_fields(data: bytes) -> Dict[str, str]:
    """Records of a PAX extended header: 'LEN key=value\\n' (POSIX.1-2001 pax format)."""
    fields, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space + 1 - pos or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            raise ValueError("bad PAX record at byte %d" % pos)  # a zero length would loop forever
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return fields


def iter_tar(stream: ByteSource) -> Iterator[Tuple[TarEntry, MemberReader]]:
    """Stream a tar's members (ustar, GNU long names, PAX headers); each reader must be read or skipped.
    At most TAR_MEMBER_LIMIT headers, names of at most NAME_LIMIT bytes."""
    import tarfile  # lazy (start-up time): only archives need it
    pax = {}  # type: Dict[str, str]
    long_name = long_link = None  # type: Optional[str]
    for count in itertools.count(1):
        block = stream.read(TAR_BLOCK)
        if len(block) < TAR_BLOCK and block:
            block += read_exactly(stream, TAR_BLOCK - len(block))
        if not block or block == b"\0" * TAR_BLOCK:
            return
        if count > TAR_MEMBER_LIMIT:
            raise FormatError("docker save stream has more than %d members (tar headers)" % TAR_MEMBER_LIMIT)
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise FormatError("broken docker save stream: bad tar header (%s)" % e)
        if info.size < 0:  # GNU base-256 sizes can be negative
            raise FormatError("broken docker save stream: a tar header with a negative size")
        reader = MemberReader(stream, info.size)
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if info.size > TAR_META_LIMIT:
                raise FormatError("broken docker save stream: a %s byte tar extension header" % info.size)
            data = reader.read()
            if info.type == tarfile.XHDTYPE:
                try:
                    pax = _pax_fields(data)
                except ValueError:
                    raise FormatError("broken docker save stream: bad PAX header")
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                long_link = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            read_exactly(stream, -info.size % TAR_BLOCK)
            continue
        name = pax.get("path") or long_name or info.name
        linkname = pax.get("linkpath") or long_link or info.linkname
        if max(len(name.encode("utf-8", "surrogateescape")), len(linkname.encode("utf-8", "surrogateescape"))) \
                > NAME_LIMIT:
            raise FormatError("docker save stream has a member name or link target longer than %d bytes: %s..."
                              % (NAME_LIMIT, printable(name[:60])))
        try:
            size = int(pax["size"]) if "size" in pax else info.size
        except ValueError:
            raise FormatError("broken docker save stream: bad PAX size %r" % pax["size"][:40])
        if size < 0:
            raise FormatError("broken docker save stream: negative member size")
        reader.left = size if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else info.size
        pax, long_name, long_link = {}, None, None
        kind = "file" if info.isreg() else "link" if info.issym() or info.islnk() else "other"
        if info.islnk():
            linkname = "/" + linkname  # hard links name a path from the archive root
        yield TarEntry(name[2:] if name.startswith("./") else name, size, kind, linkname), reader
        reader.skip()
        read_exactly(stream, -size % TAR_BLOCK)


def safe_member_name(name: str) -> str:
    """A tar member's name, refused if it is absolute or climbs out ('..'): such an archive is
    hostile or broken (nothing is ever extracted by name, but nothing such is read either)."""
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\0" in name:
        raise FormatError("docker save stream member %r has an unsafe path" % printable(name[:100]))
    return name


def read_save_stream(stream: ByteSource, spool: Callable[[TarEntry, MemberReader], Optional[Spool]],
                     abort: Optional[threading.Event] = None, what: str = "") -> SaveContents:
    """Walk a `docker save` tar: small members stay in memory, spool() decides about the rest;
    members no image is made of (_IMAGE_MEMBER) are skipped unread.

    spool(entry, reader) returns a Spool for a member it stored (or dropped: path ""),
    or None to have the member kept in memory like a small one.  what: the stream's name in
    errors, if it is not docker's (an archive file being imported).
    """
    import http.client  # lazy (start-up time): only commands that talk HTTP need it
    contents = SaveContents()
    held = 0  # bytes held in memory: small members, and a header's worth for every member kept
    try:
        for entry, reader in iter_tar(stream):
            if abort is not None and abort.is_set():
                raise Interrupted("stopped")
            safe_member_name(entry.name)
            target = _link_target(entry) if entry.kind == "link" else ""  # checked even if not kept
            if entry.kind == "other" or not _IMAGE_MEMBER.search(entry.name):
                continue
            held += TAR_BLOCK + len(entry.name) + len(target)
            if entry.kind == "link":
                contents.links[entry.name] = target
            else:
                spooled = spool(entry, reader) if entry.size > SMALL_MEMBER or entry.name.endswith(".tar") else None
                if spooled is None:
                    if entry.size > DOCUMENT_LIMIT:
                        raise FormatError("docker save stream member %r is too large for a document (%s)"
                                          % (printable(entry.name[:100]), human_size(entry.size)))
                    data = reader.read()
                    held += len(data)
                    contents.small[entry.name] = data
                    contents.digests[entry.name] = sha256_digest(data)
                else:
                    contents.spooled[entry.name] = spooled
                    contents.digests[entry.name] = spooled.raw_digest
            if held > SMALL_MEMBERS_LIMIT:
                raise FormatError("docker save stream holds more than %s of documents and names"
                                  % human_size(SMALL_MEMBERS_LIMIT))
        while stream.read(CHUNK):  # the tar's trailing padding: read to the end of the response
            pass
    except FormatError as e:
        if not what:
            raise
        raise FormatError(str(e).replace("docker save stream", what))
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, OSError) and e.filename:
            raise DogestryError("cannot spool %s: %s" % (e.filename, _os_reason(e)))
        if what:
            raise DogestryError("cannot read the %s: %s" % (what, _os_reason(e)))
        raise DockerError("docker save stream broke: %s" % _os_reason(e))
    return contents


def _link_target(entry: TarEntry) -> str:
    """Where a link member points, relative to its directory; refused if outside the archive."""
    target = entry.linkname
    if target.startswith("/"):
        target = os.path.relpath(target, "/" + (os.path.dirname(entry.name) or "."))
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(entry.name), target))
    if resolved.startswith("../") or resolved in ("..", ".") or resolved.startswith("/"):
        raise FormatError("docker save stream member %r is a link pointing outside it (%r)"
                          % (printable(entry.name[:100]), printable(entry.linkname[:100])))
    return target


class SavedImage(NamedTuple):
    """The image a save stream describes: config bytes and per-layer member names."""

    config: bytes
    layer_members: List[str]
    diff_ids: List[str]


# manifest.json of `docker save` and of docker-archives (podman, skopeo): one entry per image
SAVE_MANIFEST_SHAPE = [{"Config": str, "RepoTags?": OrNull([str]), "Layers?": OrNull([str])}]
# an image config: what dogestry reads of it (the rest is the engine's business)
IMAGE_CONFIG_SHAPE = {"rootfs": {"diff_ids": [DIGEST]}, "config?": OrNull({"Labels?": OrNull({"*": str})})}


def saved_config(contents: SaveContents, name: str) -> Tuple[bytes, List[str]]:
    """An image config member of a save stream or archive, and its rootfs.diff_ids."""
    doc = contents.document(name, IMAGE_CONFIG_SHAPE, "the image config")
    return contents.read_small(name), doc["rootfs"]["diff_ids"]


def parse_saved_image(contents: SaveContents, image_id: str) -> SavedImage:
    """Find the image's config and layer list in manifest.json (any save format)."""
    entries = contents.document("manifest.json", SAVE_MANIFEST_SHAPE, "the docker save stream's manifest.json")
    if not entries:
        raise FormatError("docker save stream's manifest.json lists no image")
    chosen = next((e for e in entries if contents.digests.get(contents.resolve(e["Config"])) == image_id), None)
    if chosen is None:
        if len(entries) != 1:
            raise FormatError("docker save stream does not contain image %s" % image_id)
        chosen = entries[0]
    config, diff_ids = saved_config(contents, chosen["Config"])
    layers = [contents.resolve(name) for name in chosen.get("Layers") or []]
    if len(layers) != len(diff_ids):
        raise FormatError("manifest.json lists %d layers but the config %d" % (len(layers), len(diff_ids)))
    return SavedImage(config, layers, list(diff_ids))


# === 11. Compression ===
#
# Layers are gzip-compressed in CHUNK_GZ pieces on all cores: each piece becomes an
# independent gzip member, and concatenated members form one valid gzip stream
# (RFC 1952 section 2.2), which docker load and any gunzip read as a whole.

CHUNK_GZ = 2 << 20
GZIP_LEVEL = 1  # the default: fastest; docker push uses 6, which makes text layers about half as big
GZIP_LEVELS = range(1, 10)
INCOMPRESSIBLE_RATIO = 0.9
COMPRESSIONS = ("gzip", "none")


def gzip_member(data: bytes, level: int = GZIP_LEVEL) -> bytes:
    """One complete gzip member (zlib releases the GIL, so members compress in parallel)."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def compressed_sample(sample: bytes, level: int = GZIP_LEVEL) -> Optional[bytes]:
    """gzip the first piece of a layer; None if that is not worth the CPU (random or packed data)."""
    packed = gzip_member(sample, level)
    return packed if len(sample) < 4096 or len(packed) < INCOMPRESSIBLE_RATIO * len(sample) else None


CHUNK_SAMPLES = 4  # pieces of a chunk, spread over it, whose gzip decides whether the chunk is gzipped
CHUNK_SAMPLE = 4 << 10  # ... each this big


def chunk_compresses(chunk: bytes, level: int = GZIP_LEVEL) -> bool:
    """Does gzip pay for this chunk, judged by CHUNK_SAMPLES samples spread over it (a chunk often
    holds several files: a random one and a text one)?"""
    step = max(1, len(chunk) // CHUNK_SAMPLES)
    sample = b"".join(chunk[start:start + CHUNK_SAMPLE] for start in range(0, len(chunk), step))
    return compressed_sample(sample, level) is not None


def detect_compression(head: bytes) -> str:
    """The compression a blob already has, from its magic number."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


class GzipInflater:
    """Incremental gunzip of concatenated gzip members, in bounded pieces."""

    def __init__(self) -> None:
        self.inflate = zlib.decompressobj(31)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompressed output for more input, at most CHUNK bytes a piece."""
        while data:
            out = self.inflate.decompress(data, CHUNK)
            if out:
                yield out
            if self.inflate.eof:
                data = self.inflate.unused_data
                self.inflate = zlib.decompressobj(31)
            else:
                data = self.inflate.unconsumed_tail

    def finish(self) -> Iterator[bytes]:
        """Whatever output is still buffered at the end of the input."""
        while True:
            out = self.inflate.decompress(b"", CHUNK)
            if not out:
                break
            yield out
        tail = self.inflate.flush()
        if tail:
            yield tail


# --- Content-defined chunks: sub-layer dedup ---
#
# A layer of at least CHUNKED_LAYER_MIN bytes is stored as chunks of its files' contents plus a
# recipe (section 9).  LayerSplitter walks the tar: headers, padding and the end go to the
# recipe, so a rebuild that only changes metadata (every mtime) shares every chunk.  The
# contents, one file after another, are cut where a ContentChunker finds a content-defined
# point -- the end of a file whose tail hashes low enough (a file's chance grows with its
# size), or inside a big file the occurrence of a marker (bytes.find, at C speed) whose
# preceding CUT_WINDOW bytes' crc32 has its low bits zero -- never closer than CHUNK_MIN to the
# chunk's start and at CHUNK_MAX at the latest.  A cut depends only on the bytes before it, so
# an edit or an insertion changes the chunk it falls in and (rarely) the next, nothing else.
# Measured here on a 1.5 GiB tar of /usr (11,000 files): 550 MB/s with a sha256 of each chunk,
# 1,400 chunks averaging 1.1 MiB; one file edited: one new chunk; 1 KiB inserted at 40% of a
# 500 MiB random file, or of a 190 MiB text: one new chunk.

CHUNKED_LAYER_MIN = 16 << 20  # smaller layers are stored whole, as before
CHUNK_TASKS = 6  # chunks hashed, looked for, compressed and written at once (each holds at most 2 CHUNK_MAX)
CHUNK_MIN = 512 << 10      # no cut closer than this to the chunk's start (bounds objects per GiB)
CHUNK_SPACING = 512 << 10  # the mean distance between cut candidates (a chunk averages about MIN + SPACING)
CUT_WINDOW = 48            # the bytes before a candidate that decide whether it is a cut
# Markers whose occurrences are cut candidates inside a file, most preferred first; each file
# takes the first whose rate in its first MARKER_SAMPLE bytes puts 4..MARKER_RATE_MAX occurrences in CHUNK_SPACING bytes,
# so candidates stay rare enough for Python to test each and common enough to cut.
CUT_MARKERS = (b"\x9e\x37", b"\n\n", b"}\n", b";\n", b".\n", b"\n#", b"\n\t", b"\n ", b"=\"", b"e ", b"\n",
               b"\x00\x00\x00\x00\x00\x00\x00\x01", b"\x00\x01", b"\x01\x00")
MARKER_SAMPLE = 256 << 10  # the first bytes of a file its marker is chosen by
MARKER_RATE_MAX = 128  # each occurrence costs a Python-level test: at most this many per CHUNK_SPACING
MARKER_FILE_MIN = 4 << 20  # smaller files cut only where they end (a file of CHUNK_SPACING or more always
                           # may) and at CHUNK_MAX: choosing a marker costs up to ~6 ms, too much for each small file


def cut_marker(sample: bytes) -> Tuple[bytes, int]:
    """The marker and candidate mask a file's content cuts with, chosen by a sample of it (b'': none)."""
    for marker in itertools.chain(CUT_MARKERS, _sampled_markers(sample)):
        per_spacing = sample.count(marker) * CHUNK_SPACING / max(len(sample), 1)
        if 4 <= per_spacing <= MARKER_RATE_MAX:
            # 1 to 2 candidates per CHUNK_SPACING: a chunk rarely reaches CHUNK_MAX (a cut an insertion shifts)
            return marker, (1 << (int(per_spacing).bit_length() - 1)) - 1
    return b"", 0


def _sampled_markers(sample: bytes) -> Iterator[bytes]:
    """Markers for content none of CUT_MARKERS suits: strings of 3 and 4 bytes taken from the sample."""
    step = max(len(sample) // 8, 1)
    for length in (3, 4):
        for start in range(0, len(sample) - length, step):
            yield sample[start:start + length]


class ContentChunker:
    """Cuts the content of a layer's files, one file after another, into chunks at content-defined
    points: where a file ends or inside one (cut_marker), so an edit moves no cut outside its chunk."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.file_start = 0   # where the current file's data starts in buf
        self.searched = 0     # buf is searched for the current marker up to here
        self.marker, self.mask = b"", 0

    def start_file(self, sample: bytes, size: int) -> None:
        """A file's data comes next (sample: its first piece)."""
        self.file_start = self.searched = len(self.buf)
        self.marker, self.mask = cut_marker(sample) if size >= MARKER_FILE_MIN else (b"", 0)

    def feed(self, data: Union[bytes, memoryview]) -> List[bytes]:
        """More of the current file's data; the chunks it completes."""
        self.buf += data
        out = []  # type: List[bytes]
        while True:
            cut = self._find_cut()
            if cut is None:
                return out
            out.append(self._take(cut))

    def end_file(self, size: int) -> List[bytes]:
        """The current file ended (size: its size); a cut here if its tail says so."""
        buf = self.buf
        if size and len(buf) >= CHUNK_MIN:
            tail = zlib.crc32(buf[len(buf) - min(CUT_WINDOW, size):], size & 0xFFFFFFFF)
            if tail * CHUNK_SPACING < size * (1 << 32):
                return [self._take(len(buf))]
        return []

    def finish(self) -> List[bytes]:
        """The last chunk (if any content is left)."""
        return [self._take(len(self.buf))] if self.buf else []

    def _find_cut(self) -> Optional[int]:
        buf, marker = self.buf, self.marker
        end = min(len(buf), CHUNK_MAX)
        if marker:
            start = max(self.searched, self.file_start, CHUNK_MIN)
            while True:
                i = buf.find(marker, start, end)
                if i < 0:
                    break
                if zlib.crc32(buf[i - CUT_WINDOW:i]) & self.mask == 0:
                    return i
                start = i + 1
            self.searched = max(self.searched, end - len(marker) + 1)
        return CHUNK_MAX if len(buf) >= CHUNK_MAX else None

    def _take(self, cut: int) -> bytes:
        with memoryview(self.buf) as view:
            chunk = bytes(view[:cut])
        del self.buf[:cut]
        self.file_start = max(0, self.file_start - cut)
        self.searched = max(0, self.searched - cut)
        return chunk


CONTENT_TYPES = (b"0", b"\0", b"7")  # tar members whose data is a file's content (regular, contiguous)


def tar_member_size(header: bytes) -> Optional[int]:
    """The data size a tar header declares (octal, or GNU base-256); None if the header is not valid."""
    if sum(header[:148]) + 256 + sum(header[156:512]) != _octal(header[148:156]):
        return None
    field = header[124:136]
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big") if field[0] == 0x80 else None
    return _octal(field)


def _octal(field: bytes) -> int:
    text = field.rstrip(b" \0").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return -1


class PieceReader:
    """Exact reads of a stream served from its pieces of CHUNK bytes (the first given), each piece
    handed to on_piece once, as it is read: small reads (tar headers) cost no call to the stream."""

    def __init__(self, first: bytes, source: Callable[[int], bytes], on_piece: Callable[[bytes], None]):
        self.piece, self.pos = first, 0
        self.source, self.on_piece = source, on_piece
        on_piece(first)

    def read(self, n: int) -> bytes:
        """Exactly n bytes (FormatError if the stream ends first)."""
        end = self.pos + n
        if end <= len(self.piece):
            self.pos = end
            return self.piece[end - n:end]
        return b"".join(self.views(n))

    def views(self, n: int) -> Iterator[memoryview]:
        """Exactly n bytes as views of the pieces, copied nowhere (FormatError if the stream ends first)."""
        while n:
            if self.pos == len(self.piece):
                self.piece, self.pos = self.source(CHUNK), 0
                if not self.piece:
                    raise FormatError("docker save stream ended inside a layer")
                self.on_piece(self.piece)
            take = min(n, len(self.piece) - self.pos)
            yield memoryview(self.piece)[self.pos:self.pos + take]
            self.pos += take
            n -= take


class LayerSplitter:
    """Splits a layer's tar into its files' contents (chunked by a ContentChunker) and the rest
    (headers, padding, the end: metadata kept in the layer's recipe), as runs that alternate
    metadata, content, metadata... and concatenate back to the tar byte for byte."""

    def __init__(self, on_meta: Callable[[bytes], None], on_chunk: Callable[[bytes], None]):
        self.on_meta, self.on_chunk = on_meta, on_chunk
        self.chunker = ContentChunker()
        self.runs = [0]  # type: List[int]  # byte counts: metadata, content, metadata, ...

    def _meta(self, data: bytes) -> None:
        if data:
            if len(self.runs) % 2 == 0:
                self.runs.append(0)
            self.runs[-1] += len(data)
            self.on_meta(data)

    def _content(self, reader: PieceReader, size: int) -> None:
        if len(self.runs) % 2:
            self.runs.append(0)
        self.runs[-1] += size
        sample = reader.read(min(MARKER_SAMPLE, size))  # the file's first bytes choose its marker
        self.chunker.start_file(sample, size)
        for chunk in self.chunker.feed(sample):
            self.on_chunk(chunk)
        for view in reader.views(size - len(sample)):
            for chunk in self.chunker.feed(view):
                self.on_chunk(chunk)
        for chunk in self.chunker.end_file(size):
            self.on_chunk(chunk)

    def split(self, reader: PieceReader, size: int) -> None:
        """Read a tar of `size` bytes from reader and split it."""
        read = reader.read
        left = size
        header = None
        while left >= TAR_BLOCK:
            header = read(TAR_BLOCK)
            left -= TAR_BLOCK
            data_size = tar_member_size(header) if any(header) else None
            if data_size is None or data_size < 0 or data_size + (-data_size % TAR_BLOCK) > left:
                self._meta(header)  # the end of the archive, or no tar we know: the rest as content
                break
            self._meta(header)
            padding = -data_size % TAR_BLOCK
            if header[156:157] in CONTENT_TYPES or data_size > TAR_META_LIMIT:
                if data_size:
                    self._content(reader, data_size)
            else:
                self._meta(read(data_size))
            self._meta(read(padding))
            left -= data_size + padding
        if left and left <= TAR_META_LIMIT and header is not None and not any(header):
            self._meta(read(left))
        elif left:
            self._content(reader, left)
        for chunk in self.chunker.finish():
            self.on_chunk(chunk)


class InflatingReader:
    """Reads the gunzipped bytes of a stream of gzip members, n bytes at a time, in bounded memory."""

    def __init__(self, stream: IO[bytes], what: str):
        self.stream, self.what = stream, what
        self.inflater = GzipInflater()
        self.pending = collections.deque()  # type: collections.deque
        self.ended = False

    def _more(self) -> bool:
        while not self.pending and not self.ended:
            data = self.stream.read(CHUNK)
            if not data:
                self.ended = True
                self.pending.extend(self.inflater.finish())
            else:
                self.pending.extend(self.inflater.feed(data))
        return bool(self.pending)

    def read(self, n: int) -> bytes:
        """Exactly n bytes (FormatError if the stream ends first)."""
        parts, got = [], 0
        while got < n:
            if not self._more():
                raise FormatError("%s ends early" % self.what)
            piece = self.pending.popleft()
            if len(piece) > n - got:
                self.pending.appendleft(piece[n - got:])
                piece = piece[:n - got]
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def read_line(self, limit: int) -> bytes:
        """The bytes up to and with the next newline (FormatError if there is none in limit bytes)."""
        parts, got = [], 0
        while self._more():
            piece = self.pending.popleft()
            end = piece.find(b"\n")
            if end >= 0:
                self.pending.appendleft(piece[end + 1:])
                piece = piece[:end + 1]
            parts.append(piece)
            got += len(piece)
            if got > limit:
                break
            if end >= 0:
                return b"".join(parts)
        raise FormatError("%s has no recipe line of at most %s" % (self.what, human_size(limit)))

    def at_end(self) -> bool:
        """Is everything read?"""
        return not self._more()


def open_recipe(store: Store, record: LayerRecord,
                stream: Optional[IO[bytes]] = None) -> Tuple[LayerRecipe, InflatingReader]:
    """A chunked layer's recipe (stream: its bytes, if not the stored blob), and a reader of its
    metadata bytes (close its stream when done)."""
    what = "%s: %s (the recipe of layer %s)" % (store.url, blob_key(record.digest), record.diff_id)
    stream = store.open(blob_key(record.digest), record.size) if stream is None else stream
    try:
        reader = InflatingReader(stream, what)
        recipe = LayerRecipe.from_header(reader.read_line(RECIPE_HEADER_LIMIT), what)
    except zlib.error as e:
        stream.close()
        raise IntegrityError("%s is corrupt (%s)" % (what, e))
    except BaseException:
        stream.close()
        raise
    if recipe.diff_id != record.diff_id or recipe.size != record.raw_size:
        stream.close()
        raise IntegrityError("%s describes another layer (%s)" % (what, recipe.diff_id))
    return recipe, reader


def write_recipe(path: str, recipe: LayerRecipe, metadata_path: str, write_through: bool = False) -> Tuple[str, int]:
    """Write a recipe file: its JSON line as a gzip member, then the gzip member of its metadata
    (already in metadata_path); return its digest and size."""
    head = gzip_member(recipe.header(), 6)
    sha, size = hashlib.sha256(head), len(head)
    with OutputFile(path, write_through) as out, open(metadata_path, "rb") as meta:
        out.write(head)
        for data in iter(lambda: meta.read(CHUNK), b""):
            sha.update(data)
            size += len(data)
            out.write(data)
    return "sha256:" + sha.hexdigest(), size


def read_recipe(store: Store, record: LayerRecord) -> LayerRecipe:
    """A chunked layer's recipe (its JSON line only)."""
    recipe, reader = open_recipe(store, record)
    reader.stream.close()
    return recipe


class DiffIdHasher:
    """sha256 of a layer's uncompressed tar, whether the stored bytes are gzip or not."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.inflater = None  # type: Optional[GzipInflater]
        self.started = False
        self.size = 0  # of the uncompressed tar, so far

    def update(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            if detect_compression(data) == "gzip":
                self.inflater = GzipInflater()
        for out in (self.inflater.feed(data) if self.inflater else (data,)):
            self.sha.update(out)
            self.size += len(out)

    def digest(self) -> str:
        if self.inflater:
            for out in self.inflater.finish():
                self.sha.update(out)
                self.size += len(out)
            self.inflater = None
        return "sha256:" + self.sha.hexdigest()


class InOrderWorker:
    """A thread that hands each piece put() to consume(), in order, at most `depth` waiting (so
    memory stays bounded).  The first error consume() raises is kept in `error`; later pieces
    are drained unread, so put() never blocks on a dead worker."""

    def __init__(self, depth: int, name: str):
        import queue  # lazy (start-up time): only work in threads needs it
        self.error = None  # type: Optional[BaseException]
        self._queue = queue.Queue(depth)  # type: queue.Queue
        self._thread = start_thread(self._run, (), name)

    def consume(self, piece: Any) -> None:
        raise NotImplementedError

    def put(self, piece: Any) -> None:
        """Queue the next piece."""
        self._queue.put(piece)

    def join(self) -> None:
        """Wait until every piece is consumed."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            piece = self._queue.get()
            if piece is None:
                return
            if self.error is None:
                try:
                    self.consume(piece)
                except BaseException as e:  # handed to the thread that put the pieces
                    self.error = e


class UnpackedHasher(InOrderWorker):
    """The diffID (sha256 of the unpacked tar) and size of a gzip blob, computed in a thread
    while the blob is read; bounded memory (a few pieces wait at most)."""

    def __init__(self) -> None:
        self.hasher = DiffIdHasher()
        super().__init__(4, "dogestry-unpack")

    def consume(self, piece: bytes) -> None:
        self.hasher.update(piece)

    def result(self) -> Tuple[Optional[str], int]:
        """(diffID, unpacked size), or (None, 0) if the blob is not valid gzip."""
        self.join()
        if isinstance(self.error, zlib.error):
            return None, 0
        if self.error is not None:
            raise self.error
        try:
            return self.hasher.digest(), self.hasher.size
        except zlib.error as e:
            self.error = e
            return None, 0


class PieceHasher(InOrderWorker):
    """sha256 and size of the pieces put, in order, computed in a thread of its own."""

    def __init__(self, name: str) -> None:
        self.sha, self.size = hashlib.sha256(), 0
        super().__init__(4, name)

    def consume(self, piece: bytes) -> None:
        self.sha.update(piece)
        self.size += len(piece)

    def result(self) -> Tuple[str, int]:
        """("sha256:...", size) of everything put."""
        self.join()
        if self.error is not None:
            raise self.error
        return "sha256:" + self.sha.hexdigest(), self.size


# === 12. Push ===


def chunks_setting(environ: Mapping[str, str]) -> bool:
    """Whether pushes store big layers as chunks: yes, unless DOGESTRY_CHUNKS=0 (whole layers, as before)."""
    text = environ.get("DOGESTRY_CHUNKS", "")
    if text not in ("", "0", "1"):
        raise UsageError("DOGESTRY_CHUNKS=%s is not 0 (whole layers) or 1 (chunked layers, the default)" % text)
    return text != "0"


class PushOptions(NamedTuple):
    """How to push: compression choice, temp dir, worker counts."""

    compression: str = "gzip"
    tempdir: Optional[str] = None
    level: int = GZIP_LEVEL
    gc_min_grace: float = GC_MIN_GRACE  # what the store's gc may at least wait (see Freshness)
    workers: int = max(os.cpu_count() or 1, 1)
    uploads: int = 2
    command: str = "push"  # what the user ran, for messages: push, import, copy, migrate
    platforms: str = "auto"  # what push makes of a tag (PLATFORM_MODES): "auto", "multi" or "single"
    chunked: bool = True  # store layers of at least CHUNKED_LAYER_MIN bytes as chunks (sub-layer dedup)

    def freshness(self, store: Store) -> Freshness:
        """A Freshness for one image this command stores in store."""
        return Freshness(store, self.gc_min_grace, command=self.command)


SPOOL_DEPTH = 4  # pieces waiting for the spool writer at least (more on more cores): slack for its fdatasyncs


class SpoolWriter(InOrderWorker):
    """A thread that writes pieces (bytes, or futures of bytes) to a file in the order given,
    hashing them if asked; at most DEPTH pieces wait, so memory stays bounded."""

    def __init__(self, path: str, depth: int, hashed: bool, write_through: bool):
        self.path, self.hashed = path, hashed
        self.size = 0
        self.pieces = []  # type: List[int]  # the size of every piece written, in order
        self.digest = ""
        self._sha = hashlib.sha256()
        self._file = OutputFile(path, write_through)
        super().__init__(depth, "dogestry-spool")

    def put(self, piece: Any) -> None:
        """Queue the next piece; raise the writer's error, if it had one."""
        if self.error is not None:
            raise self.error
        super().put(piece)

    def consume(self, piece: Any) -> None:
        import concurrent.futures  # lazy (start-up time): only parallel work needs it
        data = piece.result() if isinstance(piece, concurrent.futures.Future) else piece
        if self.hashed:
            self._sha.update(data)
        self._file.write(data)
        self.size += len(data)
        self.pieces.append(len(data))

    def __enter__(self) -> "SpoolWriter":
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self.join()
        try:
            self._file.close()
        except DogestryError as e:
            self.error = self.error or e
        if kind is None and self.error is not None:
            raise self.error
        self.digest = "sha256:" + self._sha.hexdigest()


class LayerPipeline:
    """Spools save-stream members while compressing them on all cores, and uploads finished
    layers in the background while the stream is still being read."""

    def __init__(self, store: Store, work_dir: str, progress: ProgressSink, options: PushOptions,
                 freshness: Optional[Freshness] = None, write_index: bool = True,
                 report: Optional[TransferReport] = None):
        self.store, self.work_dir, self.progress, self.options = store, work_dir, progress, options
        self.report = report or TransferReport()
        self.write_index = write_index  # False: blobs only, the caller writes index entries once it may
        self.freshness = freshness or options.freshness(store)
        self.abort = threading.Event()
        self.records = {}  # type: Dict[str, LayerRecord]
        self._lock = threading.Lock()
        self._gzip_pool = thread_pool(options.workers, "dogestry-gzip")
        self._upload_pool = thread_pool(options.uploads, "dogestry-upload")
        self._chunk_pool = thread_pool(CHUNK_TASKS, "dogestry-chunk")
        self._chunk_slots = threading.Semaphore(CHUNK_TASKS)
        self.chunk_hints = {}  # type: Dict[str, ChunkHint]  # chunks known stored, not asked about again
        self._hints_coming = None  # type: Optional[concurrent.futures.Future]
        self._futures = []  # type: List[concurrent.futures.Future]
        self._count = 0
        self._rows = {}  # type: Dict[str, TaskSink]  # a spooled member's progress row, by its file
        self._unnamed = 0
        self.failure = None  # type: Optional[BaseException]  # the first upload that failed

    def unnamed_label(self) -> str:
        """The label of a member's row while its layer's ID is unknown (renamed once it is)."""
        self._unnamed += 1
        return "layer %d" % self._unnamed

    def spool(self, reader: MemberReader, size: int, label: str, may_compress: bool, unpack: bool = False) -> Spool:
        """Write a member to a temp file, hashing it, gzip-compressed in parallel when that pays
        (unpack: a gzip member is also unpacked and hashed, in a thread, to learn its diffID).
        Its progress row stays open until upload() or drop() takes the spool.

        This thread reads and hashes; gzip runs on the pool; a SpoolWriter thread hashes and
        writes the output in order, so slow page-cache writes overlap with reading.
        """
        path = os.path.join(self.work_dir, "member-%d" % self._count)
        self._count += 1
        first = reader.read(CHUNK_GZ)
        compression = detect_compression(first)
        packed = None  # type: Optional[bytes]
        if compression == "none" and may_compress and self.options.compression == "gzip":
            if self.options.chunked and size >= CHUNKED_LAYER_MIN:
                return self._spool_chunked(first, reader, size, label)
            packed = compressed_sample(first, self.options.level)
        task = self.progress.task(label, "compressing" if packed is not None else "reading", size)
        raw_sha = hashlib.sha256()
        raw_size = 0
        unpacked = UnpackedHasher() if unpack and compression == "gzip" else None
        with SpoolWriter(path, max(SPOOL_DEPTH, self.options.workers), hashed=packed is not None,
                         write_through=self.store.keeps_files) as writer:
            chunk = first
            while chunk:
                if self.abort.is_set():
                    raise Interrupted("stopped")
                raw_sha.update(chunk)
                if unpacked is not None:
                    unpacked.put(chunk)
                raw_size += len(chunk)
                if packed is None:
                    writer.put(chunk)
                elif raw_size == len(first):
                    writer.put(packed)  # the sample already is the first member
                else:
                    writer.put(self._gzip_pool.submit(gzip_member, chunk, self.options.level))
                task.advance(len(chunk))
                chunk = reader.read(CHUNK_GZ)
        if raw_size != size:
            raise FormatError("docker save stream ended inside a layer (%d of %d bytes)" % (raw_size, size))
        raw_digest = "sha256:" + raw_sha.hexdigest()
        if packed is None:
            unpacked_digest, unpacked_size = unpacked.result() if unpacked is not None else (None, 0)
            if unpacked is not None and unpacked_digest is None:
                raise IntegrityError("%s is not valid gzip (%s)" % (label, unpacked.error))
            task.phase("read", None, human_size(raw_size) + ("" if compression == "none" else " " + compression))
            self._rows[path] = task
            return Spool(path, raw_digest, raw_size, raw_digest, raw_size, compression, None,
                         unpacked_digest, unpacked_size if unpacked_digest else None)
        task.phase("read", None, "%s -> %s gzip" % (human_size(raw_size), human_size(writer.size)))
        self._rows[path] = task
        return Spool(path, writer.digest, writer.size, raw_digest, raw_size, "gzip", tuple(writer.pieces))

    def learn_chunks(self, find: Callable[[], Dict[str, ChunkHint]]) -> None:
        """Find chunks known stored (chunk_hints) in the background; the first chunked layer waits for them."""
        self._hints_coming = self._chunk_pool.submit(find)

    def _spool_chunked(self, first: bytes, reader: MemberReader, size: int, label: str) -> Spool:
        """Store a layer's chunks the store lacks, on all cores, and spool its recipe (section 11):
        a Spool of the recipe, compression "chunked", whose raw digest is the layer's.  Each chunk
        is gzipped if a sample of it compresses (chunk_compresses), else stored as it is."""
        if self._hints_coming is not None:
            self.chunk_hints, self._hints_coming = self._hints_coming.result(), None
        path = os.path.join(self.work_dir, "recipe-%d" % self._count)
        self._count += 1
        task = self.progress.task(label, "chunking", size)
        started = time.monotonic()
        level = self.options.level
        futures = []  # type: List[concurrent.futures.Future]
        tar_hash = PieceHasher("dogestry-diffid")

        def took(piece: bytes) -> None:
            if self.abort.is_set():
                raise Interrupted("stopped")
            tar_hash.put(piece)
            task.advance(len(piece))

        pieces = PieceReader(first, reader.read, took)

        def on_chunk(chunk: bytes) -> None:
            self._chunk_slots.acquire()
            for done in futures[-CHUNK_TASKS:]:
                if done.done() and done.exception() is not None:
                    self._chunk_slots.release()
                    raise cast(BaseException, done.exception())
            futures.append(self._chunk_pool.submit(self._store_chunk, [chunk], level))

        meta_packer = zlib.compressobj(self.options.level, zlib.DEFLATED, 31)
        try:
            with OutputFile(path + ".meta") as meta:
                def on_meta(data: bytes) -> None:
                    meta.write(meta_packer.compress(data))

                splitter = LayerSplitter(on_meta, on_chunk)
                splitter.split(pieces, size)
                meta.write(meta_packer.flush())
            stored_chunks = [future.result() for future in futures]
            chunks = [(chunk_hex, chunk_size) for chunk_hex, chunk_size, _ in stored_chunks]
            diff_id, _ = tar_hash.result()
            recipe = LayerRecipe(diff_id, size, chunks, splitter.runs)
            digest, stored = write_recipe(path, recipe, path + ".meta", self.store.keeps_files)
        finally:
            tar_hash.join()
            with contextlib.suppress(OSError):
                os.unlink(path + ".meta")
        written = [n for _, _, n in stored_chunks if n is not None]
        seconds = max(time.monotonic() - started, 1e-6)
        task.phase("read", None, "%s as %d chunks, %d new (%s written) in %.1fs (%s/s)" % (
            human_size(size), len(chunks), len(written), human_size(sum(written)), seconds,
            human_size(size / seconds)))
        self._rows[path] = task
        return Spool(path, digest, stored, diff_id, size, "chunked")

    def _store_chunk(self, box: List[bytes], level: int) -> Tuple[str, int, Optional[int]]:
        """Store the chunk in box unless the store has it: (its hex, its size, the bytes written or
        None).  The box is emptied, so a gzipped chunk's bytes are freed while it is being written."""
        try:
            chunk = box.pop()
            if self.abort.is_set():
                raise Interrupted("stopped")
            chunk_hex = hashlib.sha256(chunk).hexdigest()
            key = chunk_key(chunk_hex)
            hint = self.chunk_hints.get(chunk_hex)
            if hint is not None:  # a recipe names it: the recipe is relied on instead (see chunk_hints)
                hint.rely(self.freshness)
                self.report.add_chunk(key, None)
                return chunk_hex, len(chunk), None
            age = self.store.age(key)
            if age is not None:
                self.freshness.relied_on(key, age)
                self.report.add_chunk(key, None)
                return chunk_hex, len(chunk), None
            size = len(chunk)
            packed = gzip_member(chunk, level) if chunk_compresses(chunk, level) else chunk
            if len(packed) >= size:  # a chunk object as big as its chunk is the bytes themselves
                packed = chunk
            del chunk
            self.store.put_bytes(key, packed, if_absent=True)
            self.freshness.written(key)
            self.report.add_chunk(key, len(packed))
            return chunk_hex, size, len(packed)
        finally:
            self._chunk_slots.release()

    def spool_bytes(self, data: bytes, label: str) -> Spool:
        """spool() for a member small enough to have been kept in memory."""
        path = os.path.join(self.work_dir, "small-%d" % self._count)
        with OutputFile(path) as f:
            f.write(data)
        try:
            with open(path, "rb") as f:
                return self.spool(MemberReader(f, len(data)), len(data), label, may_compress=True, unpack=True)
        finally:
            os.unlink(path)

    def upload(self, diff_id: str, spool: Spool) -> None:
        """Store a spooled layer's blob and its index entry, in the background."""
        raw_size = spool.tar_size if spool.tar_digest == diff_id else None
        record = LayerRecord(diff_id, spool.digest, spool.size, spool.compression, raw_size, spool.members)
        task = self._row(spool, diff_id)
        self._futures.append(self._upload_pool.submit(self._upload, record, spool.path, task))

    def upload_blob(self, spool: Spool) -> None:
        """Store a spooled blob as it is, without an index entry, in the background (finish()
        lists it under its digest)."""
        record = LayerRecord(spool.digest, spool.digest, spool.size, spool.compression)
        task = self._row(spool, spool.digest)
        self._futures.append(self._upload_pool.submit(self._upload, record, spool.path, task, False))

    def _row(self, spool: Spool, digest: str) -> TaskSink:
        """The spool's row (a new one if it has none), renamed to digest's short ID, waiting for an upload thread."""
        task = self._rows.pop(spool.path, None) or self.progress.task(digest[7:19], "waiting", None)
        task.rename(digest[7:19])
        task.phase("waiting", None)
        return task

    def drop(self, spool: Spool, diff_id: str, status: str = "already stored", remove: bool = True) -> None:
        """Remove a spooled member the store needs not (it has the layer; remove=False: leave
        the file); its row, if still open, says why under the layer's ID."""
        if remove:
            os.unlink(spool.path)
        task = self._rows.pop(spool.path, None)
        if task is not None:
            task.rename(diff_id[7:19])
            task.phase(status, None, "")
            task.finish(status)

    def already_stored(self, diff_id: str) -> None:
        """A row for a layer skipped unread: the store has it."""
        self.progress.task(diff_id[7:19], "already stored", None).finish("already stored")

    def _upload(self, record: LayerRecord, path: str, task: TaskSink, layer: bool = True) -> None:
        if not record.chunked:  # a chunked layer's row says what its chunks took; its recipe is small
            task.phase("uploading", record.size)
        try:
            key = blob_key(record.digest)
            advance = (lambda n: None) if record.chunked else task.advance
            if self.store.put_file(key, path, record.size, record.digest, advance, if_absent=True,
                                   consume=True):
                self.report.add(record.digest, record.size)
            else:
                self._keep_stored_blob(key, path, record, task)
            if self.write_index and layer:
                name_layer(self.store, record, self.freshness)
            else:  # unnamed until the caller names it: kept young (or found gone) like an index entry
                self.freshness.written(key)
        except BaseException as e:  # one failed layer stops the whole push at once
            with self._lock:
                first = self.failure is None
                self.failure = self.failure or e
            if first:
                self.cancel()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        task.finish("pushed")
        with self._lock:
            self.records[record.diff_id] = record

    def _keep_stored_blob(self, key: str, path: str, record: LayerRecord, task: "TaskSink") -> None:
        """The blob is stored already, maybe old and named by no index entry (a gc may be about to
        take it): refresh it, or upload it again where it cannot be refreshed (S3 copies at most 5 GiB)."""
        try:
            refreshed = self.store.touch(key)
        except StoreError:
            refreshed = False
        if refreshed:
            self.freshness.refreshed()
        else:
            self.store.put_file(key, path, record.size, record.digest, task.advance, consume=True)
            self.report.add(record.digest, record.size)

    def finish(self) -> Dict[str, LayerRecord]:
        """Wait for every upload; raise the first failure."""
        if self.failure is not None:
            raise self.failure
        for future in self._futures:
            future.result()
        return dict(self.records)

    def cancel(self, interrupted: bool = False) -> None:
        """Stop at once (an error or an interrupt): queued uploads never start, running ones stop
        at their next piece, and multipart uploads are aborted."""
        self.abort.set()
        for future in self._futures:
            future.cancel()
        self.store.cancel(interrupted)

    def close(self) -> None:
        """Stop all work and wait for the threads; rows of spools neither uploaded nor dropped end as "read"."""
        self.abort.set()
        for pool in (self._upload_pool, self._gzip_pool, self._chunk_pool):
            pool.shutdown(wait=True)
        for task in self._rows.values():
            task.finish("read")
        self._rows.clear()


def stored_layer(store: Store, diff_id: str) -> Optional[LayerRecord]:
    """The record of a layer already in the store, if its index entry may be trusted (the layer
    index rule: a checked record; older versions wrote entries for unchecked zstd layers) and
    its blob is really there."""
    try:
        record = LayerRecord.from_json(read_json(store, layer_index_key(diff_id)))
    except NotFound:
        return None
    except FormatError:
        return None
    if not record.checked or record.diff_id != diff_id or store.stat(blob_key(record.digest)) != record.size:
        return None
    return record


def reused_layer(store: Store, diff_id: str, freshness: Freshness) -> Optional[LayerRecord]:
    """A layer the store already has (stored_layer), noted as relied on by this push."""
    record = stored_layer(store, diff_id)
    if record is not None:
        freshness.seen(layer_index_key(diff_id), store.age(layer_index_key(diff_id)))
    return record


class ChunkHint(NamedTuple):
    """A chunk a stored recipe names: the recipe's key, its age, and when (monotonic) that was seen."""

    recipe_key: str
    age: float
    seen_at: float

    def rely(self, freshness: Freshness) -> None:
        """Tell freshness that the command relies on the recipe (as old as it is by now)."""
        freshness.relied_on(self.recipe_key, self.age + freshness.clock() - self.seen_at)


HINT_RECIPES_MAX = 16      # recipes a push reads to learn which chunks the store has (2 at a time) ...
HINT_CHUNKS_MAX = 200000   # ... until they name this many chunks (some 200 GiB of layers)
HINT_TAGS_LISTED = 10000   # ... at most this many of the repository's tags listed to find its newest


def chunk_hints(store: Store, ref: ImageRef, platform: Optional[Platform],
                clock: Callable[[], float]) -> Dict[str, ChunkHint]:
    """The chunks the recipes of the images that `ref` and its repository's newest tag name (an
    image, or an index's entry for platform, if known) hold, so a rebuilt image's push (import,
    copy) asks the store about none of them.  It relies on such a recipe as on any object
    (Freshness), and gc keeps every chunk a recipe it keeps names, so the chunks stay while the
    recipe does.  A tag, image or recipe that cannot be read gives no hints."""
    prefix = "repositories/%s/" % ref.name
    tags = [e for e in itertools.islice(store.list_entries(prefix), HINT_TAGS_LISTED) if "/" not in e.key[len(prefix):]]
    refs = [ref] + [ImageRef(ref.name, e.key[len(prefix):]) for e in sorted(tags, key=lambda e: e.age)[:1]]
    records = {}  # type: Dict[str, LayerRecord]
    for image_hex in dict.fromkeys(filter(None, (_hinted_image(store, r, platform) for r in refs))):
        with contextlib.suppress(DogestryError):
            records.update((r.digest, r) for r in load_stored_image(store, image_hex).layers if r.chunked)

    def read(record: LayerRecord) -> Tuple[Optional[ChunkHint], List[Tuple[str, int]]]:
        seen_at = clock()  # before the age is asked: the age is then over-, never under-estimated
        try:
            age = store.age(blob_key(record.digest))
            chunks = read_recipe(store, record).chunks
        except DogestryError:
            return None, []
        return (None if age is None else ChunkHint(blob_key(record.digest), age, seen_at)), chunks

    hints = {}  # type: Dict[str, ChunkHint]
    chosen = sorted(records.values(), key=lambda r: r.digest)[:HINT_RECIPES_MAX]
    with thread_pool(2, "dogestry-hints") as pool:
        for start in range(0, len(chosen), 2):
            if len(hints) >= HINT_CHUNKS_MAX:
                break
            for hint, chunks in pool.map(read, chosen[start:start + 2]):
                if hint is not None:
                    hints.update((chunk_hex, hint) for chunk_hex, _ in chunks)
    return hints


def _hinted_image(store: Store, ref: ImageRef, platform: Optional[Platform]) -> Optional[str]:
    """The image hex a tag names (an index: its entry for platform); None if there is none."""
    try:
        target = read_tag_target(store, ref)
        index = target_index(store, ref, target)
        if index is None:
            return target.image_hex
        return None if platform is None else index_entry_image(store, index, platform)
    except DogestryError:
        return None


def push_image(docker: DockerClient, store: Store, text: str, progress: ProgressSink,
               options: PushOptions, report: Optional[TransferReport] = None) -> str:
    """Push one local image (NAME[:TAG] or ID) and its tag; return the image ID (report: what was sent)."""
    report = report or TransferReport()
    ref, info = None, None  # type: Optional[ImageRef], Optional[Dict[str, Any]]
    if not text.startswith("sha256:") and not _HEX64.match(text):
        ref = parse_image_ref(text)  # a name first, as docker resolves it...
        info = docker.inspect_image(str(ref))
    if info is None and image_id_prefix(text) is not None:
        ref, info = None, docker.inspect_image(text)  # ...then an image ID (prefix): stored untagged
    if info is None:
        raise NotFound("no such image on the Docker host: %s" % (ref or text,))
    image_id = info["Id"]
    image_hex = digest_hex(image_id)
    diff_ids = image_diff_ids(info)
    platform = config_platform({"os": info.get("Os"), "architecture": info.get("Architecture"),
                                "variant": info.get("Variant")})
    store.ensure()
    if ref is not None and tag_is_immutable(store, ref):  # before any layer goes up
        check_tag_may_move(store, ref, image_hex, index_keeping(store, ref, image_hex, platform, options.platforms))
    freshness = options.freshness(store)
    stored = _keep_stored_image(store, image_hex, freshness)
    if stored is not None:
        progress.note("%s: image %s is already stored" % (str(ref or text), image_hex[:12]))
    else:
        freshness = options.freshness(store)
        size = info.get("Size")
        chunkable = not (isinstance(size, int) and size < CHUNKED_LAYER_MIN)  # (a layer may be chunked)
        stored = _push_new_image(docker, store, image_id, diff_ids, progress, options, freshness, report,
                                 (ref, platform) if ref is not None and chunkable else None)
    report.image_id, report.layers = image_id, stored.layers
    report.platform = str(platform) if platform.architecture else None
    if ref is not None:
        index = tag_platform_image(store, ref, stored, platform, options.platforms, freshness)
        shown = "" if index is None else " as its %s image (it holds %s)" % (platform, platform_list(index_images(index)))
        progress.note("pushed %s (%s) to %s%s" % (ref, image_hex[:12], store.url, shown))
        report.tag, report.index = str(ref), None if index is None else index.digest
    return image_id


def write_tag(store: Store, ref: ImageRef, image_hex: str, same: Sequence[str] = ()) -> None:
    """Point a tag at an image; what it named before is recorded for gc (pulls may be reading it).

    TagImmutable, and nothing written, if the tag is immutable and names another image (`same`:
    other IDs of this image, which it may name).
    """
    point_tag(store, ref, TagTarget(image_hex), same)


def point_tag(store: Store, ref: ImageRef, target: TagTarget, same: Sequence[str] = ()) -> None:
    """Point a tag at an image, or at a manifest that is no image (TagImmutable, and nothing
    written, if the tag is immutable and names something else); what it named before (an image
    or a manifest) is recorded for gc: pulls may be reading it."""
    content = target.image_hex or "@" + str(target.manifest)
    check_tag_may_move(store, ref, content, same)
    new = target.image_hex or digest_hex(str(target.manifest))
    with contextlib.suppress(NotFound, FormatError):
        old = read_tag_target(store, ref)
        old_hex = old.image_hex or digest_hex(str(old.manifest))
        if old_hex != new:
            record_untagged(store, old_hex, [ref])
    store.put_bytes(tag_key(ref), content.encode())


def record_untagged(store: Store, image_hex: str, refs: Sequence[ImageRef]) -> None:
    """Note that tags were taken from an image (or a manifest pushed through the registry that is
    no image: its hex): gc spares it for its grace period from now."""
    import datetime  # lazy (start-up time): only dated documents and signatures need it
    write_json(store, UNTAGGED_PREFIX + image_hex, {
        "tags": [str(r) for r in refs],
        "untagged": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})


def _keep_stored_image(store: Store, image_hex: str, freshness: Freshness) -> Optional[StoredImage]:
    """If the image is stored, keep it whole until its tag is written (return it, as stored); None
    if it is not (or a gc took part of it meanwhile: then it is pushed again)."""
    manifest_key, config_key = image_key(image_hex, "manifest.json"), image_key(image_hex, "config.json")
    manifest_age = store.age(manifest_key)
    if manifest_age is None:
        return None
    try:
        image = load_stored_image(store, image_hex)
    except NotFound:
        return None
    freshness.seen(manifest_key, manifest_age)
    freshness.seen(config_key, store.age(config_key))
    relied = sorted({relied_key(r) for r in image.layers})
    with thread_pool(min(8, max(1, len(relied))), "dogestry-ages") as pool:
        for key, age in zip(relied, pool.map(store.age, relied)):
            freshness.seen(key, age)
    must_exist = {blob_key(r.digest): r.size for r in image.layers}  # type: Dict[str, Optional[int]]
    must_exist.update({config_key: image.config_size, manifest_key: None})
    try:
        freshness.secure(_index_rewriters(store, image.layers), must_exist)
    except IntegrityError:
        return None
    return image


def _index_rewriters(store: Store, records: Sequence[LayerRecord]) -> Dict[str, Callable[[], None]]:
    """For each layer's index entry, how to write it again if a gc removed it (checked layers
    only: an unchecked one has no entry to write, and its blob cannot be written again)."""
    return {layer_index_key(r.diff_id): functools.partial(write_json, store, layer_index_key(r.diff_id), r.to_json())
            for r in records if r.checked}


def _push_new_image(docker: DockerClient, store: Store, image_id: str, diff_ids: List[str],
                    progress: ProgressSink, options: PushOptions, freshness: Freshness,
                    report: Optional[TransferReport] = None,
                    tagged: Optional[Tuple[ImageRef, Platform]] = None) -> StoredImage:
    """Store an image the store lacks from the engine's docker save; return it as stored
    (tagged: the tag it is pushed to, and its platform, whose images' chunks it may reuse)."""
    known = {}  # type: Dict[str, LayerRecord]
    for diff_id in set(diff_ids):
        record = reused_layer(store, diff_id, freshness)
        if record is not None:
            known[diff_id] = record
    wanted = set(diff_ids) - set(known)
    freshness.refresh(freshness.min_grace / 2, _index_rewriters(store, list(known.values())))  # the wait hides here
    if known:
        progress.note("%d of %d layers already stored" % (len(set(known)), len(set(diff_ids))))
    with work_directory(options.tempdir or store.spool_dir()) as work:
        pipeline = LayerPipeline(store, work, progress, options, freshness, report=report)
        if wanted and tagged and options.chunked:  # while the engine exports
            pipeline.learn_chunks(functools.partial(chunk_hints, store, tagged[0], tagged[1], freshness.clock))
        try:
            def spool(entry: TarEntry, reader: MemberReader) -> Optional[Spool]:
                return _spool_member(entry, reader, image_id, wanted, known, pipeline)

            progress.note("waiting for the Docker engine to export image %s (docker save)..." % image_id[7:19])
            with contextlib.closing(docker.save(image_id)) as stream:
                contents = read_save_stream(stream, spool, pipeline.abort)
            saved = parse_saved_image(contents, image_id)
            if saved.diff_ids != diff_ids:
                raise FormatError("docker save returned other layers than docker inspect reported")
            _upload_precompressed(contents, saved, wanted, pipeline)
            known.update(pipeline.finish())
        except BaseException as e:
            pipeline.cancel(interrupted=isinstance(e, KeyboardInterrupt))
            if isinstance(e, Interrupted) and pipeline.failure is not None:
                raise pipeline.failure  # the layer that failed, not the "stopped" it caused here
            raise
        finally:
            pipeline.close()
    config_digest = sha256_digest(saved.config)
    if config_digest != image_id:
        raise IntegrityError("the saved config hashes to %s, not to the image ID %s" % (config_digest, image_id))
    layers = [known[d] for d in diff_ids]
    _secure_and_write_image(store, freshness, image_id, saved.config, layers)
    return StoredImage(image_id, layers, [], len(saved.config))


_OCI_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_PODMAN_LAYER = re.compile(r"^([0-9a-f]{64})\.tar$")  # podman's docker-archive: <diffID>.tar


def _spool_member(entry: TarEntry, reader: MemberReader, image_id: str, wanted: Set[str],
                  known: Dict[str, LayerRecord], pipeline: LayerPipeline) -> Optional[Spool]:
    """Decide what to do with a large save-stream member: upload, drop, or keep for later.

    v1 saves name layers <v1-id>/layer.tar, so only their hash tells which layer they are:
    they are compressed speculatively while read.  OCI saves name blobs by digest, and
    podman names layers <diffID>.tar, so a layer the store already has is skipped unread.
    """
    blob = _OCI_BLOB.match(entry.name) or _PODMAN_LAYER.match(entry.name)
    named = "sha256:" + blob.group(1) if blob else None
    if named == image_id or not (blob or entry.name.endswith("/layer.tar")):
        return None  # the config, or metadata: keep it in memory
    if named in known:
        reader.skip()
        pipeline.already_stored(named)
        return Spool("", named, entry.size, named, entry.size, "none")
    if named is not None and named not in wanted:  # e.g. docker 29's compressed layer blobs: renamed once unpacked
        return pipeline.spool(reader, entry.size, pipeline.unnamed_label(), may_compress=False, unpack=True)
    label = named[7:19] if named else pipeline.unnamed_label()  # v1 saves: the diffID is known once read
    spooled = pipeline.spool(reader, entry.size, label, may_compress=True)
    if named is not None and spooled.raw_digest != named:
        raise IntegrityError("save stream blob %s does not match its digest" % entry.name)
    if spooled.raw_digest in wanted:
        wanted.discard(spooled.raw_digest)
        pipeline.upload(spooled.raw_digest, spooled)
    else:  # a layer the store already has (or one this image holds twice)
        pipeline.drop(spooled, spooled.raw_digest, "already stored" if spooled.raw_digest in known else "repeated")
    return spooled._replace(path="")


def _upload_precompressed(contents: SaveContents, saved: SavedImage, wanted: Set[str],
                          pipeline: LayerPipeline) -> None:
    """Layers whose hash is not their diffID: docker 29 exports stored (compressed) blobs; keep them as they are."""
    for member, diff_id in zip(saved.layer_members, saved.diff_ids):
        spool = contents.spooled.get(member)
        if diff_id not in wanted:
            if spool is not None and spool.path:  # read to learn its diffID: the store has it
                pipeline.drop(spool, diff_id, remove=False)
            continue
        if spool is None and member in contents.small:  # a small layer (docker 25+ saves), kept in memory
            spool = pipeline.spool_bytes(contents.small[member], diff_id[7:19])
        if spool is None or not spool.path:
            raise FormatError("docker save stream lacks layer %s" % diff_id)
        if spool.tar_digest not in (None, diff_id):
            raise IntegrityError("layer %s in the save stream does not match its diffID" % diff_id)
        wanted.discard(diff_id)
        pipeline.upload(diff_id, spool)
    if wanted:
        raise FormatError("docker save stream lacks layers: %s" % ", ".join(sorted(wanted)))


def _secure_and_write_image(store: Store, freshness: Freshness, image_id: str, config: bytes,
                            layers: List[LayerRecord]) -> None:
    """Make sure every layer is stored and stays so (Freshness.secure), then write the image."""
    freshness.secure(_index_rewriters(store, layers), {blob_key(r.digest): r.size for r in layers})
    _write_image(store, image_id, config, layers)


def _write_image(store: Store, image_id: str, config: bytes, layers: List[LayerRecord]) -> None:
    """Write config and manifest (the manifest last), once every layer blob is known to be stored.

    Both are written even if there (a gc may be about to take an old copy: a new one is young)."""
    import datetime  # lazy (start-up time): only dated documents and signatures need it
    if len(config) > DOCUMENT_LIMIT:  # pulls would refuse it: bigger documents are an attack
        raise FormatError("the image config is larger than %s" % human_size(DOCUMENT_LIMIT))
    image_hex = digest_hex(image_id)
    store.put_bytes(image_key(image_hex, "config.json"), config)
    write_json(store, image_key(image_hex, "manifest.json"), doc={
        "mediaType": MANIFEST_MEDIA_TYPE,
        "schemaVersion": 2,
        "config": {"digest": image_id, "size": len(config)},
        "layers": [r.to_json() for r in layers],
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dogestry": __version__,
    })


# === 13. Pull ===


def tar_header(name: str, size: int) -> bytes:
    """A tar header block for a regular file (mode 0644, mtime 0)."""
    import tarfile  # lazy (start-up time): only archives need it
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_padding(size: int) -> bytes:
    """Zero bytes that fill a member's data up to the next 512-byte block."""
    return b"\0" * (-size % 512)


TAR_END = b"\0" * 1024


def tar_bytes_member(name: str, data: bytes) -> bytes:
    """A whole small tar member."""
    return tar_header(name, len(data)) + data + tar_padding(len(data))


class BlobFeeder:
    """Reads, verifies and (for gzip blobs whose raw size is known) gunzips a blob in a
    thread, so store reads and decompression overlap with docker reading the tar."""

    def __init__(self, store: Store, record: LayerRecord, inflate: bool, key: Optional[str] = None):
        import queue  # lazy (start-up time): only work in threads needs it
        self.store, self.record, self.inflate = store, record, inflate
        self.key = key or blob_key(record.digest)
        self.queue = queue.Queue(maxsize=2)  # type: queue.Queue
        self.stop = threading.Event()
        # the unpacked bytes' sha256 (the diffID), in a thread of its own: in this one, every piece
        # waited for it before it was handed on (pulls of the bench image ran ~0.25 s longer)
        self.unpacked = PieceHasher("dogestry-diffid") if inflate else None
        self.thread = start_thread(self._run, (), "dogestry-blob")

    def _put(self, item: Tuple[str, Any]) -> None:
        import queue  # lazy (start-up time): only work in threads needs it
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            self._feed()
            self._put(("end", self._verify()))
        except zlib.error as e:
            self._put(("error", self._corrupt(e)))
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(("error", e))
        finally:
            if self.unpacked is not None:
                self.unpacked.join()

    def _feed(self) -> None:
        """Read the blob and give out its bytes (gunzipped if asked)."""
        record = self.record
        self.stored, self.stored_size = hashlib.sha256(), 0
        with contextlib.closing(self.store.open(self.key, record.size)) as f:
            if self.inflate and record.members:
                self._inflate_members(f, record.members)
            else:
                self._read(f, GzipInflater() if self.inflate else None)

    def _corrupt(self, e: zlib.error) -> IntegrityError:
        return IntegrityError("%s: blob %s is corrupt (%s); nothing was loaded" % (self.store.url, self.record.digest, e))

    def _took(self, data: bytes) -> None:
        """Count bytes read from the store."""
        self.stored.update(data)
        self.stored_size += len(data)

    def _give(self, out: bytes) -> None:
        if self.unpacked is not None:  # else what is given is what was read, hashed once by _took
            self.unpacked.put(out)
        self._put(("data", out))

    def _read(self, f: IO[bytes], inflater: Optional[GzipInflater]) -> None:
        """The blob as it comes (gunzipped by one inflater if asked)."""
        while not self.stop.is_set():
            data = f.read(CHUNK)
            if not data:
                break
            self._took(data)
            for out in (inflater.feed(data) if inflater else (data,)):
                self._give(out)
        if inflater:
            for out in inflater.finish():
                self._give(out)

    def _inflate_members(self, f: IO[bytes], members: Sequence[int]) -> None:
        """A gzip blob we pushed, gunzipped member by member on all cores, output in order."""
        workers = max(os.cpu_count() or 1, 1)
        pending = collections.deque()  # type: collections.deque
        with thread_pool(workers, "dogestry-gunzip") as pool:
            for size in members:
                if self.stop.is_set():
                    return
                data = f.read(size)
                self._took(data)
                if len(data) != size:
                    return  # short: _verify names the blob corrupt
                pending.append(pool.submit(inflate_member, data))
                while len(pending) >= workers:
                    self._give(pending.popleft().result())
            while pending:
                self._give(pending.popleft().result())
        self._took(f.read(1))  # members cover the blob: anything more is corruption (_verify sees the size)

    def _verify(self) -> Optional[Exception]:
        """The error to raise if what was read is not the blob the record names (None if it is)."""
        record = self.record
        if self.stored_size != record.size or "sha256:" + self.stored.hexdigest() != record.digest:
            return IntegrityError("%s: blob %s is corrupt (%d bytes, sha256:%s); nothing was loaded"
                                  % (self.store.url, record.digest, self.stored_size, self.stored.hexdigest()))
        if self.unpacked is not None and self.unpacked.result() != (record.diff_id, record.raw_size):
            return IntegrityError("%s: blob %s does not unpack to layer %s; nothing was loaded"
                                  % (self.store.url, record.digest, record.diff_id))
        return None

    def chunks(self, on_read: Callable[[int], None]) -> Iterator[bytes]:
        """The blob's bytes, the last piece held back until the whole blob is verified.

        Withholding the tail means a corrupt blob never reaches docker whole: the load
        sees a truncated tar and fails, so nothing is loaded or tagged.
        """
        held = None  # type: Optional[bytes]
        try:
            while True:
                kind, value = self.queue.get()
                if kind == "data":
                    if held is not None:
                        yield held
                        on_read(len(held))
                    held = value
                    continue
                if kind == "error" or value is not None:
                    raise value
                if held is not None:
                    yield held
                    on_read(len(held))
                return
        finally:
            self.stop.set()
            self.thread.join()


CHUNK_FETCHES = 8  # chunks of a layer read from the store at once (each at most CHUNK_MAX, stored)


class ChunkedFeeder(BlobFeeder):
    """BlobFeeder for a chunked layer: reads its recipe, fetches its chunks CHUNK_FETCHES at a
    time in a pool (each gunzipped there), and gives out the tar the runs make, checked against
    the diffID and size before its last piece.  window (first, last): only those bytes of the
    tar, each chunk they take bytes from checked against its sha256 instead.  recipe_path: the
    recipe in a local file, if it is not stored yet."""

    def __init__(self, store: Store, record: LayerRecord, window: Optional[Tuple[int, int]] = None,
                 recipe_path: Optional[str] = None):
        self.window, self.recipe_path = window, recipe_path
        super().__init__(store, record, window is None)

    def _feed(self) -> None:
        local = open(self.recipe_path, "rb") if self.recipe_path else None
        recipe, metadata = open_recipe(self.store, self.record, local)
        with contextlib.closing(metadata.stream):
            if self.window is None:
                self._assemble(recipe, metadata)
            else:
                self._assemble_window(recipe, metadata, *self.window)

    def _corrupt(self, e: zlib.error) -> IntegrityError:
        return IntegrityError("%s: a chunk of layer %s is corrupt (%s); nothing was loaded"
                              % (self.store.url, self.record.diff_id, e))

    def _took(self, data: bytes) -> None:
        """Nothing to count: the tar's bytes are checked against the diffID."""

    def _fetch(self, chunk_hex: str, size: int) -> bytes:
        """A chunk's bytes, gunzipped if stored so."""
        if self.stop.is_set():
            raise Interrupted("stopped")
        try:
            data = self.store.get_bytes(chunk_key(chunk_hex), limit=CHUNK_OBJECT_MAX)
        except NotFound:
            raise IntegrityError("%s: chunk %s of layer %s is missing (deleted by hand?); nothing was loaded"
                                 % (self.store.url, chunk_hex[:12], self.record.diff_id))
        data = unpack_chunk(data, size)
        if len(data) != size:
            raise IntegrityError("%s: chunk %s of layer %s is %d bytes, not %d; nothing was loaded"
                                 % (self.store.url, chunk_hex[:12], self.record.diff_id, len(data), size))
        if self.window is not None and hashlib.sha256(data).hexdigest() != chunk_hex:
            raise IntegrityError("%s: chunk %s of layer %s is corrupt (changed by hand?)"
                                 % (self.store.url, chunk_hex[:12], self.record.diff_id))
        return data

    def _assemble(self, recipe: LayerRecipe, metadata: InflatingReader) -> None:
        """Give out the runs in order: metadata bytes and chunk contents, in pieces of at most CHUNK."""
        pending = collections.deque()  # type: collections.deque
        todo = iter(recipe.chunks)
        held = b""
        with thread_pool(CHUNK_FETCHES, "dogestry-chunk") as pool:
            def fill() -> None:
                while len(pending) < CHUNK_FETCHES:
                    nxt = next(todo, None)
                    if nxt is None:
                        return
                    pending.append(pool.submit(self._fetch, *nxt))

            try:
                for index, run in enumerate(recipe.runs):
                    while run and not self.stop.is_set():
                        if index % 2 == 0:
                            piece = metadata.read(min(run, CHUNK))
                        else:
                            if not held:
                                fill()
                                held = pending.popleft().result()
                            piece, held = held[:min(run, CHUNK)], held[min(run, CHUNK):]
                        run -= len(piece)
                        self._took(piece)
                        self._give(piece)
            finally:
                for future in pending:
                    future.cancel()
        if not self.stop.is_set() and not metadata.at_end():
            raise IntegrityError("%s: the recipe of layer %s holds more metadata than its runs use"
                                 % (self.store.url, self.record.diff_id))

    def _assemble_window(self, recipe: LayerRecipe, metadata: InflatingReader, first: int, last: int) -> None:
        """Give out bytes first..last of the tar: the metadata read up to there (it is small), and
        of the chunks only those holding content in the window."""
        tar_pos = content_pos = 0
        with thread_pool(CHUNK_FETCHES, "dogestry-chunk") as pool:
            content = ChunkWindow(recipe.chunks, content_window(recipe.runs, first, last), self._fetch, pool)
            try:
                for index, run in enumerate(recipe.runs):
                    if tar_pos > last or self.stop.is_set():
                        break
                    if index % 2 == 0:
                        left = run
                        while left and tar_pos <= last and not self.stop.is_set():
                            piece = metadata.read(min(left, CHUNK))
                            if tar_pos + len(piece) > first:
                                self._give(piece[max(first - tar_pos, 0):last + 1 - tar_pos])
                            tar_pos += len(piece)
                            left -= len(piece)
                        continue
                    start, end = max(tar_pos, first), min(tar_pos + run, last + 1)
                    for piece in content.read(content_pos + start - tar_pos, end - start):
                        if self.stop.is_set():
                            break
                        self._give(piece)
                    tar_pos += run
                    content_pos += run
            finally:
                content.cancel()

    def _verify(self) -> Optional[Exception]:
        if self.unpacked is not None and self.unpacked.result() != (self.record.diff_id, self.record.raw_size):
            return IntegrityError("%s: the chunks of layer %s do not make it (corrupt, or changed by hand); "
                                  "nothing was loaded" % (self.store.url, self.record.diff_id))
        return None


def content_window(runs: Sequence[int], first: int, last: int) -> Tuple[int, int]:
    """Which bytes of a chunked layer's content (its chunks joined in order) bytes first..last
    of its tar hold: [start, end) (empty if the window holds metadata only)."""
    tar_pos = content_pos = 0
    start = end = None  # type: Optional[int]
    for index, run in enumerate(runs):
        if index % 2:
            lo, hi = max(tar_pos, first), min(tar_pos + run, last + 1)
            if lo < hi:
                start = content_pos + lo - tar_pos if start is None else start
                end = content_pos + hi - tar_pos
            content_pos += run
        tar_pos += run
    return (start, end) if start is not None and end is not None else (0, 0)


class ChunkWindow:
    """The content bytes [start, end) of a chunked layer, from the chunks holding them only,
    fetched CHUNK_FETCHES ahead in a pool; read with increasing offsets."""

    def __init__(self, chunks: Sequence[Tuple[str, int]], window: Tuple[int, int],
                 fetch: Callable[[str, int], bytes], pool: "concurrent.futures.ThreadPoolExecutor"):
        start, end = window
        offsets = itertools.accumulate([0] + [size for _, size in chunks])
        self.todo = iter([(offset, chunk) for offset, chunk in zip(offsets, chunks)
                          if offset < end and offset + chunk[1] > start])
        self.fetch, self.pool = fetch, pool
        self.pending = collections.deque()  # type: collections.deque  # (offset, future of the chunk's bytes)
        self.data, self.data_start = b"", 0

    def read(self, offset: int, n: int) -> Iterator[bytes]:
        """n bytes from offset, in pieces of at most CHUNK."""
        while n > 0:
            while offset >= self.data_start + len(self.data):
                self._fill()
                if not self.pending:
                    raise FormatError("a chunked layer's recipe names less content than its runs")
                self.data_start, future = self.pending.popleft()
                self.data = future.result()
            at = offset - self.data_start
            piece = self.data[at:at + min(n, CHUNK)]
            yield piece
            offset += len(piece)
            n -= len(piece)

    def _fill(self) -> None:
        while len(self.pending) < CHUNK_FETCHES:
            nxt = next(self.todo, None)
            if nxt is None:
                return
            offset, (chunk_hex, size) = nxt
            self.pending.append((offset, self.pool.submit(self.fetch, chunk_hex, size)))

    def cancel(self) -> None:
        """Fetch nothing more."""
        for _, future in self.pending:
            future.cancel()


def layer_tar_chunks(store: Store, record: LayerRecord, on_read: Callable[[int], None]) -> Iterator[bytes]:
    """A stored layer's uncompressed tar (what its diffID names), checked before its last piece is given out."""
    if record.chunked:
        return ChunkedFeeder(store, record).chunks(on_read)
    return verified_blob_chunks(store, record, on_read, record.compression == "gzip")


def chunked_tar_range(store: Store, record: LayerRecord, first: int, last: int) -> Iterator[bytes]:
    """Bytes first..last of a chunked layer's uncompressed tar: the whole tar checked against its
    diffID, a part of it chunk by chunk (against their sha256), before its last piece is given out."""
    if first == 0 and last == record.tar_size - 1:
        return layer_tar_chunks(store, record, lambda n: None)
    return ChunkedFeeder(store, record, (first, last)).chunks(lambda n: None)


def chunked_layer(store: Store, digest: str) -> Optional[LayerRecord]:
    """The chunked layer whose uncompressed tar has that sha256 digest (its diffID), as its index
    entry names it, with its recipe stored; None if the store has none (one GET, one HEAD)."""
    try:
        record = LayerRecord.from_json(read_json(store, layer_index_key(digest)))
    except (NotFound, FormatError):
        return None
    if not record.chunked or record.diff_id != digest:
        return None
    return record if store.stat(blob_key(record.digest)) == record.size else None


def unpack_chunk(data: bytes, size: int) -> bytes:
    """A chunk object's chunk (size: the chunk's, from its recipe): the object itself if it is as
    big as the chunk, else its one gzip member gunzipped (zlib.error if it is none; section 9)."""
    return data if len(data) == size else inflate_member(data)


def inflate_member(data: bytes) -> bytes:
    """One whole gzip member, gunzipped (zlib.error unless it is exactly one member, of at most
    CHUNK_GZ bytes unpacked, as our pushes write them)."""
    inflate = zlib.decompressobj(31)
    out = inflate.decompress(data, CHUNK_GZ + 1)
    if not inflate.eof or inflate.unused_data or inflate.unconsumed_tail or len(out) > CHUNK_GZ:
        raise zlib.error("a gzip member does not end where the stored member sizes say")
    return out


def verified_blob_chunks(store: Store, record: LayerRecord, on_read: Callable[[int], None],
                         inflate: bool = False, key: Optional[str] = None) -> Iterator[bytes]:
    """A stored blob's bytes (gunzipped if inflate), verified before its last piece is given out.

    key: where the bytes are, if not the layer's blob (an image config)."""
    return BlobFeeder(store, record, inflate, key).chunks(on_read)


def layer_tar_path(record: LayerRecord) -> str:
    """A layer's member in what docker load reads: <diffID hex>/layer.tar."""
    return "%s/layer.tar" % digest_hex(record.diff_id)


def stored_layer_members(store: Store, image: StoredImage, send: Callable[[int], bool], sent: Set[str],
                         progress: ProgressSink, inflate: bool, paths: List[str],
                         words: Tuple[str, str] = ("loading", "loaded"),
                         member: Callable[[LayerRecord], str] = layer_tar_path) -> Iterator[bytes]:
    """Tar members of an image's layers (those send(index) wants and not already in `sent`),
    named member(record), verified as they go; each one's name is added to `paths`.
    words: what progress says while and after a layer goes."""
    for index, record in enumerate(image.layers):
        path = member(record)
        paths.append(path)
        if not send(index) or path in sent:
            continue
        sent.add(path)
        gunzip = inflate and record.compression == "gzip" and record.raw_size is not None
        size = record.raw_size if (gunzip or record.chunked) and record.raw_size is not None else record.size
        task = progress.task(record.diff_id[7:19], words[0], size)
        yield tar_header(path, size)
        if record.chunked:
            yield from ChunkedFeeder(store, record).chunks(task.advance)
        else:
            yield from verified_blob_chunks(store, record, task.advance, gunzip)
        yield tar_padding(size)
        task.finish(words[1])


def load_tar_stream(store: Store, image: StoredImage, config: bytes, repo_tags: List[str],
                    missing: Set[int], progress: ProgressSink, inflate: bool = True,
                    before_manifest: Callable[[], None] = lambda: None) -> Iterator[bytes]:
    """The tar docker load reads: config, the missing layers as stored, manifest.json (once
    before_manifest() has returned)."""
    image_hex = digest_hex(sha256_digest(config))
    yield tar_bytes_member("%s.json" % image_hex, config)
    paths = []  # type: List[str]
    yield from stored_layer_members(store, image, missing.__contains__, set(), progress, inflate, paths)
    before_manifest()
    manifest = [{"Config": "%s.json" % image_hex, "RepoTags": repo_tags or None, "Layers": paths}]
    yield tar_bytes_member("manifest.json", json.dumps(manifest).encode())
    yield TAR_END


# dockerd reads the whole tar of a load into a temp dir before it registers a layer, one
# after the other: a big image loaded at once leaves the engine waiting for the tar, then
# the cores idle while it registers.  So a pull cuts the layers it sends into batches of at
# least DockerClient.load_batch bytes and loads each as an image of its own (a "partial"
# image: the config of the first layers up to that batch, labelled PARTIAL_LABEL), the next
# batch streaming while the engine registers the one before; the engine finds the layers
# of earlier batches by chain ID, so a load holds its manifest back until the load before
# it has finished.  The partial images are deleted once the image is loaded, or the pull
# has failed.  Only into Docker's own layer store (DockerClient.takes_partial_loads).  A pull
# killed mid-way leaves its partial images: the next successful pull of the image removes
# them (PARTIAL_FOR_LABEL names the image they were for).

PARTIAL_LABEL = "org.dogestry.partial"
PARTIAL_FOR_LABEL = "org.dogestry.partial.for"
PARTIAL_JOIN_WAIT = 1.0  # after a failure, how long the other loads' threads get to end


def load_batches(image: StoredImage, missing: Set[int], least: int) -> List[List[int]]:
    """The missing layers in order, cut into batches of at least `least` bytes (a smaller tail
    joins the batch before it); one batch if least is 0."""
    batches, size = [[]], 0  # type: List[List[int]], int
    for index in sorted(missing):
        if least and size >= least:
            batches.append([])
            size = 0
        batches[-1].append(index)
        record = image.layers[index]
        size += record.raw_size if record.raw_size is not None else record.size
    if len(batches) > 1 and size < least:
        batches[-2].extend(batches.pop())
    return [b for b in batches if b]


def partial_config(config: bytes, layers: int, nonce: str) -> bytes:
    """The config of a partial image: the image's first `layers` layers, no history, labelled
    PARTIAL_LABEL=nonce (so it is unique to one pull and easy to find) and PARTIAL_FOR_LABEL=the
    ID of the image (so a later pull of it can remove what a killed one left)."""
    doc = parse_json(config, "the image config", IMAGE_CONFIG_SHAPE)
    inner = doc.get("config") or {}  # type: Dict[str, Any]
    labels = dict(inner.get("Labels") or {}, **{PARTIAL_LABEL: nonce, PARTIAL_FOR_LABEL: sha256_digest(config)})
    doc = dict(doc, history=[], rootfs=dict(doc["rootfs"], diff_ids=doc["rootfs"]["diff_ids"][:layers]),
               config=dict(inner, Labels=labels))
    return json.dumps(doc, sort_keys=True).encode()


class BatchLoad:
    """One docker load of a batch of layers, in a thread.  `sent` is set once its layers are
    sent (or it has ended); its manifest waits until the load `after` has finished.  Any
    failure sets `abort`, which stops every other batch at its next piece."""

    def __init__(self, docker: DockerClient, pieces: Callable[[Callable[[], None]], Iterator[bytes]],
                 after: Optional["BatchLoad"], abort: threading.Event):
        self.docker, self.after, self.abort = docker, after, abort
        self.sent, self.done = threading.Event(), threading.Event()
        self.error = None  # type: Optional[BaseException]
        self.thread = start_thread(self._run, (pieces,), "dogestry-load")

    def _manifest_may_go(self) -> None:
        self.sent.set()
        if self.after is None:
            return
        while not self.after.done.wait(0.2) and not self.abort.is_set():
            pass
        if self.abort.is_set():
            raise Interrupted("stopped: another load of this pull failed")

    def _checked(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        """The pieces, stopped at a failure elsewhere while layers are still to be sent."""
        for piece in pieces:
            if self.abort.is_set() and not self.sent.is_set():
                raise Interrupted("stopped: another load of this pull failed")
            yield piece

    def _run(self, pieces: Callable[[Callable[[], None]], Iterator[bytes]]) -> None:
        try:
            self.docker.load(self._checked(pieces(self._manifest_may_go)))
        except BaseException as e:  # raised by the thread that waits for this load
            self.error = e
            self.abort.set()
        finally:
            self.docker.close()
            self.sent.set()
            self.done.set()


def load_layers(docker: DockerClient, store: Store, image: StoredImage, config: bytes, repo_tags: List[str],
                missing: Set[int], progress: ProgressSink, inflate: bool) -> None:
    """docker load the image with its missing layers: in one load, or in pipelined batches."""
    batches = load_batches(image, missing, docker.load_batch)
    if len(batches) < 2 or not docker.takes_partial_loads():
        docker.load(load_tar_stream(store, image, config, repo_tags, missing, progress, inflate))
        return
    nonce, abort = binascii.hexlify(os.urandom(8)).decode(), threading.Event()
    loads, partials = [], []  # type: List[BatchLoad], List[str]
    try:
        for number, batch in enumerate(batches):
            final = number == len(batches) - 1
            upto = batch[-1] + 1
            part = image if final else image._replace(layers=image.layers[:upto])
            part_config = config if final else partial_config(config, upto, nonce)
            if not final:
                partials.append(sha256_digest(part_config))
            pieces = functools.partial(load_tar_stream, store, part, part_config, repo_tags if final else [],
                                       set(batch), progress, inflate)  # BatchLoad adds before_manifest
            loads.append(BatchLoad(docker, pieces, loads[-1] if loads else None, abort))
            loads[-1].sent.wait()
            if abort.is_set():
                break
        for load in loads:
            load.done.wait()
        errors = [load.error for load in loads if load.error is not None]
        if errors:  # the failure itself, not a load it stopped
            raise next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
    finally:
        abort.set()
        _remove_partials(docker, loads, partials, progress)


def _remove_partials(docker: DockerClient, loads: List[BatchLoad], partials: List[str],
                     progress: ProgressSink) -> None:
    """Delete a pull's partial images once its loads have ended (after a failure, some may not)."""
    deadline = time.monotonic() + PARTIAL_JOIN_WAIT
    for load in loads:
        if not load.done.is_set():
            load.done.wait(max(0.0, deadline - time.monotonic()))
    for number, image_id in enumerate(partials):
        try:
            docker.remove_image(image_id, timeout=min(docker.timeout, CLEANUP_TIMEOUT))
        except DogestryError as e:  # the engine may be gone: no more tries
            progress.note("could not remove partial images %s (%s): `docker image prune --filter label=%s`"
                          % (", ".join(i[7:19] for i in partials[number:]), e, PARTIAL_LABEL))
            return


def remove_leftover_partials(docker: DockerClient, image_id: str, progress: ProgressSink) -> None:
    """Delete the partial images earlier pulls of an image left (killed mid-way), once the engine
    has the image.  Safe while another pull of the same image is loading batches: its later batches
    find the layers of its earlier ones by chain ID, and the image, here whole, holds them all."""
    try:
        leftovers = [i["Id"] for i in docker.list_images(label="%s=%s" % (PARTIAL_FOR_LABEL, image_id))]
        for partial in leftovers:
            docker.remove_image(partial, timeout=min(docker.timeout, CLEANUP_TIMEOUT))
    except DogestryError as e:
        progress.note("could not remove the partial images an earlier pull of %s left (%s): `docker image prune "
                      "--filter label=%s`" % (image_id[7:19], e, PARTIAL_LABEL))
        return
    if leftovers:
        progress.note("removed %d partial image%s an interrupted pull of %s left"
                      % (len(leftovers), "s" if len(leftovers) > 1 else "", image_id[7:19]))


def pull_image(docker: DockerClient, store: Store, text: str, progress: ProgressSink,
               tag_as: Optional[List[ImageRef]] = None, platform: Optional[Platform] = None,
               report: Optional[TransferReport] = None) -> str:
    """Pull one image (NAME[:TAG] or ID prefix) into the engine and tag it; return its ID there.

    tag_as: the tags to give it on the host (default: the tag pulled).  platform: the image to
    take from a multi-platform tag (default: the engine's platform, asked only for such a tag).
    report: the layers loaded into the engine.
    """
    store.check()
    chosen = []  # type: List[Platform]

    def wanted() -> Platform:
        chosen.append(platform or docker.platform())
        return chosen[-1]

    store, _, ref, image, _ = find_image(store, text, progress, wanted)
    if platform is not None and not chosen and not image.legacy:
        check_image_platform(store, image, platform, str(ref or text))
    tags = ([ref] if ref else []) if tag_as is None else tag_as
    image_id = load_image(docker, store, image, [str(t) for t in tags], progress, report)
    for tag in tags:
        docker.tag(image_id, tag)
    if report is not None:
        report.tag, report.platform = (str(ref) if ref else None), (str(chosen[0]) if chosen else None)
        report.image_id, report.layers = image_id, list(image.layers)
    progress.note("pulled %s%s (%s)" % (str(ref or text), " for " + str(chosen[0]) if chosen else "",
                                        digest_hex(image_id)[:12]))
    return image_id


def stored_image_platform(store: Store, image: StoredImage) -> Platform:
    """The platform a stored image's config (checked against its digest) names."""
    return config_platform(parse_json(verified_config(store, image), "the image config"))


def check_image_platform(store: Store, image: StoredImage, platform: Platform, what: str) -> None:
    """NoMatchingPlatform if a single image asked for with --platform is of a platform that
    cannot run there (as docker pull --platform refuses it); an image whose config names no
    platform passes."""
    offered = stored_image_platform(store, image)
    if offered.architecture and platform_fits(platform, offered) is None:
        raise NoMatchingPlatform("%s in %s is an image for %s only, not %s" % (what, store.url, offered, platform))


def load_image(docker: DockerClient, store: Store, image: StoredImage, repo_tags: List[str],
               progress: ProgressSink, report: Optional[TransferReport] = None) -> str:
    """Load a stored image into the engine (unless it has it); return its ID there (report: the layers loaded)."""
    if image.legacy:
        return _pull_legacy(docker, store, image, repo_tags, progress)
    return _pull_image(docker, store, image, repo_tags, progress, report)


def verified_config(store: Store, image: StoredImage) -> bytes:
    """A stored image's config, checked against its digest."""
    config = store.get_bytes(image_key(digest_hex(image.image_id), "config.json"), limit=DOCUMENT_LIMIT)
    if sha256_digest(config) != image.image_id:
        raise IntegrityError("%s: the config of %s is corrupt" % (store.url, image.image_id))
    return config


def _pull_image(docker: DockerClient, store: Store, image: StoredImage, repo_tags: List[str],
                progress: ProgressSink, report: Optional[TransferReport] = None) -> str:
    if docker.inspect_image(image.image_id) is not None:
        progress.note("%s: already on the Docker host" % image.image_id[7:19])
        remove_leftover_partials(docker, image.image_id, progress)
        return image.image_id
    config = verified_config(store, image)
    host_chains = docker.layer_chains()
    missing = {i for i, chain in enumerate(chain_ids([r.diff_id for r in image.layers]))
               if chain not in host_chains}
    if len(missing) < len(image.layers) and not docker.takes_partial_loads():
        missing = set(range(len(image.layers)))  # it reads every layer from the tar, even one it has
    if len(missing) < len(image.layers):
        progress.note("%d of %d layers already on the Docker host" % (len(image.layers) - len(missing),
                                                                      len(image.layers)))
    # A local engine gets layers gunzipped here, on a spare core, rather than leave it to
    # dockerd's single thread; a remote one gets them as stored, to spare the network.
    inflate = docker.endpoint.unix_path is not None
    load_layers(docker, store, image, config, repo_tags, missing, progress, inflate)
    if docker.inspect_image(image.image_id) is None:
        raise DockerError("docker load finished but the engine has no image %s" % image.image_id)
    if report is not None:
        for i in missing:
            report.add(image.layers[i].digest, image.layers[i].size)
    remove_leftover_partials(docker, image.image_id, progress)
    return image.image_id


# Legacy (original dogestry) images: v1 layer directories chained by "parent".  Docker
# 29 cannot load v1 tars, so we send the layers first and, at the end of the tar, a
# manifest.json and a config built from the top layer's v1 json (dockerd reads the
# whole tar before it looks at the manifest).

V1_ONLY_KEYS = ("id", "parent", "Size", "parent_id", "layer_id", "checksum", "throwaway")


def v1_config(top: Dict[str, Any], history: List[Dict[str, Any]], diff_ids: List[str]) -> bytes:
    """An image config from a v1 json, with rootfs and history for the given layers."""
    config = {k: v for k, v in top.items() if k not in V1_ONLY_KEYS}
    config.setdefault("os", "linux")
    config.setdefault("architecture", "amd64")
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config["history"] = history
    return json.dumps(config, sort_keys=True).encode()


def v1_history(doc: Dict[str, Any]) -> Dict[str, Any]:
    """One history entry for a v1 layer json."""
    cmd = (doc.get("container_config") or {}).get("Cmd") or []
    entry = {"created": doc.get("created") or "1970-01-01T00:00:00Z", "created_by": " ".join(cmd)}
    for key in ("author", "comment"):
        if doc.get(key):
            entry[key] = doc[key]
    return entry


def legacy_layer(store: Store, v1_id: str) -> Tuple[Dict[str, Any], str, int]:
    """A v1 layer of the original layout: its json, and the key and size of its layer.tar."""
    doc = read_json(store, image_key(v1_id, "json"), V1_JSON_SHAPE)
    key = image_key(v1_id, "layer.tar")
    size = store.stat(key)
    if size is None:
        raise NotFound("%s: legacy layer %s has no layer.tar" % (store.url, v1_id[:12]))
    return doc, key, size


def legacy_members(store: Store, chain: List[str], progress: ProgressSink, sent: Set[str],
                   result: Dict[str, Any]) -> Iterator[bytes]:
    """Tar members of a v1 chain's layers (<v1 id>/layer.tar, those not in `sent`), then a
    config built from them; result gets its "image_id", "config" name and layer "paths"."""
    diff_ids, history, paths = [], [], []
    top = {}  # type: Dict[str, Any]
    for v1_id in chain:
        top, key, size = legacy_layer(store, v1_id)
        path = "%s/layer.tar" % v1_id
        hasher = DiffIdHasher()
        send = path not in sent
        sent.add(path)
        if send:
            yield tar_header(path, size)
        task = progress.task(v1_id[:12], "loading", size)
        seen = 0
        with contextlib.closing(store.open(key)) as f:
            while True:
                data = f.read(CHUNK)
                if not data:
                    break
                try:
                    hasher.update(data)
                except zlib.error as e:
                    raise IntegrityError("%s: %s is corrupt (%s)" % (store.url, key, e))
                seen += len(data)
                if seen > size:
                    raise IntegrityError("%s: %s changed while it was read" % (store.url, key))
                if send:
                    yield data
                task.advance(len(data))
        if seen != size:
            raise IntegrityError("%s: %s is truncated (%d of %d bytes)" % (store.url, key, seen, size))
        if send:
            yield tar_padding(size)
        task.finish("loaded")
        diff_ids.append(hasher.digest())
        history.append(v1_history(top))
        paths.append(path)
    config = v1_config(top, history, diff_ids)
    result.update(image_id=sha256_digest(config), config="%s.json" % digest_hex(sha256_digest(config)), paths=paths)
    yield tar_bytes_member(result["config"], config)


def legacy_tar_stream(store: Store, chain: List[str], repo_tags: List[str], progress: ProgressSink,
                      result: Dict[str, Any]) -> Iterator[bytes]:
    """Layers of a v1 chain, then a config and manifest.json built from them."""
    yield from legacy_members(store, chain, progress, set(), result)
    manifest = [{"Config": result["config"], "RepoTags": repo_tags or None, "Layers": result["paths"]}]
    yield tar_bytes_member("manifest.json", json.dumps(manifest).encode())
    yield TAR_END


def _pull_legacy(docker: DockerClient, store: Store, image: StoredImage, repo_tags: List[str],
                 progress: ProgressSink) -> str:
    result = {}  # type: Dict[str, Any]
    progress.note("%s is in the original dogestry layout: loading all %d layers"
                  % (image.image_id[:12], len(image.legacy_chain)))
    docker.load(legacy_tar_stream(store, image.legacy_chain, repo_tags, progress, result))
    return result["image_id"]


# === 14. Store lifecycle: gc, prune, stats ===
#
# gc marks what tags reach (and images untagged less than a grace period ago), lists
# images/, layers/ and blobs/ once each, and deletes what is unreached and older than the
# grace period: image records first, then layer index entries (each with its blob), then
# blobs no entry names.  Right before each DeleteObjects it re-checks the ages of the keys in
# it (HEAD: another machine's push may have just refreshed them) and sends the delete within
# GC_RECHECK_WINDOW of those checks.  A blob is re-checked with every index entry naming it
# (a push that reuses a layer refreshes its entry) and stays while one is young.  The README's
# "Garbage collection" section states the guarantees; Freshness (section 9) is the push's side.
# The registry's upload sessions (section 17) nobody added to for the grace period go too,
# with their multipart uploads.  Chunks (chunks/sha256/, section 11) go last, once the blobs
# are deleted for good: every recipe still stored that a layer record names (and every young
# blob no record names, which may be a recipe whose push has yet to name it) is read, its JSON
# line only, and a chunk none of them names, older than the grace, is re-checked and deleted.
# A recipe that cannot be read keeps every chunk.

GC_THREADS = 16
GC_BATCH_KEYS = 1000  # DeleteObjects takes at most 1000 keys


class GcUnit(NamedTuple):
    """Something gc may delete: the keys whose ages decide, the keys to delete, the bytes freed."""

    kind: str  # "image", "manifest", "record", "layer", "blob", "chunk" or "upload" (an abandoned upload session)
    name: str
    check: Tuple[str, ...]
    delete: Tuple[str, ...]
    size: int
    also: Tuple[Tuple[str, str, int], ...] = ()  # (kind, name, size) deleted with it: a layer's blob

    def parts(self) -> List[Tuple[str, str, int]]:
        """What it frees, for the report: (kind, name, bytes)."""
        return [(self.kind, self.name, self.size - sum(n for _, _, n in self.also))] + list(self.also)


class GcReport(NamedTuple):
    """What one gc run deleted (or, with dry_run, would delete), and what it left."""

    deleted: List[GcUnit]
    spared: int       # candidates found young again at their re-check
    leftovers: int    # multipart uploads aborted, temp files removed
    untagged: int     # expired gc/untagged records removed
    plan: "GcPlan"    # what the run was planned from: its held-back bytes, the keys left alone


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in a duration like 30m, 2h, 7d, 1h30m or 45s (a bare number is seconds)."""
    text = text.strip()
    if re.match(r"^\d+(\.\d+)?$", text):
        return float(text)
    match = _DURATION.match(text)
    if not text or not match:
        raise UsageError("bad duration %r (use forms like 30s, 30m, 2h, 7d, 1h30m)" % text)
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def human_duration(seconds: float) -> str:
    """A duration for people: 45s, 30m, 2h, 7d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%gs" % seconds


class StoreMarks(NamedTuple):
    """What the roots reach: image ids (new layout and v1), layer diffIDs and blob digests, and
    the MD5s an index entry has when it holds one of the root images' layer records."""

    images: Set[str]
    diff_ids: Set[str]
    blobs: Set[str]
    index_md5s: Dict[str, Set[str]]
    root_blobs: Dict[str, Set[str]]  # root image -> the blobs of its layers
    root_bytes: Dict[str, int]       # root image -> the bytes of its layers
    root_manifests: Dict[str, Set[str]]  # root image -> the digests (hex) of the manifests made from it
    recipes: Dict[str, LayerRecord]  # blob hex -> a chunked layer's record naming it (the blob is its recipe)

    def merged(self, other: "StoreMarks") -> "StoreMarks":
        """What both reach."""
        md5s = collections.defaultdict(set, {k: set(v) for k, v in self.index_md5s.items()})  # type: Dict[str, Set[str]]
        for key, values in other.index_md5s.items():
            md5s[key].update(values)
        return StoreMarks(self.images | other.images, self.diff_ids | other.diff_ids, self.blobs | other.blobs, md5s,
                          dict(self.root_blobs, **other.root_blobs), dict(self.root_bytes, **other.root_bytes),
                          dict(self.root_manifests, **other.root_manifests), dict(self.recipes, **other.recipes))

    def image_bytes(self, roots: Iterable[str]) -> int:
        """The layers of these root images, counted once per image that uses them."""
        return sum(self.root_bytes.get(root, 0) for root in set(roots))

    def blobs_of(self, roots: Iterable[str]) -> Set[str]:
        """The blobs these root images' layers are in."""
        return set().union(*(self.root_blobs.get(root, set()) for root in set(roots)))


def mark_reachable(store: Store, roots: Iterable[str], progress: ProgressSink) -> StoreMarks:
    """Everything the root images need; GcError if one of them cannot be read (then nothing
    can safely be deleted)."""
    images, diff_ids, blobs = set(), set(), set()  # type: Set[str], Set[str], Set[str]
    index_md5s = collections.defaultdict(set)  # type: Dict[str, Set[str]]
    root_blobs, root_bytes, root_manifests = {}, {}, {}  # type: Dict[str, Set[str]], Dict[str, int], Dict[str, Set[str]]
    recipes = {}  # type: Dict[str, LayerRecord]

    def read(image_hex: str) -> Optional[StoredImage]:
        try:
            return load_stored_image(store, image_hex)
        except NotFound:
            progress.note("a tag names image %s, which is not stored (a dangling tag: pull fails on it)"
                          % image_hex[:12])
            return None
        except DogestryError as e:
            raise GcError("cannot read image %s, which a tag names (%s); nothing was deleted" % (image_hex[:12], e))

    roots = sorted(set(roots))
    with thread_pool(min(GC_THREADS, max(1, len(roots))), "dogestry-mark") as pool:
        for image_hex, image in zip(roots, pool.map(read, roots)):
            if image is None:
                continue
            images.add(image_hex)
            images.update(image.legacy_chain)
            if not image.legacy and image.image_id != "sha256:" + image_hex:  # migrated, original kept
                images.add(digest_hex(image.image_id))
                images.update(legacy_chain(store, image_hex))
            root_bytes[image_hex] = sum(r.size for r in image.layers)
            root_blobs[image_hex] = {digest_hex(r.digest) for r in image.layers}
            if not image.legacy:
                root_manifests[image_hex] = {hashlib.sha256(registry_manifest(image, kind)).hexdigest()
                                             for kind in (OCI_MANIFEST, DOCKER_MANIFEST)}
            for record in image.layers:
                diff_ids.add(digest_hex(record.diff_id))
                blobs.add(digest_hex(record.digest))
                index_md5s[layer_index_key(record.diff_id)].add(hashlib.md5(json_document(record.to_json())).hexdigest())
                if record.chunked:
                    recipes[digest_hex(record.digest)] = record
    return StoreMarks(images, diff_ids, blobs, index_md5s, root_blobs, root_bytes, root_manifests, recipes)


def _image_key_order(key: str) -> Tuple[int, str]:
    """What makes a directory an image (its manifest, or a v1 json) first, its config next."""
    return {"manifest.json": 0, "json": 0, "config.json": 1}.get(key.rsplit("/", 1)[1], 2), key


def _listing(store: Store, prefix: str) -> Dict[str, StoreEntry]:
    return {e.key: e for e in store.list_entries(prefix)}


class ManifestGraph(NamedTuple):
    """The manifests pushed through the registry, as gc reads them (all of them, once per run):
    what each names, which images' manifests they are, which name which as their subject."""

    manifests: Dict[str, Optional["PushedManifest"]]  # hex -> the manifest (None: unreadable)
    by_image: Dict[str, Set[str]]    # image hex -> the manifests whose config it is
    referrers: Dict[str, Set[str]]   # subject hex -> the manifests naming it as their subject

    def closure(self, images: Set[str], manifests: Set[str], marks: StoreMarks, has_record: Callable[[str], bool],
                made: Mapping[str, str]) -> Tuple[Set[str], Set[str]]:
        """(images, manifests) these images and manifests keep: an image keeps the manifests of it
        (pushed, or made from it) and their referrers; a manifest keeps the manifests an index
        names, its referrers, and the image its config is (where an image record was written);
        an index naming a manifest made from an image (`made`: its hex -> the image) keeps that image."""
        images = set(images)
        kept, todo = set(), set(manifests)  # type: Set[str], Set[str]
        while True:
            for image_hex in images:
                todo |= self.by_image.get(image_hex, set())
                for digest in marks.root_manifests.get(image_hex, set()):
                    todo |= self.referrers.get(digest, set())
            todo -= kept
            if not todo:
                return images, kept
            while todo:
                digest = todo.pop()
                kept.add(digest)
                todo |= self.referrers.get(digest, set()) - kept
                manifest = self.manifests.get(digest)
                if manifest is None:
                    if digest in made and has_record(made[digest]):
                        images.add(made[digest])
                    continue
                todo |= {digest_hex(d) for d in manifest.children} - kept
                config = manifest.blobs[0][0] if manifest.blobs else None
                if config is not None and has_record(digest_hex(config)):
                    images.add(digest_hex(config))


def read_manifest_graph(store: Store, hexes: Iterable[str]) -> ManifestGraph:
    """Read every pushed manifest (in parallel): one GET each."""
    def read(digest_hex_: str) -> Optional[PushedManifest]:
        with contextlib.suppress(NotFound, FormatError, IntegrityError):
            return read_pushed_manifest(store, "sha256:" + digest_hex_)
        return None

    hexes = sorted(hexes)
    with thread_pool(min(GC_THREADS, max(1, len(hexes))), "dogestry-manifests") as pool:
        manifests = dict(zip(hexes, pool.map(read, hexes)))
    by_image, referrers = collections.defaultdict(set), collections.defaultdict(set)  # type: Dict[str, Set[str]], Dict[str, Set[str]]
    for digest, manifest in manifests.items():
        if manifest is None:
            continue
        if manifest.blobs:
            by_image[digest_hex(manifest.blobs[0][0])].add(digest)
        if manifest.subject:
            referrers[digest_hex(manifest.subject)].add(digest)
    return ManifestGraph(manifests, by_image, referrers)


class GcPlan(NamedTuple):
    """What a gc run would do: its units (in deletion order), the expired
    gc/untagged records, the keys under its prefixes of other shapes (left alone), and what no
    tag reaches but the grace period holds back."""

    units: List[GcUnit]
    expired: List[str]
    foreign: List[str]
    marks: StoreMarks       # what the tags and young gc/untagged records reach
    tags: List[Tuple[ImageRef, str]]
    image_ids: Set[str]     # the images stored (directories under images/)
    blobs: Dict[str, StoreEntry]
    index_entries: int
    unreferenced_bytes: int  # blobs no tag reaches
    held_bytes: int          # ... of which gc may not delete yet
    held_for: float          # seconds until the last of those may go (0: none held)
    targets: List[Tuple[ImageRef, TagTarget]]  # every tag and what it names
    tag_images: Set[str]     # the images the tags reach (an index tag: its platforms' images)
    manifests: Dict[str, Optional["PushedManifest"]]  # the manifests under manifests/sha256/, by hex
    chunks: Dict[str, StoreEntry]  # chunks/sha256/<hex> keys
    recipes: Dict[str, LayerRecord]  # stored blobs (hex) a chunked layer's record names: recipes
    unnamed: Set[str]  # stored blobs (hex) no layer record and no manifest names


GC_PREFIXES = ("images/", "layers/", "blobs/sha256/", UNTAGGED_PREFIX, "manifests/", CHUNK_PREFIX)
GC_KINDS = ("image", "manifest", "record", "layer", "blob")  # the order units are deleted in


def plan_gc(store: Store, grace: float, progress: ProgressSink) -> GcPlan:
    """The units no tag reaches that are older than grace, and what else a gc would know."""
    with thread_pool(len(GC_PREFIXES), "dogestry-list") as pool:
        listings = list(pool.map(functools.partial(_listing, store), GC_PREFIXES))
    foreign = sorted(key for listing in listings for key in listing if not gc_owns(key))
    image_keys, index_keys, blob_keys, untagged_keys, manifest_keys, chunk_keys = (
        {k: e for k, e in listing.items() if gc_owns(k)} for listing in listings)
    targets = list_tag_targets(store)
    tags = [(ref, t.image_hex) for ref, t in targets if t.image_hex is not None]
    tagged = {digest for _, digest in tags}
    dirs = collections.defaultdict(dict)  # type: Dict[str, Dict[str, StoreEntry]]
    for key, entry in image_keys.items():
        _, image_hex, leaf = key.split("/")
        dirs[image_hex][leaf] = entry
    pushed = {k[len("manifests/sha256/"):]: e for k, e in manifest_keys.items() if k.startswith("manifests/sha256/")}
    graph = read_manifest_graph(store, pushed)
    tag_manifests = {digest_hex(str(t.manifest)) for _, t in targets if t.manifest} | \
        _tag_pointers(store, tags, manifest_keys, graph)
    young_untagged = {k[len(UNTAGGED_PREFIX):]: e.age for k, e in untagged_keys.items() if e.age < grace}
    expired = sorted(k for k, e in untagged_keys.items() if e.age >= grace)

    def has_record(image_hex: str) -> bool:
        return "manifest.json" in dirs.get(image_hex, {})

    # Roots: tags, images and manifests untagged less than the grace ago, manifests pushed less
    # than the grace ago (a push by digest, an index's children before the index); what they
    # reach through manifests may add images, whose manifests may add more (referrers).
    image_roots = tagged | {h for h in young_untagged if h not in pushed}
    manifest_roots = tag_manifests | {h for h in young_untagged if h in pushed} | \
        {h for h, e in pushed.items() if e.age < grace}
    marks, marked = mark_reachable(store, image_roots, progress), set(image_roots)
    made = made_by_images(marks)
    searched = False
    while True:
        images, kept = graph.closure(image_roots, manifest_roots, marks, has_record, made)
        new = images - marked
        unknown = sorted(kept - set(pushed) - set(made))
        if not new and unknown and not searched:
            # An index names a manifest that is neither stored nor made from an image marked so
            # far: one made from an image nothing else reaches (older versions stored an index
            # naming such a manifest without storing it).  Each other image's manifests are made.
            searched = True
            made.update(made_manifests(store, sorted(h for h in dirs if h not in marked and has_record(h))))
            continue
        if not new:
            break
        marked |= new
        marks = marks.merged(mark_reachable(store, new, progress))
        made.update(made_by_images(marks))
    for digest in sorted(kept - set(pushed) - set(made)):
        progress.note("an index names manifest sha256:%s, which is not stored" % digest)
    unreadable = sorted(h for h in kept if h in pushed and graph.manifests.get(h) is None)
    if unreadable:
        raise GcError("cannot read manifest sha256:%s, which is kept; nothing was deleted" % unreadable[0])
    manifest_blobs = {h: {digest_hex(d) for d, _ in graph.manifests[h].blobs} for h in kept  # type: ignore[union-attr]
                      if graph.manifests.get(h) is not None}

    units = []  # type: List[GcUnit]
    for image_hex, leaves in sorted(dirs.items()):
        if image_hex in marks.images or min(e.age for e in leaves.values()) < grace:
            continue
        keys = tuple(sorted((e.key for e in leaves.values()), key=_image_key_order))
        units.append(GcUnit("image", image_hex, keys, keys, sum(e.size for e in leaves.values())))
    units += _manifest_units(pushed, manifest_keys, kept, graph, {str(ref) for ref, _ in targets}, grace)

    # Which blob each index entry names: a push that reuses a layer relies on that blob, so a
    # blob is re-checked with every entry naming it.  An entry of a layer the tags reach whose
    # ETag is the MD5 of the record the tagged image holds names that image's blob: no GET.
    readable = {k: e for k, e in index_keys.items() if not (e.etag and e.etag in marks.index_md5s.get(k, ()))}
    pointing = collections.defaultdict(list)  # type: Dict[str, List[str]]
    young_blobs = set()  # type: Set[str]

    def record_of(key: str) -> Optional[LayerRecord]:
        with contextlib.suppress(DogestryError):
            return LayerRecord.from_json(read_json(store, key))
        return None

    index_names = sorted(readable)
    with thread_pool(min(GC_THREADS, max(1, len(index_names))), "dogestry-index") as pool:
        records = dict(zip(index_names, pool.map(record_of, index_names)))
    blobs_of = {key: None if r is None else digest_hex(r.digest) for key, r in records.items()}
    marks = _mark_manifest_blobs(marks, manifest_blobs, records)
    for key, blob in blobs_of.items():
        if blob is not None:
            pointing[blob].append(key)
            if readable[key].age < grace:
                young_blobs.add(blob)

    def doomed_blob(blob: str) -> bool:
        entry = blob_keys.get("blobs/sha256/" + blob)
        return entry is not None and entry.age >= grace and blob not in marks.blobs and blob not in young_blobs

    paired = set()  # type: Set[str]
    for key, blob in sorted(blobs_of.items()):
        diff_hex, size = key[len("layers/"):-len(".json")], readable[key].size
        if readable[key].age < grace or diff_hex in marks.diff_ids:
            continue
        if blob is not None and doomed_blob(blob) and pointing[blob] == [key]:
            # The entry and its blob, re-checked and deleted together: a push that reuses the
            # layer refreshes the entry, and then both stay.
            blob_entry = blob_keys["blobs/sha256/" + blob]
            units.append(GcUnit("layer", diff_hex, (key, blob_entry.key), (key, blob_entry.key),
                                size + blob_entry.size, (("blob", "sha256:" + blob, blob_entry.size),)))
            paired.add(blob)
        else:
            units.append(GcUnit("layer", diff_hex, (key,), (key,), size))
    for key, entry in sorted(blob_keys.items()):
        blob = key[len("blobs/sha256/"):]
        if blob in paired or not doomed_blob(blob):
            continue
        # Re-checked with every index entry naming it, even those this run deletes first: a push
        # that finds one gone writes it again, and the blob must then stay.
        units.append(GcUnit("blob", "sha256:" + blob, (key,) + tuple(pointing.get(blob, ())), (key,), entry.size))

    # What no tag reaches but gc may not delete yet: young blobs, blobs young index entries or
    # manifests name, images untagged less than `grace` ago; each may go once the last of those
    # is old enough.
    tag_images, tag_kept = graph.closure(tagged, tag_manifests, marks, has_record, made)
    tag_blobs = marks.blobs_of(tag_images).union(*(manifest_blobs.get(h, set()) for h in tag_kept))
    young_manifests = {h: pushed[h].age for h in kept - tag_kept if h in pushed}
    freed = {name[len("sha256:"):] for unit in units for kind, name, _ in unit.parts() if kind == "blob"}
    unreferenced = held = 0
    held_for = 0.0
    for key, entry in blob_keys.items():
        blob = key[len("blobs/sha256/"):]
        if blob in tag_blobs:
            continue
        unreferenced += entry.size
        if blob in freed:
            continue
        held += entry.size
        waits = [grace - entry.age] + [grace - readable[k].age for k in pointing.get(blob, ())]
        waits += [grace - age for root, age in young_untagged.items() if blob in marks.root_blobs.get(root, ())]
        waits += [grace - age for h, age in young_manifests.items() if blob in manifest_blobs.get(h, ())]
        held_for = max([held_for] + waits)
    recipes = dict(marks.recipes, **{digest_hex(r.digest): r for r in records.values() if r is not None and r.chunked})
    named = marks.blobs.union(pointing, *({digest_hex(d) for d, _ in m.blobs} for m in graph.manifests.values() if m))
    stored_recipes = {h: r for h, r in recipes.items() if blob_key("sha256:" + h) in blob_keys}
    unnamed = {k[len("blobs/sha256/"):] for k in blob_keys} - named - set(recipes)
    return GcPlan(units, expired, foreign, marks, tags, set(dirs), blob_keys, len(index_keys), unreferenced,
                  held, held_for, targets, tag_images, graph.manifests, chunk_keys, stored_recipes, unnamed)


def _mark_manifest_blobs(marks: StoreMarks, manifest_blobs: Dict[str, Set[str]],
                         records: Mapping[str, Optional[LayerRecord]]) -> StoreMarks:
    """Marks with the blobs kept manifests name (manifest_blobs: hex -> blob hexes) and, where one
    is a chunked layer's tar (its diffID: no blob key), that layer's index entry and recipe (added
    to the manifest's blobs too).  records: the layer index entries read, by key."""
    tars = set()  # type: Set[str]
    for named in manifest_blobs.values():
        for blob in list(named):
            record = records.get("layers/%s.json" % blob)
            if record is not None and record.chunked and record.diff_id == "sha256:" + blob:
                named.add(digest_hex(record.digest))
                tars.add(blob)
    return marks._replace(blobs=marks.blobs.union(*manifest_blobs.values()), diff_ids=marks.diff_ids | tars)


def made_by_images(marks: StoreMarks) -> Dict[str, str]:
    """The manifests (hex) the registry makes from the marked images: manifest -> image."""
    return {digest: image_hex for image_hex, digests in marks.root_manifests.items() for digest in digests}


def made_manifests(store: Store, hexes: Sequence[str]) -> Dict[str, str]:
    """The manifests (hex) the registry makes from these images (one GET each): manifest -> image."""
    def read(image_hex: str) -> Optional[StoredImage]:
        with contextlib.suppress(DogestryError):
            return load_stored_image(store, image_hex)
        return None

    made = {}  # type: Dict[str, str]
    with thread_pool(min(GC_THREADS, max(1, len(hexes))), "dogestry-made") as pool:
        for image_hex, image in zip(hexes, pool.map(read, hexes)):
            if image is not None and not image.legacy:
                made.update({hashlib.sha256(registry_manifest(image, kind)).hexdigest(): image_hex
                             for kind in (OCI_MANIFEST, DOCKER_MANIFEST)})
    return made


def _tag_pointers(store: Store, tags: Sequence[Tuple[ImageRef, str]], manifest_keys: Mapping[str, StoreEntry],
                  graph: ManifestGraph) -> Set[str]:
    """The manifests (hex) that image tags say they were pushed with (manifests/tags/<name>/<tag>),
    where that manifest is still of the tag's image (a `dogestry push` may have moved the tag)."""
    found = [(tag_manifest_key(ref), image_hex) for ref, image_hex in tags if tag_manifest_key(ref) in manifest_keys]

    def read(key: str) -> Optional[str]:
        with contextlib.suppress(DogestryError):
            return digest_hex(store.get_bytes(key, limit=4096).decode("ascii", "replace").strip())
        return None

    with thread_pool(min(GC_THREADS, max(1, len(found))), "dogestry-pointers") as pool:
        named = list(pool.map(read, [key for key, _ in found]))
    kept = set()  # type: Set[str]
    for (_, image_hex), digest in zip(found, named):
        manifest = graph.manifests.get(digest) if digest else None
        if digest and manifest is not None and manifest.blobs and manifest.blobs[0][0] == "sha256:" + image_hex:
            kept.add(digest)
    return kept


def _manifest_units(pushed: Mapping[str, StoreEntry], manifest_keys: Mapping[str, StoreEntry], kept: Set[str],
                    graph: ManifestGraph, tags: Set[str], grace: float) -> List[GcUnit]:
    """Manifests nothing keeps (each with its referrer record), and the records of manifests gone
    or of tags gone (referrer records, tag pointers), older than grace."""
    units, records = [], set()  # type: List[GcUnit], Set[str]
    for digest, entry in sorted(pushed.items()):
        if digest in kept or entry.age < grace:
            continue
        keys = (entry.key,)  # type: Tuple[str, ...]
        manifest = graph.manifests.get(digest)
        if manifest is not None and manifest.subject and referrer_key(manifest.subject, "sha256:" + digest) in manifest_keys:
            keys += (referrer_key(manifest.subject, "sha256:" + digest),)
        records.update(keys)
        units.append(GcUnit("manifest", "sha256:" + digest, keys, keys, sum(manifest_keys[k].size for k in keys)))
    for key, entry in sorted(manifest_keys.items()):
        if key in records or entry.age < grace or key.startswith("manifests/sha256/"):
            continue
        if key.startswith("manifests/referrers/"):
            gone = key.rsplit("/", 1)[1] not in pushed
        else:
            name, _, tag = key[len("manifests/tags/"):].rpartition("/")
            gone = "%s:%s" % (name, tag) not in tags
        if gone:
            units.append(GcUnit("record", key, (key,), (key,), entry.size))
    return units


GC_RECIPE_READERS = 8  # recipes read at once (each holds one JSON line: some 100 KiB for a GiB of layer)
RECIPE_START = b'{"mediaType":"' + RECIPE_MEDIA_TYPE.encode() + b'"'  # how a recipe's JSON line starts


def sniff_recipe(store: Store, blob: str, size: Optional[int]) -> Optional[LayerRecipe]:
    """A blob's recipe if the blob is one (its first gzip member starts as a recipe's JSON line),
    else None; FormatError or IntegrityError for a recipe that cannot be read."""
    what = "%s: %s" % (store.url, "blobs/sha256/" + blob)
    with contextlib.closing(store.open("blobs/sha256/" + blob, size)) as stream:
        reader = InflatingReader(stream, what)
        try:
            start = reader.read(len(RECIPE_START))
        except (zlib.error, FormatError):  # not gzip, or too short: no recipe
            return None
        if start != RECIPE_START:
            return None
        try:
            return LayerRecipe.from_header(start + reader.read_line(RECIPE_HEADER_LIMIT), what)
        except zlib.error as e:
            raise IntegrityError("%s is corrupt (%s)" % (what, e))


def recipe_chunks(store: Store, recipes: Mapping[str, LayerRecord], maybe: Iterable[str],
                  listing: Mapping[str, StoreEntry]) -> Tuple[Dict[str, List[Tuple[str, int]]], Optional[str]]:
    """The chunks each recipe names (blob hex -> [(chunk hex, size)]): those of `recipes` (by the
    records naming them) and of the blobs in `maybe` that are recipes (listing: the blobs' entries);
    read GC_RECIPE_READERS at a time, each its JSON line only.  Also why one of them could not be
    read (None: all could)."""
    def read(blob: str) -> Tuple[List[Tuple[str, int]], Optional[str]]:
        try:
            if blob in recipes:
                return read_recipe(store, recipes[blob]).chunks, None
            entry = listing.get("blobs/sha256/" + blob)
            recipe = sniff_recipe(store, blob, entry.size if entry else None)
            return (recipe.chunks if recipe else []), None
        except NotFound:  # deleted meanwhile: it names nothing any more
            return [], None
        except DogestryError as e:
            return [], str(e)

    blobs = sorted(set(recipes) | set(maybe))
    with thread_pool(min(GC_RECIPE_READERS, max(1, len(blobs))), "dogestry-recipes") as pool:
        results = dict(zip(blobs, pool.map(read, blobs)))
    why = next((error for _, error in results.values() if error is not None), None)
    return {blob: chunks for blob, (chunks, _) in results.items() if chunks}, why


def chunk_units(store: Store, plan: GcPlan, gone: Set[str], grace: float, progress: ProgressSink) -> List[GcUnit]:
    """The chunks older than grace that no recipe still stored names (gone: the blobs deleted for
    good), as units; none, and one line saying why, if a recipe that may name them cannot be read."""
    old = {k: e for k, e in plan.chunks.items() if e.age >= grace}
    if not old:
        return []
    kept = {blob: record for blob, record in plan.recipes.items() if blob not in gone}
    # Blobs no record names that stay (young ones): each may be the recipe of a push yet to name it.
    named, unreadable = recipe_chunks(store, kept, plan.unnamed - gone, plan.blobs)
    if unreadable is not None:
        progress.note("gc kept every chunk: %s (it may name any of them)" % unreadable)
        return []
    names = {chunk for chunks in named.values() for chunk, _ in chunks}
    return [GcUnit("chunk", "sha256:" + key[len(CHUNK_PREFIX):], (key,), (key,), entry.size)
            for key, entry in sorted(old.items()) if key[len(CHUNK_PREFIX):] not in names]


def deleted_blobs(units: Iterable[GcUnit]) -> Set[str]:
    """The blobs (hex) these units delete."""
    return {name[len("sha256:"):] for unit in units for kind, name, _ in unit.parts() if kind == "blob"}


def delete_units(store: Store, units: Sequence[GcUnit], grace: float, stop_at: float,
                 clock: Callable[[], float] = time.monotonic) -> Tuple[List[GcUnit], int]:
    """Re-check and delete units in batches; return (deleted, spared).

    A batch's DeleteObjects is sent within GC_RECHECK_WINDOW of the start of its re-checks
    (batches grow while the store answers fast and shrink when it does not), and runs while
    the next batch is re-checked."""
    deleted, spared, start = [], 0, 0  # type: List[GcUnit], int, int
    largest = max(1, GC_BATCH_KEYS // max([len(u.delete) for u in units] or [1]))
    size = min(16, largest)
    pending = None  # type: Optional[concurrent.futures.Future]

    def still_old(unit: GcUnit) -> bool:
        ages = [store.age(key) for key in unit.check]
        return any(a is not None for a in ages) and all(a is None or a >= grace for a in ages)

    with thread_pool(GC_THREADS, "dogestry-recheck") as pool, thread_pool(1, "dogestry-delete") as deleter:
        try:
            while start < len(units):
                if clock() > stop_at:
                    raise GcError("gc stopped after running for half its grace period (%s): what it deleted is"
                                  " consistent; run it again (or give a longer --grace)" % human_duration(grace))
                batch = units[start:start + size]
                checked_at = clock()
                verdicts = list(pool.map(still_old, batch))
                if pending is not None:
                    pending.result()
                    pending = None
                took = clock() - checked_at
                if took > GC_RECHECK_WINDOW:
                    if size == 1:
                        raise GcError("%s answers too slowly for a safe gc now (re-checking one object took %.1f s);"
                                      " nothing more was deleted" % (store.url, took))
                    size = max(1, size // 4)  # checked again, in smaller batches
                    continue
                if took < GC_RECHECK_WINDOW / 4:
                    size = min(largest, size * 2)
                old = [u for u, ok in zip(batch, verdicts) if ok]
                spared += len(batch) - len(old)
                if old:
                    pending = deleter.submit(store.delete_many, [key for unit in old for key in unit.delete], True)
                deleted.extend(old)
                start += len(batch)
        finally:
            if pending is not None:
                pending.result()
    return deleted, spared


def abandoned_uploads(store: Store, grace: float) -> Tuple[List[GcUnit], Set[str]]:
    """The registry's upload sessions (section 17) none of whose keys was written for `grace`, as
    units gc deletes (each re-checked whole: a request that adds to one keeps it), and the ids of
    the others, whose multipart uploads are theirs however old."""
    sessions = collections.defaultdict(list)  # type: Dict[str, List[StoreEntry]]
    for entry in store.list_entries(UPLOADS_PREFIX):
        if gc_owns(entry.key):
            sessions[entry.key.split("/")[1]].append(entry)
    units, busy = [], set()  # type: List[GcUnit], Set[str]
    for upload_id, entries in sorted(sessions.items()):
        if min(e.age for e in entries) < grace:
            busy.add(upload_id)
            continue
        keys = tuple(e.key for e in entries)
        units.append(GcUnit("upload", upload_id, keys, keys, sum(e.size for e in entries)))
    return units, busy


def collect_garbage(store: Store, grace: float, progress: ProgressSink, dry_run: bool = False,
                    clock: Callable[[], float] = time.monotonic) -> GcReport:
    """Delete (or, dry_run, list) what no tag reaches and is older than grace; see section 14."""
    store.check()
    started = clock()
    plan = plan_gc(store, grace, progress)
    uploads, busy = abandoned_uploads(store, grace)
    if dry_run:
        chunks = chunk_units(store, plan, deleted_blobs(plan.units), grace, progress)
        return GcReport(plan.units + chunks + uploads, 0, 0, len(plan.expired), plan)
    stop_at = started + grace / 2
    done, spared = [], 0  # type: List[GcUnit], int
    for kind in GC_KINDS:  # images and manifests first: nothing then names the layers and blobs
        # they free; then index entries (with their blobs), then blobs no entry names
        deleted, young = delete_units(store, [u for u in plan.units if u.kind == kind], grace, stop_at, clock)
        done.extend(deleted)
        spared += young
    # Chunks last: only the recipes deleted for good above no longer keep theirs.
    chunks = chunk_units(store, plan, deleted_blobs(done), grace, progress)
    deleted, young = delete_units(store, chunks, grace, stop_at, clock)
    done.extend(deleted)
    spared += young
    deleted, young = delete_units(store, uploads, grace, stop_at, clock)
    done.extend(deleted)
    spared += young
    busy.update(u.name for u in uploads if u not in deleted)
    if plan.expired:
        store.delete_many(plan.expired)
    leftovers = store.sweep_leftovers(grace, lambda key: gc_leftover(key) and not (
        key.startswith(UPLOADS_PREFIX) and key.split("/")[1] in busy))
    return GcReport(done, spared, leftovers, len(plan.expired), plan)


class StoreStats(NamedTuple):
    """What a store holds, and what gc would free."""

    repositories: int
    tags: int
    images: int
    layers: int
    blobs: int
    stored_bytes: int
    unshared_bytes: int   # the images' layers counted once per image that uses them
    unreferenced_bytes: int
    freeable_bytes: int   # ... of which a gc with the grace period given may delete now
    held_bytes: int       # ... and which it holds back (young, or untagged less than the grace ago)
    held_for: float       # seconds until the last of those may go
    grace: float
    index_tags: int       # tags naming an image index (a multi-platform image)
    indexes: int          # the image indexes they name
    platform_images: int  # the images those indexes name (attestations not counted)
    platforms: Dict[str, int]  # how many of those images are of each platform
    chunked_layers: int        # layers stored as chunks (their blobs, counted above: their recipes)
    chunks: int                # chunk objects (chunks/sha256/)
    chunk_bytes: int           # ... their bytes as stored
    chunk_content_bytes: int   # the chunked layers' file contents, as their recipes name them
    chunk_distinct_bytes: int  # ... the distinct chunks of those contents, unpacked

    @property
    def dedup_ratio(self) -> Optional[float]:
        """How many times the tagged images' bytes would be stored without sharing layers."""
        referenced = self.stored_bytes - self.unreferenced_bytes
        return self.unshared_bytes / referenced if referenced > 0 else None

    @property
    def chunk_dedup_ratio(self) -> Optional[float]:
        """How many times the chunked layers' contents would be stored without sharing chunks."""
        return self.chunk_content_bytes / self.chunk_distinct_bytes if self.chunk_distinct_bytes > 0 else None


def store_stats(store: Store, progress: ProgressSink, grace: float = 3600.0) -> StoreStats:
    """Count what a store holds (the tags' images read once each, every manifest pushed through
    the registry once, every recipe's JSON line once; blobs and chunks from one listing each), and
    what a gc with that grace period would free now and later."""
    store.check()
    plan = plan_gc(store, grace, progress)
    named, unreadable = recipe_chunks(store, plan.recipes, (), plan.blobs)
    if unreadable is not None:
        progress.note("stats counts no contents of a recipe it cannot read: %s" % unreadable)
    distinct = {chunk: size for chunks in named.values() for chunk, size in chunks}
    indexes = {}  # type: Dict[str, PushedManifest]
    index_tags = 0
    for _, target in plan.targets:
        index = plan.manifests.get(digest_hex(str(target.manifest))) if target.manifest else None
        if index is not None and index.is_index:
            indexes[index.digest] = index
            index_tags += 1
    images = {e.digest: e.platform for index in indexes.values() for e in index_images(index)}
    platforms = collections.Counter(str(p) for p in images.values())
    return StoreStats(len({r.name for r, _ in plan.targets}), len(plan.targets), len(plan.image_ids),
                      plan.index_entries, len(plan.blobs), sum(e.size for e in plan.blobs.values()),
                      plan.marks.image_bytes(plan.tag_images), plan.unreferenced_bytes,
                      plan.unreferenced_bytes - plan.held_bytes, plan.held_bytes, plan.held_for, grace,
                      index_tags, len(indexes), len(images), dict(sorted(platforms.items())),
                      len(plan.recipes), len(plan.chunks), sum(e.size for e in plan.chunks.values()),
                      sum(size for chunks in named.values() for _, size in chunks), sum(distinct.values()))


class PrunePlan(NamedTuple):
    """The tags prune removes, and those it keeps beyond --keep-last because their push times tie
    with the oldest one kept (with that one)."""

    doomed: List[Tuple[ImageRef, str]]
    tied: List[Tuple[List[ImageRef], ImageRef]]


def prune_tags(store: Store, keep_last: Optional[int], older_than: Optional[float],
               names: Sequence[str]) -> PrunePlan:
    """The tags prune removes: per repository, all but the keep_last most recently pushed (a tag's
    push time is its own last write, as precise as the store keeps it), or those pushed more than
    older_than ago; never a protected tag, nor one whose push time is the same as that of the
    oldest tag kept (it may be the newer of the two: AWS S3 keeps whole seconds)."""
    entries = {e.key: e for e in store.list_entries("repositories/")}
    protected = {k[len(PROTECTED_PREFIX):] for k in store.list(PROTECTED_PREFIX)}
    by_repo = collections.defaultdict(list)  # type: Dict[str, List[Tuple[ImageRef, str, float]]]
    for ref, target in list_tag_targets(store):  # images, and indexes or artifacts (by their manifest's hex)
        entry = entries.get(tag_key(ref))
        if entry is None or (names and ref.name not in names):
            continue
        by_repo[ref.name].append((ref, target.image_hex or digest_hex(str(target.manifest)), entry.age))
    doomed, tied = [], []  # type: List[Tuple[ImageRef, str]], List[Tuple[List[ImageRef], ImageRef]]
    for name, tags in sorted(by_repo.items()):
        tags.sort(key=lambda t: (t[2], t[0].tag))  # youngest first
        boundary = tags[keep_last - 1] if keep_last and len(tags) > keep_last else None
        kept_tied = []  # type: List[ImageRef]
        for index, (ref, image_hex, age) in enumerate(tags):
            if "%s/%s" % (ref.name, ref.tag) in protected:
                continue
            if keep_last is not None and index >= keep_last and boundary is not None and age == boundary[2]:
                kept_tied.append(ref)
            elif (keep_last is not None and index >= keep_last) or (older_than is not None and age > older_than):
                doomed.append((ref, image_hex))
        if kept_tied and boundary is not None:
            tied.append((kept_tied, boundary[0]))
    return PrunePlan(doomed, tied)


def remove_tags(store: Store, tags: Sequence[Tuple[ImageRef, str]], unprotect: Sequence[ImageRef] = ()) -> None:
    """Delete tags, first recording their images as untagged (gc spares them for its grace period),
    and the protection of those in `unprotect` with them (a tag pushed again later is not protected)."""
    by_image = collections.defaultdict(list)  # type: Dict[str, List[ImageRef]]
    for ref, image_hex in tags:
        by_image[image_hex].append(ref)
    for image_hex, refs in by_image.items():
        record_untagged(store, image_hex, refs)
    store.delete_many([tag_key(ref) for ref, _ in tags] + [tag_manifest_key(ref) for ref, _ in tags] +
                      [protection_key(ref) for ref in unprotect])


class DiffIdReader:
    """Reads a stream while hashing it as a layer's uncompressed tar (its diffID), gzip or not."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.hasher = stream, DiffIdHasher()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            try:
                self.hasher.update(data)
            except zlib.error as e:
                raise IntegrityError("a layer.tar is corrupt (%s)" % e)
        return data


def legacy_images(store: Store, names: Sequence[str]) -> Dict[str, List[ImageRef]]:
    """The images in the original layout that tags name (all, or those NAME or NAME:TAG give),
    not yet migrated: top v1 id -> its tags."""
    wanted = [parse_image_ref(n) if ":" in n.rsplit("/", 1)[-1] else ImageRef(n, "") for n in names]
    found = collections.defaultdict(list)  # type: Dict[str, List[ImageRef]]
    for ref, image_hex in list_tags(store):
        if wanted and not any(w.name == ref.name and w.tag in ("", ref.tag) for w in wanted):
            continue
        if store.stat(image_key(image_hex, "manifest.json")) is None and \
                store.stat(image_key(image_hex, "json")) is not None and migrated_image(store, image_hex) is None:
            found[image_hex].append(ref)
    return found


def migrate_image(store: Store, top_hex: str, progress: ProgressSink, options: PushOptions,
                  target: Optional[Store] = None) -> str:
    """Store an image of the original layout in the current one, in the same store or in
    `target` (layers compressed as a push would, shared with what is stored); return its image
    ID, the one a pull of it gives."""
    chain = legacy_chain(store, top_hex)
    target = target or store
    freshness = options.freshness(target)
    diff_ids, history, known = [], [], {}  # type: List[str], List[Dict[str, Any]], Dict[str, LayerRecord]
    top = {}  # type: Dict[str, Any]
    with work_directory(options.tempdir or target.spool_dir()) as work:
        pipeline = LayerPipeline(target, work, progress, options, freshness)
        try:
            for v1_id in chain:
                top, key, size = legacy_layer(store, v1_id)
                with contextlib.closing(store.open(key, size)) as f:
                    reader = DiffIdReader(f)
                    spool = pipeline.spool(reader, size, pipeline.unnamed_label(), may_compress=True)  # type: ignore
                diff_id = reader.hasher.digest()
                record = reused_layer(target, diff_id, freshness)
                if record is None and diff_id not in diff_ids:
                    pipeline.upload(diff_id, spool)
                else:
                    pipeline.drop(spool, diff_id, "already stored" if record is not None else "repeated")
                if record is not None:
                    known[diff_id] = record
                diff_ids.append(diff_id)
                history.append(v1_history(top))
            known.update(pipeline.finish())
        except BaseException as e:
            pipeline.cancel(interrupted=isinstance(e, KeyboardInterrupt))
            raise
        finally:
            pipeline.close()
    config = v1_config(top, history, diff_ids)
    image_id = sha256_digest(config)
    _secure_and_write_image(target, freshness, image_id, config, [known[d] for d in diff_ids])
    return image_id


# === 15. Fleets: -pullhosts, the lock file and the config file ===
#
# A fleet pull checks every host, works out per host which layers it lacks, downloads
# the union once into a local spool store (verified on the way), then loads every host
# in parallel from that spool, each getting only what it lacks.

HOST_CHECK_TIMEOUT = 10.0
HOST_TIMEOUT = 60.0  # -host-timeout: a host that takes no bytes and sends none this long fails alone
SERVER_PORT = 22375


class FileConfig(NamedTuple):
    """The original's optional config file (git-config style): remotes, S3 keys, docker host."""

    remotes: Dict[str, str]
    access_key: Optional[str]
    secret_key: Optional[str]
    docker: Optional[str]


def read_config_file(path: str) -> FileConfig:
    """Parse [remote "NAME"] url=..., [s3] access-key-id/secret-key, [docker] connection."""
    import configparser  # lazy (start-up time): only AWS and fleet config files need it
    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError("cannot read config file %s: %s" % (path, _os_reason(e)))
    except configparser.Error as e:
        raise UsageError("bad config file %s: %s" % (path, str(e).splitlines()[0]))

    def value(section: str, key: str) -> Optional[str]:
        if not parser.has_option(section, key):
            return None
        return parser.get(section, key).strip().strip('"') or None

    remotes = {}
    for section in parser.sections():
        m = re.match(r'^remote\s+"([^"]+)"$', section.strip())
        if m and value(section, "url"):
            remotes[m.group(1)] = value(section, "url") or ""
    return FileConfig(remotes, value("s3", "access-key-id"), value("s3", "secret-key"),
                      value("docker", "connection"))


@contextlib.contextmanager
def file_lock(path: str, progress: Progress) -> Iterator[None]:
    """Hold an exclusive lock on path (waiting for it); the kernel releases it however we exit."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DogestryError("cannot open lock file %s: %s" % (path, _os_reason(e)))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.note("waiting for the lock %s (another dogestry is running)" % path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def parse_pullhosts(text: str, environ: Mapping[str, str], home: str) -> List[DockerEndpoint]:
    """-pullhosts tcp://host-1:2375,unix:///path,... as Docker endpoints."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise UsageError("-pullhosts needs at least one host (tcp://host:port or unix:///path)")
    return [docker_endpoint(h, environ, home) for h in hosts]


def check_hosts(clients: Sequence[DockerClient]) -> Dict[str, Any]:
    """GET /version on every host (in parallel, 10 s each); fail up front naming a dead one.
    Return the answers by host URL (they name each engine's platform)."""
    versions = {}  # type: Dict[str, Any]

    def check(client: DockerClient) -> Optional[str]:
        try:
            versions[client.endpoint.url] = client.version()
            return None
        except DogestryError as e:
            return str(e) if str(e).startswith(client.endpoint.url) else "%s: %s" % (client.endpoint.url, e)

    found = {}  # type: Dict[str, Optional[str]]
    run_in_threads(lambda client: found.__setitem__(client.endpoint.url, check(client)), clients)
    problems = [p for p in (found[c.endpoint.url] for c in clients) if p]
    if problems:
        raise DockerError("Docker host check failed (use -disable-checks to skip it): " + "; ".join(problems))
    return versions


class HostPlatforms:
    """The platform each host of a fleet pulls from multi-platform tags: --platform's, or its
    engine's, from the GET /version answer of the host check (asked only if the hosts were not checked)."""

    def __init__(self, override: Optional[Platform], versions: Mapping[str, Any]):
        self.override, self.versions = override, dict(versions)
        self.known = {}  # type: Dict[str, Platform]  # by host URL, once asked

    def of(self, client: DockerClient) -> Platform:
        """The host's platform (DockerError if its engine does not say)."""
        url = client.endpoint.url
        if url not in self.known:
            if self.override is not None:
                self.known[url] = self.override
            elif url in self.versions:
                self.known[url] = engine_platform(self.versions[url], lambda: client.json("GET", "/info"))
            else:
                self.known[url] = client.platform()
        return self.known[url]


def spool_image(store: Store, text: str, spool: "LocalStore", clients: Sequence[DockerClient],
                progress: ProgressSink, failed: Dict[str, str], platforms: HostPlatforms) -> Dict[str, Platform]:
    """Copy what the hosts lack of one image into the spool store, verifying every blob once; of
    a multi-platform tag, the image of each host's platform (each platform's blobs once).  Return
    the platform of the image each host gets of a multi-platform tag (nothing for one image).

    A host that cannot say what it has, or whose platform the tag lacks, is put in `failed` (its
    URL -> the error) and skipped.
    """
    store.check()
    tagged = index_tag(store, text)
    if tagged is None:
        _spool_found(find_image(store, text, progress), spool, clients, progress, failed)
        return {}
    ref, index = tagged
    spool.put_bytes(manifest_key(index.digest), index.data)
    spool.put_bytes(tag_key(ref), (MANIFEST_TAG + digest_hex(index.digest)).encode())
    chosen = {}  # type: Dict[str, Platform]
    for entry, members in _platform_groups(store, ref, index, clients, failed, platforms):
        image_hex = image_of_manifest(store, entry.digest)
        _copy_keys(store, spool, [manifest_key(entry.digest)], progress)
        _spool_found(FoundImage(store, image_hex, None, load_stored_image(store, image_hex)), spool, members,
                     progress, failed)
        chosen.update((client.endpoint.url, entry.platform) for client in members)
    return chosen


def _platform_groups(store: Store, ref: ImageRef, index: "PushedManifest", clients: Sequence[DockerClient],
                     failed: Dict[str, str], platforms: HostPlatforms) -> List[Tuple[IndexEntry, List[DockerClient]]]:
    """The hosts not failed yet, grouped by the image of the index each gets (in index order)."""
    entries = index_images(index)
    what = "%s in %s" % (ref, store.url)
    chosen = {}  # type: Dict[str, IndexEntry]

    def choose(client: DockerClient) -> None:
        try:
            chosen[client.endpoint.url] = choose_platform(entries, platforms.of(client), what)
        except DogestryError as e:
            failed[client.endpoint.url] = str(e)

    run_in_threads(choose, [c for c in clients if c.endpoint.url not in failed])
    return [(entry, members) for entry, members in
            ((e, [c for c in clients if chosen.get(c.endpoint.url) == e]) for e in dict.fromkeys(entries)) if members]


def _spool_found(found: FoundImage, spool: "LocalStore", clients: Sequence[DockerClient], progress: ProgressSink,
                 failed: Dict[str, str]) -> None:
    """Copy the records of a found image and the blobs the hosts lack of it into the spool (each blob once)."""
    store, image_hex, ref, image, named_hex = found
    keys = [tag_key(ref)] if ref else []
    if named_hex:  # the tag names the original layout, migrated (--keep-legacy): the spool reads it the same way
        keys += [image_key(named_hex, "json"), image_key(named_hex, "migrated")]
    if image.legacy:
        for v1_id in image.legacy_chain:
            keys += [image_key(v1_id, "json"), image_key(v1_id, "layer.tar")]
        _copy_keys(store, spool, keys, progress)
        return
    keys += [image_key(image_hex, "config.json"), image_key(image_hex, "manifest.json")]
    _copy_keys(store, spool, keys, progress)
    needed = {}  # type: Dict[str, LayerRecord]
    image_chains = chain_ids([r.diff_id for r in image.layers])

    def ask(client: DockerClient) -> None:
        try:
            if client.inspect_image(image.image_id) is not None:
                return
            chains = client.layer_chains()
        except DogestryError as e:
            failed[client.endpoint.url] = str(e)
            return
        for record, chain in zip(image.layers, image_chains):
            if chain not in chains:
                needed[record.digest] = record

    run_in_threads(ask, [c for c in clients if c.endpoint.url not in failed])
    for record in needed.values():
        if spool.stat(blob_key(record.digest)) == record.size:  # spooled for another image already
            continue
        task = progress.task(record.diff_id[7:19], "downloading", record.size)
        path = os.path.join(spool.root, ".tmp-blob-" + digest_hex(record.digest))
        with OutputFile(path) as out:
            for data in verified_blob_chunks(store, record, task.advance):
                out.write(data)
        if record.chunked:  # the chunks first, so they are there before the recipe names them in the spool
            recipe, metadata = open_recipe(spool, record, open(path, "rb"))
            metadata.stream.close()
            _spool_chunks(store, spool, recipe)
        spool.put_file(blob_key(record.digest), path, record.size, consume=True)
        task.finish("downloaded")


def _spool_chunks(store: Store, spool: "LocalStore", recipe: LayerRecipe) -> None:
    """Copy the chunks of a recipe the spool lacks into it, CHUNK_FETCHES at a time (pulls from the
    spool check them against the layer's diffID)."""
    def copy(chunk_hex: str) -> None:
        key = chunk_key(chunk_hex)
        if spool.stat(key) is None:
            spool.put_bytes(key, store.get_bytes(key, limit=CHUNK_OBJECT_MAX))

    with thread_pool(CHUNK_FETCHES, "dogestry-chunk") as pool:
        list(pool.map(copy, dict.fromkeys(h for h, _ in recipe.chunks)))


def _copy_keys(store: Store, spool: "LocalStore", keys: Sequence[str], progress: ProgressSink) -> None:
    for key in keys:
        size = store.stat(key)
        if size is None:
            raise NotFound("%s: no %s in the store" % (store.url, key))
        path = os.path.join(spool.root, ".tmp-copy")
        with contextlib.closing(store.open(key, size)) as src, OutputFile(path) as out:
            copied = copy_stream(src, out)
        if copied != size:
            raise IntegrityError("%s: %s changed while it was read" % (store.url, key))
        spool.put_file(key, path, size, consume=True)


def fleet_pull(clients: Sequence[DockerClient], store: Store, images: Sequence[str], progress: ProgressSink,
               tempdir: Optional[str], statuses: Dict[str, Dict[str, str]], platforms: HostPlatforms) -> None:
    """Download once (each platform's image of a multi-platform tag once), load every host in
    parallel; each host's status (the original's JSON, with the platform it got of
    multi-platform tags) goes into statuses, by host URL, the moment that host is done."""
    failed = {}  # type: Dict[str, str]
    chosen = collections.defaultdict(list)  # type: Dict[str, List[str]]
    with work_directory(tempdir) as work:
        spool = LocalStore(work)
        for text in images:
            for url, platform in spool_image(store, text, spool, clients, progress, failed, platforms).items():
                chosen[url].append(str(platform))

        def load(client: DockerClient) -> None:
            url = client.endpoint.url
            status = {"Host": url, "Status": "ok"}
            if url in failed:
                status.update(Status="failed", Error=failed[url])
            else:
                try:
                    for text in images:
                        pull_image(client, spool, text, HostProgress(progress, url), platform=platforms.known.get(url))
                except DogestryError as e:
                    status.update(Status="failed", Error=str(e).replace(spool.url, store.url))
            if status["Status"] == "ok" and chosen.get(url):
                status["Platform"] = ", ".join(dict.fromkeys(chosen[url]))
            statuses[url] = status

        run_in_threads(load, clients)


class HostProgress:
    """A Progress for one host of a fleet: the same output, lines prefixed with the host."""

    def __init__(self, progress: ProgressSink, host: str):
        self.progress, self.host = progress, host

    def note(self, message: str) -> None:
        self.progress.note("%s: %s" % (self.host, message))

    def task(self, label: str, action: str, total: Optional[int]) -> TaskSink:
        return self.progress.task("%s %s" % (self.host, label), action, total)


# --- delegation to dogestry servers on the hosts ---
#
# A dogestry server next to a host's dockerd can fetch from S3 itself.  The client never
# hands it keys: it resolves the image, then sends presigned GET URLs, valid for
# DELEGATION_URL_TTL seconds, for exactly the objects this pull needs.  It talks to the
# server as it talks to the host's engine (TLS, verified, when DOCKER_TLS_VERIFY is set),
# and afterwards asks the engine whether the image really is there; a host whose server
# fails or lies gets a regular pull.
#
# Of a multi-platform tag the server picks the image (its own engine's platform, or the one
# --platform asks, which the request names): the request names the index and carries URLs of
# the index, of every platform's manifest and image (only the asked one's with --platform), and
# the server answers which image it pulled (Docker's "aux" progress line: ID and Platform).
# Servers that take such requests say so in a header of GET /status/check (older ones do not:
# their hosts get a regular pull).
#
# An image with chunked layers needs its chunks too: the client reads each chunked layer's
# recipe and presigns every chunk it names.  Those URLs differ only in their path and signature,
# so the request carries them as "chunks": {"query": the query they share, "signatures": {chunk
# hex: its X-Amz-Signature}} (some 136 bytes a chunk), and the server makes each URL for its own
# S3 location (so they read nothing else).  At most DELEGATION_CHUNKS_MAX chunks a request
# (about 7.5 GiB of chunked layers at their 1.3 MiB average, 2.9 GiB at the least), and the whole
# request at most SERVER_BODY_LIMIT: a bigger image is pulled directly.  Servers that take
# chunks say so in a header of GET /status/check (others get their hosts a regular pull).

DELEGATION_ROUTE = "/dogestry/v1/pull"
DELEGATION_HEADER = "Dogestry-Delegation"
DELEGATION_PROTOCOL = "presigned-v1"
DELEGATION_INDEX_HEADER = "Dogestry-Delegation-Index"
DELEGATION_INDEX_PROTOCOL = "presigned-index-v1"
DELEGATION_CHUNKS_HEADER = "Dogestry-Delegation-Chunks"
DELEGATION_CHUNKS_PROTOCOL = "presigned-chunks-v1"
DELEGATION_CHUNKS_MAX = 6000  # chunks one delegated pull carries URLs of (their signatures: ~800 KiB)
DELEGATION_URL_TTL = 900
DELEGATION_READ_TIMEOUT = 600.0
SERVER_LINE_LIMIT = 64 << 10  # the longest progress line read from a server


def server_url(endpoint: DockerEndpoint, port: int) -> Optional[str]:
    """Where a dogestry server would listen next to a tcp:// Docker host (None for unix sockets)."""
    if endpoint.host is None:
        return None
    host = endpoint.host if ":" not in endpoint.host else "[%s]" % endpoint.host
    return "%s://%s:%d" % ("https" if endpoint.tls else "http", host, port)


def server_status(url: str, tls: Optional[ssl.SSLContext] = None, timeout: float = 3.0) -> Optional[FrozenSet[str]]:
    """The delegation protocols of the dogestry server answering GET /status/check at url
    (none for servers too old to have one), or None if no dogestry server answers."""
    import http.client  # lazy (start-up time): only commands that talk HTTP need it
    conn = http_connection(url, tls, timeout)
    try:
        conn.request("GET", "/status/check")
        resp = conn.getresponse()
        body = resp.read(64)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if resp.status != 200 or body.strip() != b"OK":
        return None
    return frozenset(p for p in (resp.getheader(h) for h in (DELEGATION_HEADER, DELEGATION_INDEX_HEADER,
                                                             DELEGATION_CHUNKS_HEADER)) if p)


class Delegation(NamedTuple):
    """One image as a server is asked to pull it: the request body, and what to check after.
    Of a multi-platform tag, the images the server may pick (ID -> platform); image_id is the
    one it must pick when --platform chose it ('' when the server's engine chooses).  chunks:
    how many chunks it carries URLs of; direct: why it must be pulled directly ('' if it may be
    delegated; then the body is empty)."""

    image_id: str
    tag: Optional[ImageRef]
    body: bytes
    platforms: Mapping[str, str] = {}
    chunks: int = 0
    direct: str = ""


def plan_delegation(store: "S3Store", text: str, progress: ProgressSink, platform: Optional[Platform] = None,
                    chunk_limit: int = DELEGATION_CHUNKS_MAX) -> Optional[Delegation]:
    """Resolve an image and presign the objects a server needs to pull it (None: legacy layout);
    of a multi-platform tag, those of every platform's image (only the platform's, if given).
    An image with more than chunk_limit chunks, or a request larger than a server takes, is
    planned as one to pull directly (Delegation.direct)."""
    store.check()
    tagged = index_tag(store, text)
    if tagged is not None:
        return _plan_index_delegation(store, tagged[0], tagged[1], platform, chunk_limit)
    _, image_hex, ref, image, _ = find_image(store, text, progress)
    if image.legacy:
        return None
    sizes = _image_object_sizes(store, image_hex, image)
    doc = {"store": store.url, "image": image.image_id, "tag": str(ref) if ref else None,
           "objects": _presigned_objects(store, sizes)}
    return _with_chunks(store, doc, image.layers, chunk_limit, Delegation(image.image_id, ref, b"", {}))


def _plan_index_delegation(store: "S3Store", ref: ImageRef, index: "PushedManifest",
                           platform: Optional[Platform], chunk_limit: int) -> Delegation:
    entries = index_images(index)
    if platform is not None:
        entries = [choose_platform(entries, platform, "%s in %s" % (ref, store.url))]
    sizes = {manifest_key(index.digest): len(index.data)}
    platforms = {}  # type: Dict[str, str]
    layers = []  # type: List[LayerRecord]
    for entry in entries:
        image_hex = image_of_manifest(store, entry.digest)
        image = load_stored_image(store, image_hex)
        sizes[manifest_key(entry.digest)] = entry.size
        sizes.update(_image_object_sizes(store, image_hex, image))
        platforms["sha256:" + image_hex] = str(entry.platform)
        layers += image.layers
    doc = {"store": store.url, "index": index.digest, "tag": str(ref), "objects": _presigned_objects(store, sizes)}
    if platform is not None:
        doc["platform"] = str(platform)
    plan = Delegation(next(iter(platforms)) if platform is not None else "", ref, b"", platforms)
    return _with_chunks(store, doc, layers, chunk_limit, plan)


def _with_chunks(store: "S3Store", doc: Dict[str, Any], layers: Sequence[LayerRecord], chunk_limit: int,
                 plan: Delegation) -> Delegation:
    """The plan with its request body: doc and the presigned chunks of the chunked layers (their
    recipes read), or a reason to pull directly if they are too many or the request too large."""
    what = str(plan.tag) if plan.tag else plan.image_id[7:19]
    chunks = list(dict.fromkeys(h for recipe in _recipes(store, layers) for h, _ in recipe.chunks))
    if len(chunks) > chunk_limit:
        return plan._replace(chunks=len(chunks), direct="%s has %d chunks, more than the %d a delegated pull carries"
                                                        % (what, len(chunks), chunk_limit))
    if chunks:
        query, signatures = store.client.presign_many([store.location.prefix + chunk_key(h) for h in chunks],
                                                      DELEGATION_URL_TTL)
        doc["chunks"] = {"query": query, "signatures": dict(zip(chunks, signatures))}
    body = json.dumps(doc).encode()
    if len(body) > SERVER_BODY_LIMIT:
        return plan._replace(chunks=len(chunks), direct="the request to pull %s would be %s, more than a server "
                                                        "takes (%s)" % (what, human_size(len(body)),
                                                                        human_size(SERVER_BODY_LIMIT)))
    return plan._replace(body=body, chunks=len(chunks))


def _recipes(store: Store, layers: Sequence[LayerRecord]) -> List[LayerRecipe]:
    """The recipes of the chunked layers among these (each read once, a few at a time)."""
    chunked = list({r.digest: r for r in layers if r.chunked}.values())
    with thread_pool(min(8, max(1, len(chunked))), "dogestry-recipes") as pool:
        return list(pool.map(functools.partial(read_recipe, store), chunked))


def _image_object_sizes(store: Store, image_hex: str, image: StoredImage) -> Dict[str, int]:
    """The keys and sizes of an image's manifest, config and layer blobs."""
    sizes = {}  # type: Dict[str, int]
    for key in (image_key(image_hex, "manifest.json"), image_key(image_hex, "config.json")):
        size = store.stat(key)
        if size is None:
            raise NotFound("%s: no %s in the store" % (store.url, key))
        sizes[key] = size
    for record in image.layers:
        sizes[blob_key(record.digest)] = record.size
    return sizes


def _presigned_objects(store: "S3Store", sizes: Mapping[str, int]) -> Dict[str, Dict[str, Any]]:
    return {key: {"url": store.client.presign(store.location.prefix + key, DELEGATION_URL_TTL), "size": size}
            for key, size in sizes.items()}


def _json_line(line: bytes) -> Optional[Dict[str, Any]]:
    """A JSON object from one line of a server's answer, or None."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


class ServerAnswer(NamedTuple):
    """How a delegated pull ended: the server's error, if any, and the image ID it says it pulled."""

    error: Optional[str]
    image_id: str = ""


def delegate_pull(url: str, tls: Optional[ssl.SSLContext], plan: Delegation, progress: ProgressSink,
                  timeout: Optional[float] = None) -> ServerAnswer:
    """Ask a dogestry server to pull one image into its host, relaying its progress.

    timeout: the longest the server may stay silent (default DELEGATION_READ_TIMEOUT)."""
    import http.client  # lazy (start-up time): only commands that talk HTTP need it
    conn = http_connection(url, tls, timeout or DELEGATION_READ_TIMEOUT)
    pulled = ""
    try:
        conn.request("POST", DELEGATION_ROUTE, body=plan.body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return ServerAnswer(printable("HTTP %d: %s" % (resp.status, _docker_message(resp.read(SERVER_LINE_LIMIT)))))
        for line in iter(lambda: resp.readline(SERVER_LINE_LIMIT), b""):
            doc = _json_line(line)
            if doc is None:
                continue
            if doc.get("errorDetail") or doc.get("error"):
                return ServerAnswer(printable(str((doc.get("errorDetail") or {}).get("message") or doc.get("error"))))
            aux = doc.get("aux")
            if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
                pulled = aux["ID"][:80]
            if doc.get("status") and not doc.get("progressDetail"):
                progress.note("%s: %s%s" % (url, "%s: " % doc["id"] if doc.get("id") else "", doc["status"]))
        return ServerAnswer(None, pulled)
    except (OSError, http.client.HTTPException, AttributeError) as e:
        return ServerAnswer(_os_reason(e) if isinstance(e, OSError) else "bad answer: %s" % e)
    finally:
        conn.close()


def image_missing(client: DockerClient, plan: Delegation, pulled: str = "") -> Optional[str]:
    """None if the host's engine has the image under the pulled tag, else what is wrong (pulled:
    the image the server says it picked of a multi-platform tag)."""
    ref = str(plan.tag) if plan.tag else plan.image_id
    image_id = plan.image_id or pulled
    if plan.platforms and image_id not in plan.platforms:
        return "the server names %s as the image it pulled, which is none of %s" % (printable(pulled) or "nothing", ref)
    try:
        info = client.inspect_image(ref)
    except DogestryError as e:
        return "cannot check the host: %s" % e
    if info is None or info.get("Id") != image_id:
        return "the server reported success, but the host has no %s = %s" % (ref, image_id[7:19])
    return None


def delegate_to_servers(endpoints: Sequence[DockerEndpoint], store: "S3Store", images: Sequence[str],
                        port: int, progress: ProgressSink, statuses: Dict[str, Dict[str, str]],
                        host_timeout: Optional[float] = None, platform: Optional[Platform] = None) -> None:
    """Pull through the dogestry servers of the hosts that run one (each picks its engine's
    platform of multi-platform tags, or the one given); each host's status goes into statuses
    (by host URL) the moment it is done."""
    urls = {e.url: server_url(e, port) for e in endpoints}
    servers = []  # type: List[Tuple[DockerEndpoint, str, FrozenSet[str]]]

    def probe(endpoint: DockerEndpoint) -> None:
        url = urls[endpoint.url]
        protocols = server_status(url, endpoint.tls) if url else None
        if url and protocols and DELEGATION_PROTOCOL in protocols:
            servers.append((endpoint, url, protocols))

    run_in_threads(probe, endpoints)
    if not servers:
        return
    plans = [plan_delegation(store, text, progress, platform) for text in images]
    if any(plan is None for plan in plans):
        progress.note("images in the original dogestry layout are pulled directly, not through servers")
        return
    direct = [plan.direct for plan in plans if plan is not None and plan.direct]
    if direct:
        progress.note("%s: pulling directly, not through servers" % direct[0])
        return
    for needed, protocol, what in ((any(p is not None and p.platforms for p in plans), DELEGATION_INDEX_PROTOCOL,
                                    "multi-platform tags"),
                                   (any(p is not None and p.chunks for p in plans), DELEGATION_CHUNKS_PROTOCOL,
                                    "chunked layers")):
        if not needed:
            continue
        for endpoint, url, protocols in servers:
            if protocol not in protocols:
                progress.note("%s: the dogestry server at %s is too old for %s: pulling directly"
                              % (endpoint.url, url, what))
        servers = [server for server in servers if protocol in server[2]]

    def run(server: Tuple[DockerEndpoint, str, FrozenSet[str]]) -> None:
        endpoint, url, _ = server
        client = DockerClient(endpoint, timeout=host_timeout or 60.0)
        chosen = []  # type: List[str]
        for plan in plans:
            assert plan is not None
            answer = delegate_pull(url, endpoint.tls, plan, progress, host_timeout)
            error = answer.error or image_missing(client, plan, answer.image_id)
            if error:
                statuses[endpoint.url] = {"Host": endpoint.url, "Status": "failed",
                                          "ServerError": "%s: %s" % (url, error)}
                return
            if plan.platforms:
                chosen.append(plan.platforms[plan.image_id or answer.image_id])
        statuses[endpoint.url] = {"Host": endpoint.url, "Status": "ok", "Server": url}
        if chosen:
            statuses[endpoint.url]["Platform"] = ", ".join(dict.fromkeys(chosen))

    run_in_threads(run, servers)


# === 16. The registry API: manifests (made from images, or pushed), tags, blobs, referrers ===
#
# `dogestry -server STORE` also answers /v2/ for every OCI client (docker, containerd,
# podman, skopeo).  The manifest of an image stored by dogestry is made from it, a pure
# function of what is stored (so a digest never changes); a manifest a client pushed is kept
# byte for byte; blobs are the stored bytes.  OCI Distribution Spec v1.1: "Pull", "Push"
# (manifests), "Content discovery", "Deleting" and "Error codes"; _catalog from the Docker
# Registry HTTP API v2.  The HTTP side (routes, headers, who may do what) is the server's.

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER_MEDIA_TYPES = {
    OCI_MANIFEST: {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                   "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
                   "none": "application/vnd.oci.image.layer.v1.tar"},
    DOCKER_MANIFEST: {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                      "zstd": "application/vnd.docker.image.rootfs.diff.tar.zstd",
                      "none": "application/vnd.docker.image.rootfs.diff.tar"},
}
REGISTRY_PAGE = 1000  # the most tags or repositories one page lists
REGISTRY_DEFAULT_PLATFORM = Platform("linux", "amd64")  # a client that accepts no index gets it (as distribution)
REGISTRY_API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}  # on every /v2/ answer
BLOB_URL_TTL = 900    # seconds a presigned blob URL a client is redirected to stays valid
REGISTRY_LISTING_TTL = 5.0  # seconds a listing of images/ or repositories/ is reused (what is pushed shows after)
REGISTRY_INDEX_READERS = 8  # manifest.json files the digest index reads at once
REGISTRY_MISS_TTL = 2.0     # seconds a digest with no pushed manifest is not looked for again
REGISTRY_MISSES = 10000     # ... of at most so many digests remembered
_REPO_NAME = re.compile(r"^%s(?:/%s)*$" % (_NAME_COMPONENT, _NAME_COMPONENT))
_MANIFEST_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")  # the spec's digest grammar


class RegistryError(DogestryError):
    """An answer of the registry API other than success: HTTP status, the spec's error code."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


def registry_manifest(image: StoredImage, media_type: str) -> bytes:
    """The manifest served for a stored image: canonical JSON (keys sorted, no whitespace) of
    schemaVersion 2, the media type, the config (config.json's digest and size) and, in order,
    every layer as stored (its digest, size, and the media type of its compression); a chunked
    layer as its uncompressed tar (its diffID and raw size: a recipe is no layer a client reads),
    which the registry assembles from its chunks when a client asks for that blob.

    A pure function of the stored image, so its digest is the same from every version of
    dogestry, and pulls by digest keep working.
    """
    config_type = OCI_CONFIG if media_type == OCI_MANIFEST else DOCKER_CONFIG
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": config_type, "digest": image.image_id, "size": image.config_size},
           "layers": [layer_descriptor(r, media_type) for r in image.layers]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def layer_descriptor(record: LayerRecord, media_type: str) -> Dict[str, Any]:
    """A stored layer's descriptor in a manifest of media_type: the blob as stored, or a chunked
    layer's uncompressed tar (tar_digest, tar_size)."""
    compression = "none" if record.chunked else record.compression
    return {"mediaType": LAYER_MEDIA_TYPES[media_type][compression], "digest": record.tar_digest,
            "size": record.tar_size}


def accepted_types(accept: str) -> Optional[FrozenSet[str]]:
    """The media types an Accept header lists (parameters such as q= ignored, as distribution
    does); None for any type: no Accept header at all (RFC 9110 12.5.1), or a wildcard."""
    accepted = frozenset(part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip())
    if not accepted or "*/*" in accepted or "application/*" in accepted:
        return None
    return accepted


def manifest_type_for(accept: str) -> str:
    """Which manifest to answer an Accept header with: OCI, unless only Docker's schema 2 is accepted."""
    accepted = accepted_types(accept)
    if accepted is None or OCI_MANIFEST in accepted:
        return OCI_MANIFEST
    if DOCKER_MANIFEST in accepted:
        return DOCKER_MANIFEST
    raise RegistryError(404, "MANIFEST_UNKNOWN", "only OCI image manifests and Docker schema 2 manifests are served "
                                                 "(Accept: %s)" % accept[:200])


def type_accepted(media_type: str, accepted: Optional[FrozenSet[str]]) -> bool:
    """Does a client that accepts `accepted` (None: any type) take a manifest of media_type?"""
    return accepted is None or media_type in accepted


def repository_name(name: str) -> str:
    """A repository name checked against the spec's grammar (before it is used in any key)."""
    if len(name) > 255 or not _REPO_NAME.match(name):
        raise RegistryError(400, "NAME_INVALID", "invalid repository name %r" % name[:100])
    return name


def check_digest(digest: str) -> Optional[str]:
    """The hex of a sha256 digest; None for a well-formed digest of another algorithm (never stored);
    DIGEST_INVALID for anything else (the spec's grammar, and 64 hex digits for sha256)."""
    if not _MANIFEST_DIGEST.match(digest) or len(digest) > 256:
        raise RegistryError(400, "DIGEST_INVALID", "invalid digest %r" % digest[:100])
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256":
        return None
    if not _HEX64.match(encoded):
        raise RegistryError(400, "DIGEST_INVALID", "invalid sha256 digest %r" % digest[:100])
    return encoded


_DECIMAL = re.compile(r"^[0-9]+$")
_HUGE = 1 << 63  # stands for any number of more than 18 digits: beyond every size and count


def decimal_number(digits: str) -> int:
    """The value of ASCII digits, at most _HUGE (int() refuses more than 4300 digits on Python 3.11+)."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 18 else _HUGE


def page(items: Sequence[str], query: Mapping[str, List[str]]) -> Tuple[List[str], Optional[str]]:
    """The items after `last`, at most `n` of them; and the `last` of the next page, if there is one."""
    last = (query.get("last") or [""])[0]
    text = (query.get("n") or [str(REGISTRY_PAGE)])[0]
    if not _DECIMAL.match(text):  # ASCII digits only (str.isdigit takes '²', which int() refuses)
        raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "n must be a whole number")
    n = min(decimal_number(text), REGISTRY_PAGE)
    rest = [item for item in items if item > last] if last else list(items)
    shown = rest[:n]
    return shown, shown[-1] if len(rest) > n and shown else None


# --- manifests pushed through the registry ---
#
# A pushed manifest is kept byte for byte at manifests/sha256/<hex>: the digest a client computed
# is the one every later pull gets.  An image manifest whose config is an image config also
# makes the dogestry image record (images/<id>/, its layers unchecked: their diffIDs are the
# client's word), so every command handles the image; a tag of it names the image (the tag file
# holds the image ID, as always) and manifests/tags/<name>/<tag> the manifest it was pushed with,
# which the registry serves for the tag as long as that manifest is of the tag's image.  A tag of
# anything else (an index, an artifact) holds @sha256:<hex>.  A manifest with a subject is listed
# under manifests/referrers/<subject hex>/<hex> (its descriptor), for the referrers API.  A blob
# a manifest names may be a chunked layer's uncompressed tar (a client pushing back an image it
# pulled): its digest is the diffID, no blob key; it is that stored layer (stored_blob), which
# the image record holds, and gc keeps it while a kept manifest names it (_mark_manifest_blobs).

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST) + INDEX_TYPES
IMAGE_CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
LAYER_COMPRESSION = {media_type: compression for types in LAYER_MEDIA_TYPES.values()
                     for compression, media_type in types.items()}
SCHEMA_VERSION_2 = Check("2", lambda v: type(v) is int and v == 2)
_PUSHED_DESCRIPTOR = {"mediaType": str, "digest": DIGEST, "size": SIZE, "annotations?": OrNull({"*": str}),
                      "artifactType?": str}
PUSHED_MANIFEST_SHAPE = {"schemaVersion": SCHEMA_VERSION_2, "mediaType?": str, "artifactType?": str,
                         "config": _PUSHED_DESCRIPTOR, "layers": [_PUSHED_DESCRIPTOR], "subject?": _PUSHED_DESCRIPTOR,
                         "annotations?": OrNull({"*": str})}
PUSHED_INDEX_SHAPE = {"schemaVersion": SCHEMA_VERSION_2, "mediaType?": str, "artifactType?": str,
                      "manifests": [dict(_PUSHED_DESCRIPTOR, **{"platform?": OrNull({"os": str, "architecture": str,
                                                                                       "variant?": str})})],
                      "subject?": _PUSHED_DESCRIPTOR, "annotations?": OrNull({"*": str})}
REFERRER_SHAPE = {"mediaType": str, "digest": DIGEST, "size": SIZE, "artifactType?": str,
                  "annotations?": OrNull({"*": str})}


def manifest_key(digest: str) -> str:
    return "manifests/sha256/" + digest_hex(digest)


def tag_manifest_key(ref: ImageRef) -> str:
    return "manifests/tags/%s/%s" % (ref.name, ref.tag)


def referrer_key(subject: str, digest: str) -> str:
    return "manifests/referrers/%s/%s" % (digest_hex(subject), digest_hex(digest))


class PushedManifest(NamedTuple):
    """A manifest as a client pushed it: its digest, media type, bytes and (shape-checked) document."""

    digest: str
    media_type: str
    data: bytes
    doc: Dict[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def subject(self) -> Optional[str]:
        subject = self.doc.get("subject")
        return subject["digest"] if subject else None

    @property
    def children(self) -> List[str]:
        """The digests of the manifests an index names."""
        return [d["digest"] for d in self.doc["manifests"]] if self.is_index else []

    @property
    def blobs(self) -> List[Tuple[str, int]]:
        """(digest, size) of the blobs an image or artifact manifest names: its config, then its layers."""
        if self.is_index:
            return []
        return [(d["digest"], d["size"]) for d in [self.doc["config"]] + self.doc["layers"]]

    def descriptor(self) -> Dict[str, Any]:
        """Its descriptor in an image index (the referrers API): artifactType as the spec says
        (the manifest's own, else its config's media type)."""
        doc = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}  # type: Dict[str, Any]
        artifact = self.doc.get("artifactType") or (None if self.is_index else self.doc["config"]["mediaType"])
        if artifact:
            doc["artifactType"] = artifact
        if self.doc.get("annotations"):
            doc["annotations"] = self.doc["annotations"]
        return doc


def parse_pushed_manifest(data: bytes, content_type: str, what: str = "the manifest",
                          parsed: Any = None) -> PushedManifest:
    """A manifest as stored or as a client pushes it, checked: of a known media type (the
    Content-Type, which its own mediaType must not contradict), at most 4 MiB of JSON of the
    shape (parsed: the data's JSON, if it was parsed already); RegistryError MANIFEST_INVALID
    (413 SIZE_INVALID when too large) otherwise."""
    if len(data) > DOCUMENT_LIMIT:
        raise RegistryError(413, "SIZE_INVALID", "%s is larger than %s" % (what, human_size(DOCUMENT_LIMIT)))
    media_type = content_type.split(";")[0].strip().lower()
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(400, "MANIFEST_INVALID", "%s's media type %r is none of %s"
                            % (what, media_type[:100], ", ".join(MANIFEST_TYPES)))
    shape = PUSHED_INDEX_SHAPE if media_type in INDEX_TYPES else PUSHED_MANIFEST_SHAPE
    try:
        doc = parse_json(data, what, shape) if parsed is None else check_shape(parsed, shape, what)
    except FormatError as e:
        raise RegistryError(400, "MANIFEST_INVALID", str(e))
    if doc.get("mediaType", media_type) != media_type:
        raise RegistryError(400, "MANIFEST_INVALID", "%s says its media type is %r, its Content-Type %r"
                            % (what, str(doc["mediaType"])[:100], media_type))
    return PushedManifest(sha256_digest(data), media_type, data, doc)


def read_pushed_manifest(store: Store, digest: str) -> Optional[PushedManifest]:
    """A manifest pushed through the registry, as stored (None if there is none of that digest)."""
    try:
        data = store.get_bytes(manifest_key(digest), limit=DOCUMENT_LIMIT)
    except NotFound:
        return None
    if sha256_digest(data) != digest:
        raise IntegrityError("%s: %s is not manifest %s" % (store.url, manifest_key(digest), digest))
    what = "%s: %s" % (store.url, manifest_key(digest))
    doc = parse_json(data, what)
    media_type = str(doc.get("mediaType")) if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str) else \
        OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST
    try:
        return parse_pushed_manifest(data, media_type, what, doc)
    except RegistryError as e:
        raise FormatError(str(e))


def pushed_image_layers(manifest: PushedManifest, config: bytes,
                        chunked: Optional[Mapping[str, LayerRecord]] = None) -> Optional[List[LayerRecord]]:
    """The layer records of the image an image manifest describes (its diffIDs the config's word:
    unchecked; a layer that is a chunked layer's tar, `chunked` by digest: that stored layer), or
    None if it is no image dogestry can store (an artifact, foreign layers)."""
    if manifest.is_index or manifest.doc["config"]["mediaType"] not in IMAGE_CONFIG_TYPES or \
            any(d["mediaType"] not in LAYER_COMPRESSION for d in manifest.doc["layers"]):
        return None
    try:
        diff_ids = parse_json(config, "the image config", IMAGE_CONFIG_SHAPE)["rootfs"]["diff_ids"]
    except FormatError as e:
        raise RegistryError(400, "MANIFEST_INVALID", str(e))
    if len(diff_ids) != len(manifest.doc["layers"]):
        raise RegistryError(400, "MANIFEST_INVALID", "the manifest names %d layers, its config %d"
                            % (len(manifest.doc["layers"]), len(diff_ids)))
    layers = []
    for index, (diff_id, d) in enumerate(zip(diff_ids, manifest.doc["layers"])):
        record = (chunked or {}).get(d["digest"])
        if record is not None and record.diff_id != diff_id:
            raise RegistryError(400, "MANIFEST_INVALID", "layer %d is the uncompressed layer %s, but the config "
                                "names diffID %s for it" % (index, d["digest"], str(diff_id)[:100]))
        layers.append(record or LayerRecord(diff_id, d["digest"], d["size"], LAYER_COMPRESSION[d["mediaType"]],
                                            unchecked=True))
    return layers


class StoredBlob(NamedTuple):
    """Where a store holds a blob a manifest names: its key (under blobs/, an image's config.json,
    or for a chunked layer's uncompressed tar, the layer's index entry) and that layer's record."""

    key: str
    layer: Optional[LayerRecord] = None  # the chunked layer whose tar (its diffID) the blob is

    def must_exist(self, size: int) -> Dict[str, Optional[int]]:
        """The keys that must be there for a blob of that size to stay served, with their sizes
        (None: any): the blob; or a chunked layer's index entry and its recipe."""
        if self.layer is None:
            return {self.key: size}
        return {self.key: None, blob_key(self.layer.digest): self.layer.size}


def stored_blob(store: Store, digest: str, size: int) -> Optional[StoredBlob]:
    """Where the store holds a blob of that digest and size: blobs/, (an image config) images/,
    or a chunked layer whose uncompressed tar it is (chunked_layer: its diffID, of its rawSize),
    which the registry assembles from its chunks."""
    for key in (blob_key(digest), image_key(digest_hex(digest), "config.json")):
        if store.stat(key) == size:
            return StoredBlob(key)
    layer = chunked_layer(store, digest)
    if layer is not None and layer.tar_size == size:
        return StoredBlob(layer_index_key(digest), layer)
    return None


def stored_blob_key(store: Store, digest: str, size: int) -> Optional[str]:
    """The key of stored_blob() (a chunked layer's tar: its index entry's), or None."""
    found = stored_blob(store, digest, size)
    return None if found is None else found.key


def store_pushed_manifest(store: Store, manifest: PushedManifest, ref: Optional[ImageRef],
                          known_manifest: Callable[[str], Optional[PushedManifest]],
                          freshness: Freshness) -> Optional[str]:
    """Store a pushed manifest (and its tag, if ref): the blobs it names must be stored
    (MANIFEST_BLOB_UNKNOWN) and the manifests an index names (MANIFEST_UNKNOWN: known_manifest
    gives them), which are kept with it (_keep_index_children); the image record is written for
    an image manifest; the tag last.  Return the image ID hex, if it is one."""
    if ref is not None and tag_is_immutable(store, ref):  # refused before anything is written
        config = manifest.blobs[0][0] if manifest.blobs else ""
        check_tag_may_move(store, ref, "@" + manifest.digest, [digest_hex(config)] if config else [])
    found = _stored_blobs(store, manifest, "blob %s is not stored (push it first)")
    children = [known_manifest(digest) for digest in manifest.children]
    unknown = [digest for digest, child in zip(manifest.children, children) if child is None]
    if unknown:
        raise RegistryError(400, "MANIFEST_UNKNOWN", "manifest %s, which the index names, is not stored" % unknown[0])
    _seen_ages(store, [blob.key for blob in found], freshness)
    must_exist = _blobs_must_exist(found, manifest)
    must_exist.update(_keep_index_children(store, [c for c in children if c is not None], freshness))
    store.put_bytes(manifest_key(manifest.digest), manifest.data, if_absent=True)
    freshness.written(manifest_key(manifest.digest))
    image_hex = _pushed_image_record(store, manifest, found, freshness)
    if manifest.subject:
        write_json(store, referrer_key(manifest.subject, manifest.digest), manifest.descriptor())
    freshness.secure({}, must_exist)
    if ref is not None:
        if image_hex is not None:
            store.put_bytes(tag_manifest_key(ref), manifest.digest.encode())  # before the tag it goes with
        point_tag(store, ref, TagTarget(image_hex, None if image_hex else manifest.digest))
    return image_hex


def _stored_blobs(store: Store, manifest: PushedManifest, missing: str) -> List[StoredBlob]:
    """Where the blobs a manifest names are stored, in its order (RegistryError MANIFEST_BLOB_UNKNOWN,
    the `missing` message with the digest, if one is not)."""
    blobs = manifest.blobs
    with thread_pool(min(8, max(1, len(blobs))), "dogestry-check") as pool:
        found = list(pool.map(lambda blob: stored_blob(store, *blob), blobs))
    gone = [digest for (digest, _), place in zip(blobs, found) if place is None]
    if gone:
        raise RegistryError(400, "MANIFEST_BLOB_UNKNOWN", missing % gone[0])
    return [place for place in found if place is not None]


def _blobs_must_exist(found: Sequence[StoredBlob], manifest: PushedManifest) -> Dict[str, Optional[int]]:
    """The keys (and sizes) that must be there before a tag of the manifest (found: its _stored_blobs)."""
    must_exist = {}  # type: Dict[str, Optional[int]]
    for place, (_, size) in zip(found, manifest.blobs):
        must_exist.update(place.must_exist(size))
    return must_exist


def _seen_ages(store: Store, keys: Sequence[str], freshness: Freshness) -> None:
    """Tell freshness how old the keys a push relies on are (one HEAD each)."""
    with thread_pool(min(8, max(1, len(keys))), "dogestry-ages") as pool:
        for key, age in zip(keys, pool.map(store.age, keys)):
            freshness.seen(key, age)


def _keep_index_children(store: Store, children: Sequence[PushedManifest],
                         freshness: Freshness) -> Dict[str, Optional[int]]:
    """Keep what an index names until it is tagged, as a push keeps what it reuses: each manifest
    stored byte for byte under manifests/ (one the registry made from a stored image is written
    there now), it and its blobs refreshed if a gc may reach them (nothing named them: a gc may
    be deleting them), its image record kept or written again.  The keys that must be there
    before the tag, with their sizes."""
    must_exist, records = {}, []  # type: Dict[str, Optional[int]], List[Tuple[PushedManifest, List[StoredBlob]]]
    for child in children:
        key = manifest_key(child.digest)
        age = store.age(key)
        if age is None:
            store.put_bytes(key, child.data, if_absent=True)
            freshness.written(key)
        else:
            freshness.seen(key, age)
        found = _stored_blobs(store, child, "blob %%s of manifest %s, which the index names, is not stored"
                              % child.digest)
        _seen_ages(store, [blob.key for blob in found], freshness)
        must_exist[key] = len(child.data)
        must_exist.update(_blobs_must_exist(found, child))
        records.append((child, found))
    if records:
        freshness.refresh(freshness.min_grace / 2, {})  # every child at once, before a gc re-checks more of them
    for child, blobs in records:
        _pushed_image_record(store, child, blobs, freshness)
    return must_exist


def tag_pushed_manifest(store: Store, ref: ImageRef, image_hex: str) -> Optional[PushedManifest]:
    """The manifest an image tag was pushed with through the registry (manifests/tags/<name>/<tag>),
    if it is still a manifest of the tag's image (a later `dogestry push` may have moved the tag)."""
    try:
        digest = store.get_bytes(tag_manifest_key(ref), limit=4096).decode("ascii", "replace").strip()
        pushed = read_pushed_manifest(store, digest)
    except (NotFound, FormatError):
        return None
    if pushed is None or not pushed.blobs or pushed.blobs[0][0] != "sha256:" + image_hex:
        return None
    return pushed


def _pushed_image_record(store: Store, manifest: PushedManifest, found: Sequence[StoredBlob],
                         freshness: Freshness) -> Optional[str]:
    """The image record of an image manifest (found: its _stored_blobs; written unless the image is
    stored already, a layer that is a chunked layer's tar as that layer); its ID hex."""
    if not found or found[0].layer is not None or manifest.is_index:
        return None
    config = store.get_bytes(found[0].key, limit=DOCUMENT_LIMIT)
    layers = pushed_image_layers(manifest, config, {blob.layer.diff_id: blob.layer for blob in found[1:]
                                                    if blob.layer is not None})
    if layers is None:
        return None
    image_id = manifest.doc["config"]["digest"]
    if not _keep_stored_image(store, digest_hex(image_id), freshness):
        _secure_and_write_image(store, freshness, image_id, config, layers)
    return digest_hex(image_id)


# --- multi-platform tags that pushes from engines build ---
#
# A push puts its image under the tag as PLATFORM_MODES say.  Into an index it goes as its
# platform's image: its manifest (registry_manifest: OCI, or Docker's schema 2 in a Docker manifest
# list) is stored under manifests/sha256/, then a new index: the tag's entries in their order
# without those of that platform (and the attestations about them), this image's last.  The tag
# moves by compare-and-swap (swap_versioned): hosts pushing other platforms of it at the same time
# each redo their change over the other's index, so none is lost.  An index is rewritten only when
# a push changes it (its platform's image is another one).

PLATFORM_MODES = {
    "auto": "this image replaces the tag, unless the tag holds a multi-platform index: then it replaces its "
            "platform's image in the index and the other platforms stay",
    "multi": "the tag becomes (or stays) an index holding this image as its platform's, and the tag's other "
             "platforms (a single image of another platform becomes the index's other entry)",
    "single": "this image replaces the whole tag",
}


def image_descriptor(manifest: bytes, media_type: str, platform: Platform) -> Dict[str, Any]:
    """An index's entry for an image manifest of that platform."""
    fields = {"os": platform.os, "architecture": platform.architecture}
    if platform.variant:
        fields["variant"] = platform.variant
    return {"mediaType": media_type, "digest": sha256_digest(manifest), "size": len(manifest), "platform": fields}


def without_platform(descriptors: Sequence[Dict[str, Any]], platform: Platform) -> List[Dict[str, Any]]:
    """An index's entries without the images of exactly that platform and the attestations about them."""
    def exact(descriptor: Dict[str, Any]) -> bool:
        offered = descriptor_platform(descriptor)
        return offered is not None and platform_fits(platform, offered) == 0
    dropped = {d["digest"] for d in descriptors if exact(d)}
    return [d for d in descriptors if d["digest"] not in dropped and
            (d.get("annotations") or {}).get(ATTESTED_ANNOTATION) not in dropped]


def index_entry_image(store: Store, index: PushedManifest, platform: Platform) -> Optional[str]:
    """The image hex of the index's entry of exactly that platform (None: it has none, or not one
    whose image is stored)."""
    for entry in index_images(index):
        if platform_fits(platform, entry.platform) == 0:
            with contextlib.suppress(NotFound, FormatError, IntegrityError):
                return image_of_manifest(store, entry.digest)
    return None


def index_keeping(store: Store, ref: ImageRef, image_hex: str, platform: Platform, mode: str) -> List[str]:
    """The tag's content, if a push of this image in this mode leaves it as it is (an index whose
    entry of the platform is the image already): for check_tag_may_move."""
    if mode == "single":
        return []
    with contextlib.suppress(NotFound, FormatError):
        index = tag_index(store, ref)
        if index is not None and index_entry_image(store, index, platform) == image_hex:
            return ["@" + index.digest]
    return []


def tag_platform_image(store: Store, ref: ImageRef, image: StoredImage, platform: Platform, mode: str,
                       freshness: Freshness, sleep: Callable[[float], None] = time.sleep) -> Optional[PushedManifest]:
    """Point a tag at a pushed image as `mode` (PLATFORM_MODES) says, by compare-and-swap; return
    the index the tag holds now (None: it names the image alone).  What the new content names is
    secured (Freshness) before the tag; what the tag named before is recorded for gc."""
    image_hex = digest_hex(image.image_id)
    stored = {}  # type: Dict[str, bytes]  # manifest key -> the bytes this push stored there

    def store_manifest(data: bytes) -> None:
        key = manifest_key(sha256_digest(data))
        if key not in stored:
            store.put_bytes(key, data, if_absent=True)  # byte for byte, as it may be there already
            freshness.seen(key, store.age(key))
            stored[key] = data

    def change(current: Optional[bytes]) -> Optional[bytes]:
        old = None if current is None else tag_target_of(store, ref, current)
        content = _platform_tag_content(store, ref, old, image, platform, mode, store_manifest)
        old_content = None if old is None else old.image_hex or "@" + str(old.manifest)
        if content == old_content:
            return current
        check_tag_may_move(store, ref, content)
        rewrite = _index_rewriters(store, image.layers)
        rewrite.update({key: functools.partial(store.put_bytes, key, data) for key, data in stored.items()})
        must_exist = {key: len(data) for key, data in stored.items()}  # type: Dict[str, Optional[int]]
        must_exist.update({image_key(image_hex, "manifest.json"): None,
                           image_key(image_hex, "config.json"): image.config_size})
        freshness.secure(rewrite, must_exist)
        if old is not None:
            record_untagged(store, old.image_hex or digest_hex(str(old.manifest)), [ref])
        return content.encode()

    if mode == "single":
        point_tag(store, ref, TagTarget(image_hex))
        return None
    try:
        swap_versioned(store, tag_key(ref), change, "tag %s" % (ref,), sleep=sleep, write_same=True)
    except CannotSwap:  # a store without conditional writes still takes pushes of single images
        if mode == "multi" or _current_index(store, ref) is not None:
            raise
        point_tag(store, ref, TagTarget(image_hex))
    return _current_index(store, ref)


def remove_platform(store: Store, ref: ImageRef, platform: Platform, freshness: Freshness,
                    sleep: Callable[[float], None] = time.sleep) -> Optional[PushedManifest]:
    """Take one platform's image (exactly that platform, and the attestations about it) from a
    tag, by compare-and-swap; the tag goes when it was its last image.  Return the index the tag
    holds now (None: the tag is gone).  What the tag named before is recorded for gc."""
    made = {}  # type: Dict[str, bytes]

    def change(current: Optional[bytes]) -> Optional[bytes]:
        if current is None:
            raise NotFound("%s not found in %s" % (ref, store.url))
        old = tag_target_of(store, ref, current)
        content = _content_without(store, ref, old, platform, made, freshness)
        if content is not None:
            freshness.secure({key: functools.partial(store.put_bytes, key, data) for key, data in made.items()},
                             {manifest_key(content[1:]): None})
        record_untagged(store, old.image_hex or digest_hex(str(old.manifest)), [ref])
        return None if content is None else content.encode()

    if swap_versioned(store, tag_key(ref), change, "tag %s" % (ref,), sleep=sleep) is None:
        store.delete(tag_manifest_key(ref))
        return None
    return _current_index(store, ref)


def _content_without(store: Store, ref: ImageRef, old: TagTarget, platform: Platform, made: Dict[str, bytes],
                     freshness: Freshness) -> Optional[str]:
    """What a tag holds without the platform's image (None: nothing, the tag goes); NoMatchingPlatform
    if it has no image of exactly that platform.  A new index is stored (and noted in `made`)."""
    what = "%s in %s" % (ref, store.url)
    if old.image_hex is not None:
        config = read_json(store, image_key(old.image_hex, "config.json"))
        if platform_fits(platform, config_platform(config)) != 0:
            raise NoMatchingPlatform("%s has no image for %s to remove; it is one image, for %s"
                                     % (what, platform, config_platform(config)))
        return None
    index = read_pushed_manifest(store, str(old.manifest))
    if index is None or not index.is_index:
        raise NotAnImage("%s names %s, which is no multi-platform image" % (what, old.manifest))
    entries = without_platform(index.doc["manifests"], platform)
    if len(entries) == len(index.doc["manifests"]):
        raise NoMatchingPlatform("%s has no image for %s to remove; it has %s"
                                 % (what, platform, platform_list(index_images(index))))
    kept = {d["digest"] for d in entries}
    if not any(entry.digest in kept for entry in index_images(index)):
        return None  # only attestations, or nothing, would be left
    data = json_document(dict(index.doc, manifests=entries))
    key = manifest_key(sha256_digest(data))
    store.put_bytes(key, data, if_absent=True)
    freshness.seen(key, store.age(key))
    made[key] = data
    return MANIFEST_TAG + digest_hex(sha256_digest(data))


def _current_index(store: Store, ref: ImageRef) -> Optional[PushedManifest]:
    """The image index the tag names now, if it names one."""
    with contextlib.suppress(NotFound, FormatError):
        return tag_index(store, ref)
    return None


def _platform_tag_content(store: Store, ref: ImageRef, old: Optional[TagTarget], image: StoredImage,
                          platform: Platform, mode: str, store_manifest: Callable[[bytes], None]) -> str:
    """What a tag holds after a push of the image (PLATFORM_MODES) over what it held (old); the
    manifests that names are stored with store_manifest."""
    image_hex = digest_hex(image.image_id)
    index = None  # type: Optional[PushedManifest]
    if old is not None and old.manifest is not None:
        index = read_pushed_manifest(store, old.manifest)
        if index is not None and not index.is_index:
            index = None  # an artifact: an image push replaces it
    if mode == "single" or (mode == "auto" and index is None):
        return image_hex
    if not platform.os or not platform.architecture:
        raise FormatError("image %s names no os and architecture in its config: it cannot be one platform of "
                          "%s (push it with --single-platform)" % (image_hex[:12], ref))
    if index is not None and index_entry_image(store, index, platform) == image_hex:
        return "@" + index.digest  # its platform's image already: the index stays as it is
    child_type = DOCKER_MANIFEST if index is not None and index.media_type == DOCKER_MANIFEST_LIST else OCI_MANIFEST
    if index is not None:
        doc = dict(index.doc)
        entries = without_platform(index.doc["manifests"], platform)
    else:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX}
        entries = _other_platform_of(store, old, image_hex, platform, store_manifest)
    manifest = registry_manifest(image, child_type)
    store_manifest(manifest)
    doc["manifests"] = entries + [image_descriptor(manifest, child_type, platform)]
    data = json_document(doc)
    store_manifest(data)
    return MANIFEST_TAG + sha256_digest(data)[7:]


def _other_platform_of(store: Store, old: Optional[TagTarget], image_hex: str, platform: Platform,
                       store_manifest: Callable[[bytes], None]) -> List[Dict[str, Any]]:
    """For a tag that names one image (old) and becomes an index: that image's entry, if it is of
    another platform than the pushed one (and in dogestry's layout: the original's have no manifest)."""
    if old is None or old.image_hex is None or old.image_hex == image_hex:
        return []
    with contextlib.suppress(NotFound, FormatError):
        other = load_stored_image(store, old.image_hex)
        other_platform = config_platform(read_json(store, image_key(old.image_hex, "config.json")))
        if other.legacy or not other_platform.architecture or platform_fits(platform, other_platform) == 0:
            return []
        manifest = registry_manifest(other, OCI_MANIFEST)
        store_manifest(manifest)
        return [image_descriptor(manifest, OCI_MANIFEST, other_platform)]
    return []


class SharedResult:
    """What `make` returns, made at most once per `ttl` seconds and shared by every caller
    meanwhile: who comes while it is being made waits for it; a failure is shared too."""

    def __init__(self, make: Callable[[], Any], ttl: float, clock: Callable[[], float] = time.monotonic):
        self.make, self.ttl, self.clock = make, ttl, clock
        self._lock = threading.Lock()
        self._made_at = None  # type: Optional[float]  # when the last making began
        self._value, self._error = None, None  # type: Any, Optional[str]

    def get(self) -> Any:
        """The result made within the last `ttl` seconds (StoreError if making it failed)."""
        with self._lock:
            if self._made_at is None or self.clock() - self._made_at >= self.ttl:
                self._made_at = self.clock()
                try:
                    self._value, self._error = self.make(), None
                except DogestryError as e:
                    self._value, self._error = None, str(e)
            if self._error is not None:
                raise StoreError(self._error)
            return self._value


class Registry:
    """The server's store as an OCI registry: manifests made from stored images or kept as pushed.

    A manifest digest is looked up in an index of every stored image's manifest digests.  A
    digest the index lacks brings it up to date: one listing of images/, shared by concurrent
    lookups and made at most once per `listing_ttl` seconds, then one read of each image's
    manifest.json not read before (each image is read once: its manifests never change).  A
    digest found is served from the image's manifest.json as it is now, so an image deleted
    since (gc) is unknown again.  _catalog's listing is shared the same way.
    """

    def __init__(self, store: Store, presign: Optional[Callable[[str], str]] = None,
                 clock: Callable[[], float] = time.monotonic, listing_ttl: float = REGISTRY_LISTING_TTL,
                 gc_min_grace: float = GC_MIN_GRACE):
        self.store, self.presign, self.gc_min_grace = store, presign, gc_min_grace
        self._lock = threading.Lock()
        self._manifests = {}  # type: Dict[Tuple[str, str], Tuple[bytes, str]]  # (image hex, type) -> (bytes, digest)
        self._digests = {}    # type: Dict[str, Tuple[str, str]]               # digest -> (image hex, type)
        self._indexed = {}    # type: Dict[str, Tuple[str, ...]]               # image hex -> its digests
        self._missing = {}    # type: Dict[str, float]  # digest -> when no pushed manifest of it was found
        self._clock = clock
        self._index_update = SharedResult(self._update_index, listing_ttl, clock)
        self._catalog = SharedResult(self._list_repositories, listing_ttl, clock)

    def tags(self, name: str) -> List[str]:
        """Every tag of a repository, sorted (NAME_UNKNOWN if it has none)."""
        prefix = "repositories/%s/" % repository_name(name)
        tags = sorted(key[len(prefix):] for key in self.store.list(prefix) if "/" not in key[len(prefix):])
        if not tags:
            raise RegistryError(404, "NAME_UNKNOWN", "repository %s is not known" % name)
        return tags

    def repositories(self) -> List[str]:
        """Every repository with a tag, sorted (as listed within the last few seconds)."""
        return list(self._catalog.get())

    def _list_repositories(self) -> List[str]:
        return sorted({key[len("repositories/"):].rpartition("/")[0] for key in self.store.list("repositories/")} - {""})

    def manifest(self, name: str, reference: str, accept: str = "") -> Tuple[bytes, str, str]:
        """(bytes, media type, digest) of a repository's manifest for a client whose Accept header
        is `accept`.  By digest: the manifest of that digest, whatever the Accept header (no other
        bytes have that digest).  By tag: the manifest pushed through the registry, as pushed, if
        the client accepts its type; else the one made from the stored image, of a type it accepts;
        for an index the client does not accept, the manifest of its image for linux/amd64."""
        repository_name(name)
        if ":" in reference:
            check_digest(reference)
            with self._lock:
                made = reference in self._digests  # made from a stored image (the index in memory)
            pushed = None if made else self._pushed(reference)
            if pushed is not None:
                return pushed.data, pushed.media_type, pushed.digest
            return self._by_digest(name, reference)
        ref = self._tag(name, reference)
        try:
            target = read_tag_target(self.store, ref)
        except NotFound:
            self.tags(name)  # NAME_UNKNOWN when the repository has no tag at all
            raise RegistryError(404, "MANIFEST_UNKNOWN", "%s:%s is not known" % (name, reference))
        accepted = accepted_types(accept)
        pushed = self._pushed_for_tag(ref, target)
        if pushed is not None and pushed.is_index and not type_accepted(pushed.media_type, accepted):
            return self._platform_manifest(ref, pushed, accept)
        if pushed is not None and (target.image_hex is None or type_accepted(pushed.media_type, accepted)):
            return pushed.data, pushed.media_type, pushed.digest
        if target.image_hex is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "%s names %s, which is not stored" % (ref, target.manifest))
        media_type = manifest_type_for(accept)
        data, digest = self._manifest_of(target.image_hex, media_type)
        return data, media_type, digest

    def _platform_manifest(self, ref: ImageRef, index: PushedManifest, accept: str) -> Tuple[bytes, str, str]:
        """For a client that accepts no image index (as distribution answers one): the manifest of
        the index's linux/amd64 image, as pushed if the client accepts its type, else the one made
        from its image; MANIFEST_UNKNOWN naming the index's platforms if it has no such image."""
        entries = index_images(index)
        try:
            entry = choose_platform(entries, REGISTRY_DEFAULT_PLATFORM, str(ref))
        except NoMatchingPlatform:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "%s is a multi-platform image with no %s image, which is what "
                                "a client that accepts no image index (Accept: %s) is given; it has %s"
                                % (ref, REGISTRY_DEFAULT_PLATFORM, accept[:200], platform_list(entries)))
        child = read_pushed_manifest(self.store, entry.digest)
        if child is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "%s names %s, which is not stored" % (ref, entry.digest))
        if type_accepted(child.media_type, accepted_types(accept)):
            return child.data, child.media_type, child.digest
        media_type = manifest_type_for(accept)
        image_hex = digest_hex(child.blobs[0][0]) if child.blobs else ""
        if not image_hex or self.store.stat(image_key(image_hex, "manifest.json")) is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "the %s manifest of %s is of type %s, which this client does "
                                "not accept (Accept: %s)" % (REGISTRY_DEFAULT_PLATFORM, ref, child.media_type,
                                                             accept[:200]))
        data, digest = self._manifest_of(image_hex, media_type)
        return data, media_type, digest

    @staticmethod
    def _tag(name: str, reference: str) -> ImageRef:
        if not _TAG_RE.match(reference):
            raise RegistryError(400, "TAG_INVALID", "invalid tag %r" % reference[:100])
        return ImageRef(name, reference)

    def _pushed(self, digest: str) -> Optional[PushedManifest]:
        """The manifest of that digest pushed through the registry (one read; a digest found missing
        is not looked for again for REGISTRY_MISS_TTL seconds)."""
        if check_digest(digest) is None:
            return None
        with self._lock:
            since = self._missing.get(digest)
        if since is not None and self._clock() - since < REGISTRY_MISS_TTL:
            return None
        pushed = read_pushed_manifest(self.store, digest)
        if pushed is None:
            with self._lock:
                if len(self._missing) >= REGISTRY_MISSES:
                    self._missing.clear()
                self._missing[digest] = self._clock()
        return pushed

    def _pushed_for_tag(self, ref: ImageRef, target: TagTarget) -> Optional[PushedManifest]:
        """The manifest pushed through the registry that a tag names: the one it holds, or for an
        image, the one manifests/tags/ says it was pushed with, if that is still of the tag's image."""
        if target.manifest is not None:
            return read_pushed_manifest(self.store, target.manifest)
        return tag_pushed_manifest(self.store, ref, str(target.image_hex))  # else the image's own is served

    def known_manifest(self, digest: str) -> Optional[PushedManifest]:
        """The manifest of that digest: pushed through the registry, or made from a stored image
        (None if neither)."""
        with contextlib.suppress(NotFound, FormatError, IntegrityError):
            pushed = read_pushed_manifest(self.store, digest)
            if pushed is not None:
                return pushed
        try:
            data, media_type, _ = self._by_digest("", digest)
        except RegistryError:
            return None
        return parse_pushed_manifest(data, media_type)

    def put_manifest(self, name: str, reference: str, manifest: PushedManifest) -> None:
        """Store a manifest pushed under a tag or its digest (RegistryError if it cannot be)."""
        ref = None  # type: Optional[ImageRef]
        if ":" in reference:
            if check_digest(reference) is None or reference != manifest.digest:
                raise RegistryError(400, "DIGEST_INVALID", "the manifest's digest is %s, not %s"
                                    % (manifest.digest, reference[:100]))
        else:
            ref = self._tag(name, reference)
        store_pushed_manifest(self.store, manifest, ref, self.known_manifest,
                              Freshness(self.store, self.gc_min_grace, command="registry push"))
        with self._lock:
            self._missing.pop(manifest.digest, None)

    def delete_manifest(self, name: str, reference: str) -> List[ImageRef]:
        """Remove a tag, or every tag of the repository that names a manifest (by digest), as
        `dogestry rm` does: the manifests and blobs stay for gc.  The tags removed."""
        doomed = []  # type: List[Tuple[ImageRef, str]]
        if ":" not in reference:
            ref = self._tag(name, reference)
            try:
                target = read_tag_target(self.store, ref)
            except NotFound:
                raise RegistryError(404, "MANIFEST_UNKNOWN", "%s is not known" % str(ref))
            doomed.append((ref, target.image_hex or digest_hex(str(target.manifest))))
        else:
            check_digest(reference)
            for tag in self.tags(name):
                ref = ImageRef(name, tag)
                with contextlib.suppress(NotFound, FormatError):
                    target = read_tag_target(self.store, ref)
                    if reference in self._tag_digests(ref, target):
                        doomed.append((ref, target.image_hex or digest_hex(str(target.manifest))))
            if not doomed:
                raise RegistryError(404, "MANIFEST_UNKNOWN", "no tag of %s names %s" % (name, reference))
        markers = set(self.store.list(PROTECTED_PREFIX))
        protected = [str(ref) for ref, _ in doomed if protection_key(ref) in markers]
        if protected:
            raise RegistryError(403, "DENIED", "%s %s protected: 'dogestry unprotect' first"
                                % (", ".join(protected), "is" if len(protected) == 1 else "are"))
        remove_tags(self.store, doomed)
        return [ref for ref, _ in doomed]

    def _tag_digests(self, ref: ImageRef, target: TagTarget) -> Set[str]:
        """The manifest digests a pull of the tag may have been given."""
        pushed = self._pushed_for_tag(ref, target)
        digests = {pushed.digest} if pushed is not None else set()
        if target.image_hex is not None:
            with contextlib.suppress(DogestryError):
                digests.update(self._manifest_of(target.image_hex, kind)[1] for kind in (OCI_MANIFEST, DOCKER_MANIFEST))
        return digests

    def referrers(self, digest: str, artifact_type: Optional[str]) -> List[Dict[str, Any]]:
        """The descriptors of the manifests whose subject is digest (of that artifactType, if given)."""
        prefix = "manifests/referrers/%s/" % digest_hex(digest)
        found = []
        for key in self.store.list(prefix):
            with contextlib.suppress(NotFound, FormatError):
                found.append(read_json(self.store, key, REFERRER_SHAPE))
        return [d for d in found if artifact_type is None or d.get("artifactType") == artifact_type]

    def _manifest_of(self, image_hex: str, media_type: str) -> Tuple[bytes, str]:
        """The manifest of the image a tag names (cached: its manifests never change)."""
        with self._lock:
            cached = self._manifests.get((image_hex, media_type))
        if cached:
            return cached
        image = load_stored_image(self.store, image_hex)
        if image.legacy:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "image %s is in the original dogestry layout, which has no "
                                "layer digests to serve: run 'dogestry migrate STORE' to serve it"
                                % image_hex[:12])
        self._index(digest_hex(image.image_id), image)
        data = registry_manifest(image, media_type)
        with self._lock:
            entry = self._manifests[(image_hex, media_type)] = (data, sha256_digest(data))
        return entry

    def _by_digest(self, name: str, digest: str) -> Tuple[bytes, str, str]:
        """The manifest a digest names, of any stored image (the repository name is not checked)."""
        with self._lock:
            found = self._digests.get(digest)
        if found is None:
            self._index_update.get()
            with self._lock:
                found = self._digests.get(digest)
        if found is not None:
            image_hex, media_type = found
            image = self._read_image(image_hex)
            data = registry_manifest(image, media_type) if image else b""
            if image and sha256_digest(data) == digest:
                return data, media_type, digest
        raise RegistryError(404, "MANIFEST_UNKNOWN", "%s@%s is not known" % (name, digest))

    def _read_image(self, image_hex: str) -> Optional[StoredImage]:
        """An image as its manifest.json says now, indexed anew; None if it is gone (forgotten) or unusable."""
        try:
            doc = read_json(self.store, image_key(image_hex, "manifest.json"))
            image = stored_image_from(self.store, image_hex, doc)
        except NotFound:
            with self._lock:
                self._forget(image_hex)
            return None
        except FormatError:
            image = None
        self._index(image_hex, image)
        return image

    def _update_index(self) -> None:
        """List images/ once; read the manifests of images the index has not seen; forget those gone."""
        with self._lock:
            before = set(self._indexed)
        listed = {parts[1] for parts in (key.split("/") for key in self.store.list("images/"))
                  if len(parts) == 3 and parts[2] == "manifest.json" and _HEX64.match(parts[1])}
        with self._lock:
            for image_hex in before - listed:
                self._forget(image_hex)
            new = sorted(listed - set(self._indexed))
        if new:
            with thread_pool(min(REGISTRY_INDEX_READERS, len(new)), "dogestry-index") as pool:
                list(pool.map(self._read_image, new))

    def _index(self, image_hex: str, image: Optional[StoredImage]) -> None:
        """Record the digests of an image's manifests (none for an unusable image: it is not read again)."""
        digests = {} if image is None else {sha256_digest(registry_manifest(image, kind)): kind
                                            for kind in (OCI_MANIFEST, DOCKER_MANIFEST)}
        with self._lock:
            if self._indexed.get(image_hex) == tuple(digests):
                return
            self._forget(image_hex)
            for digest, kind in digests.items():
                self._digests[digest] = (image_hex, kind)
            self._indexed[image_hex] = tuple(digests)

    def _forget(self, image_hex: str) -> None:
        """Drop what is known of an image (the caller holds the lock)."""
        for digest in self._indexed.pop(image_hex, ()):
            self._digests.pop(digest, None)
        for kind in (OCI_MANIFEST, DOCKER_MANIFEST):
            self._manifests.pop((image_hex, kind), None)

    def blob(self, digest: str) -> Tuple[str, int]:
        """(store key, size) of a blob: a stored layer, or an image's config."""
        if check_digest(digest) is None:
            raise RegistryError(404, "BLOB_UNKNOWN", "only sha256 blobs are stored (%s)" % digest[:100])
        hexpart = digest_hex(digest)
        for key in (blob_key(digest), image_key(hexpart, "config.json")):
            size = self.store.stat(key)
            if size is not None:
                return key, size
        raise RegistryError(404, "BLOB_UNKNOWN", "blob %s is not known" % digest)

    def served_blob(self, digest: str) -> Tuple[str, int, Optional[LayerRecord]]:
        """What GET and HEAD serve for a blob digest: (key, size, None) of a stored blob (blob()),
        else (its recipe's key, tar size, record) of a chunked layer whose uncompressed tar that
        digest names (its diffID, as manifests made from images name it): assembled from its chunks."""
        try:
            return self.blob(digest) + (None,)
        except RegistryError as e:
            record = chunked_layer(self.store, digest) if e.status == 404 and check_digest(digest) else None
            if record is None:
                raise
            return blob_key(record.digest), record.tar_size, record


def registry_error_body(code: str, message: str) -> bytes:
    """The spec's error document."""
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode() + b"\n"


def parse_range(header: str, size: int) -> Optional[Tuple[int, int]]:
    """(first, last) byte of a single `bytes=` range of a blob of `size` bytes (None: the whole blob).

    RFC 9110 section 14: a range the blob cannot satisfy is a 416.
    """
    m = re.match(r"^bytes=([0-9]*)-([0-9]*)$", header.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None  # not a single byte range: ignored, as the RFC allows
    if not m.group(1):  # the last N bytes
        n = decimal_number(m.group(2))
        if n == 0:
            raise RegistryError(416, "RANGE_INVALID", "an empty suffix range")
        return max(0, size - n), size - 1
    first = decimal_number(m.group(1))
    last = min(decimal_number(m.group(2)), size - 1) if m.group(2) else size - 1
    if first >= size or last < first:
        raise RegistryError(416, "RANGE_INVALID", "bytes %s are outside the blob's %d" % (header[6:40], size))
    return first, last


# --- who may pull, push and delete: -htpasswd ---
#
# One `USER:HASH[:RIGHTS[:NAMES]]` a line; HASH is pbkdf2_sha256$ITERATIONS$SALT$HASH (Django's
# format: the salt as text, the hash base64), which hashlib checks, or `*`: a user who logs in
# only with a client certificate (-tlsverify, its subject CN).  RIGHTS: pull (every user's),
# push, delete; NAMES: the repository name prefixes push and delete are limited to.
# `dogestry passwd USER [--push] [--delete] [--names P,...]` writes a line.

PBKDF2_ITERATIONS = 600000


def password_hash(password: str, salt: Optional[str] = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """pbkdf2_sha256$ITERATIONS$SALT$HASH for a password (a random salt unless given)."""
    salt = salt or base64.b64encode(os.urandom(12)).decode().rstrip("=").replace("+", ".").replace("/", "_")
    key = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode(), iterations)
    return "pbkdf2_sha256$%d$%s$%s" % (iterations, salt, base64.b64encode(key).decode())


def password_matches(password: str, stored: str) -> bool:
    """Does a password match a pbkdf2_sha256 hash (in constant time)?"""
    import hmac  # lazy (start-up time): only signatures and password checks need it
    iterations = hash_iterations(stored)
    if iterations is None:
        return False
    return hmac.compare_digest(password_hash(password, stored.split("$")[2], iterations), stored)


def hash_iterations(stored: str) -> Optional[int]:
    """The iteration count of a pbkdf2_sha256 hash (None unless it is 1 to 10**7)."""
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != "pbkdf2_sha256" or not _DECIMAL.match(parts[1]) or len(parts[1]) > 8:
        return None
    return int(parts[1]) if 1 <= int(parts[1]) <= 10 ** 7 else None


AUTH_FAILURES = 5          # wrong passwords a client address may try in a row before it must wait
AUTH_FAILURE_REFILL = 2.0  # seconds after which it may try one more
AUTH_CLIENTS = 4096        # client addresses whose failures are remembered (the least recent are forgotten)


class FailureLimiter:
    """A token bucket of password checks per client address: AUTH_FAILURES at once, then one more
    every AUTH_FAILURE_REFILL seconds; a check that succeeds costs nothing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, burst: int = AUTH_FAILURES,
                 refill: float = AUTH_FAILURE_REFILL, most: int = AUTH_CLIENTS):
        self.clock, self.burst, self.refill, self.most = clock, burst, refill, most
        self._lock = threading.Lock()
        self._buckets = collections.OrderedDict()  # type: collections.OrderedDict[str, Tuple[float, float]]
        # client -> (tokens, when counted), the least recently used first

    def reserve(self, client: str) -> float:
        """Take a check for a client: 0.0, or (none left) the seconds until it may check again."""
        with self._lock:
            now = self.clock()
            tokens, since = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - since) / self.refill)
            self._buckets[client] = (tokens - 1 if tokens >= 1 else tokens, now)
            while len(self._buckets) > self.most:
                self._buckets.popitem(last=False)
            return 0.0 if tokens >= 1 else (1 - tokens) * self.refill

    def give_back(self, client: str) -> None:
        """A check succeeded: return what it took."""
        with self._lock:
            tokens, since = self._buckets.get(client, (float(self.burst), 0.0))
            if tokens + 1 >= self.burst:
                self._buckets.pop(client, None)  # a full bucket need not be remembered
            else:
                self._buckets[client] = (tokens + 1, since)


REGISTRY_RIGHTS = ("pull", "push", "delete")
CERTIFICATE_ONLY = "*"  # the HASH of a user who logs in only with a client certificate


class UserRights(NamedTuple):
    """What a user of -htpasswd may do: pull always; push and delete if granted, within `names`."""

    rights: FrozenSet[str] = frozenset(("pull",))
    names: Tuple[str, ...] = ()  # repository name prefixes limiting push and delete (none: every name)

    def allows(self, right: str, name: str) -> bool:
        """May this user `right` (pull, push, delete) repository `name`?"""
        if right == "pull":
            return True
        return right in self.rights and (not self.names or any(name_within(name, p) for p in self.names))


def name_within(name: str, prefix: str) -> bool:
    """Is a repository name under a prefix: `team/` covers team/app; `app` covers app and app/…"""
    return name.startswith(prefix) if prefix.endswith("/") else name == prefix or name.startswith(prefix + "/")


def parse_user_rights(rights: str, names: str) -> UserRights:
    """The RIGHTS and NAMES fields of an -htpasswd line (ValueError: what is wrong with them)."""
    granted = {r.strip() for r in rights.split(",") if r.strip()} | {"pull"}
    unknown = sorted(granted - set(REGISTRY_RIGHTS))
    if unknown:
        raise ValueError("unknown right %r (rights are %s)" % (unknown[0][:40], ", ".join(REGISTRY_RIGHTS)))
    prefixes = tuple(p.strip() for p in names.split(",") if p.strip())
    for prefix in prefixes:
        if len(prefix) > 255 or not _REPO_NAME.match(prefix[:-1] if prefix.endswith("/") else prefix):
            raise ValueError("invalid repository name prefix %r (like team/ or team/app)" % prefix[:100])
    return UserRights(frozenset(granted), prefixes)


class Htpasswd:
    """The users of -htpasswd FILE and their rights; a password once checked is remembered (PBKDF2
    is slow on purpose).

    An unknown user (or a certificate-only one, HASH `*`) costs the same PBKDF2 work as a known
    one (checked against a hash of the iterations most users have), so answer times do not tell
    which users exist; a client address may check only so many passwords in a row (FailureLimiter).
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic,
                 matches: Callable[[str, str], bool] = password_matches):
        self.path, self.users, self.matches = path, {}, matches  # type: str, Dict[str, str], Callable[[str, str], bool]
        self.rights = {}  # type: Dict[str, UserRights]
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError("cannot read -htpasswd %s: %s" % (path, _os_reason(e) if isinstance(e, OSError) else e))
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.strip().split(":")
            user, stored = fields[0], fields[1] if len(fields) > 1 else ""
            if len(fields) > 4 or not user or not (stored == CERTIFICATE_ONLY or (
                    stored.startswith("pbkdf2_sha256$") and stored.count("$") == 3)):
                raise UsageError("-htpasswd %s line %d: expected USER:HASH[:RIGHTS[:NAMES]], HASH "
                                 "pbkdf2_sha256$ITERATIONS$SALT$HASH or * (dogestry passwd USER writes one)"
                                 % (path, number))
            try:
                self.rights[user] = parse_user_rights(*(fields[2:] + ["", ""])[:2])
            except ValueError as e:
                raise UsageError("-htpasswd %s line %d: %s" % (path, number, e))
            self.users[user] = stored
        if not self.users:
            raise UsageError("-htpasswd %s lists no user" % path)
        self._known = set()  # type: Set[str]
        self._lock = threading.Lock()
        self._limiter = FailureLimiter(clock)
        counts = collections.Counter(hash_iterations(stored) for stored in self.users.values())
        iterations = max(((n, i) for i, n in counts.items() if i is not None), default=(0, PBKDF2_ITERATIONS))[1]
        self._nobody = "pbkdf2_sha256$%d$%s$%s" % (iterations, binascii.hexlify(os.urandom(9)).decode(),
                                                   base64.b64encode(os.urandom(32)).decode())  # matches no password

    def allows(self, authorization: str, client: str = "") -> bool:
        """Is `Authorization: Basic …` one of the users with the right password?"""
        return self.login(authorization, client) is not None

    def login(self, authorization: str, client: str = "") -> Optional[str]:
        """The user `Authorization: Basic …` names, if the password is theirs (else None).

        RegistryError 429 (TOOMANYREQUESTS), without checking, when `client` (an address) has
        run out of checks; a password remembered as right is let through even then.
        """
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            return None
        stored = self.users.get(user)
        if stored == CERTIFICATE_ONLY:
            stored = None  # no password is theirs: checked as an unknown user is
        remembered = hashlib.sha256(("%s\0%s\0%s" % (user, password, stored or self._nobody)).encode()).hexdigest()
        with self._lock:
            if stored is not None and remembered in self._known:
                return user
        wait = self._limiter.reserve(client)
        if wait:
            raise RegistryError(429, "TOOMANYREQUESTS", "too many failed logins from %s: try again in %d s"
                                % (client, int(wait) + 1), {"Retry-After": str(int(wait) + 1)})
        if not self.matches(password, stored or self._nobody) or stored is None:
            return None
        self._limiter.give_back(client)
        with self._lock:
            self._known.add(remembered)
        return user


class Caller(NamedTuple):
    """Who sent a registry request: a user of -htpasswd who logged in, the holder of a client
    certificate (-tlsverify: the user named by its subject CN), or nobody."""

    user: str = ""  # the user name; "" for anonymous (and for a certificate without one CN)
    how: str = ""   # "password", "certificate", or "" (anonymous)


def registry_access(right: str, name: str, caller: Caller, htpasswd: Optional[Htpasswd],
                    anonymous_push: bool = False) -> None:
    """Go on only if `caller` may `right` (pull, push, delete) repository `name`: RegistryError 401
    (UNAUTHORIZED: who is it?) or 403 (DENIED: not this caller) otherwise.

    Pulls: anyone without -htpasswd, else every user and certificate holder.  Push and delete:
    users (a certificate's CN looked up in -htpasswd) with that right, for names under their
    prefixes; -anonymous-push lets anyone push (never delete).
    """
    if right == "pull":
        if htpasswd is None or caller.how:
            return
        raise RegistryError(401, "UNAUTHORIZED", "authentication required")
    rights = htpasswd.rights.get(caller.user) if htpasswd is not None and caller.how else None
    if rights is not None and rights.allows(right, name):
        return
    if right == "push" and anonymous_push:
        return
    if not caller.how:
        raise RegistryError(401, "UNAUTHORIZED", "authentication required to %s: %s" % (right, (
            "log in as a user allowed to %s" % right if htpasswd is not None else
            "this server has no users (-htpasswd)%s" % (" or -anonymous-push" if right == "push" else ""))))
    who = ("user %s" if caller.how == "password" else "the certificate of %s") % (printable(caller.user)[:100] or "?")
    if rights is None:
        raise RegistryError(403, "DENIED", "%s may pull only: %s" % (who, "it has no entry in this server's -htpasswd"
                                                                     if htpasswd is not None else
                                                                     "this server has no users (-htpasswd)"))
    if right not in rights.rights:
        raise RegistryError(403, "DENIED", "%s may not %s (rights: %s)" % (
            who, right, ", ".join(r for r in REGISTRY_RIGHTS if r in rights.rights)))
    raise RegistryError(403, "DENIED", "%s may %s only under %s, not %s" % (who, right, ", ".join(rights.names), name))


# === 17. The registry API: blob uploads ===
#
# The blobs clients push through `dogestry -server STORE` are stored here; the HTTP side
# (routes, headers, who may push) is the server's (section 19).  OCI Distribution Spec v1.1:
# "Push" (blobs).

# --- blob uploads ---
#
# A blob upload session is uploads/<32 hex>/ in the store:
#   state.json   the repository name and the user it belongs to, the bytes received so far
#                and (S3) where they are; written again by every request that adds bytes
#   data         the bytes: a file appended to (a directory store); on S3 the key of one
#                multipart upload, whose parts (8 MiB) go up while the bytes arrive
#   tail         S3: the last bytes, fewer than S3's smallest part (5 MiB): the next request
#                sends them again in front of its own, and the finish adds them as the last
#                part with UploadPartCopy (server-side)
# Finishing checks the bytes against the digest, with the sha256 the process that received
# them kept, or (a session some of whose requests reached another process, or one that
# outlived a restart) by reading them back; only then is the blob made: a rename (a
# directory store), or completing the multipart upload into `data` and a server-side copy to
# blobs/sha256/<hex> (S3), after which the session's keys go.  A blob whose digest is known
# when its bytes start (a monolithic upload) goes straight to its key: a single PUT, whose
# payload hash S3 checks, or a multipart upload completed only if the bytes hashed on the
# way are the blob.  Nothing is a blob before its bytes matched its digest.  gc deletes
# sessions nobody added to for its grace period, and aborts their multipart uploads.

UPLOADS_PREFIX = "uploads/"
UPLOAD_SESSIONS = 64        # sessions (and monolithic uploads) in progress at once in one server process
UPLOAD_IDLE = 120.0         # seconds after which a session with no request stops counting among them
UPLOAD_PART = S3_MIN_PART   # the parts of an upload on S3
UPLOAD_MAX = S3_MAX_PARTS * UPLOAD_PART  # the largest blob taken: S3's 10,000 parts
S3_SMALLEST_PART = 5 << 20  # S3's minimum for every part but the last
UPLOAD_PARTS_AHEAD = 2      # parts of one upload on their way to S3 at once (each spooled to a temp file)
UPLOAD_COPY_WORKERS = 8     # UploadPartCopy requests at once, for a blob above S3_COPY_MAX
UPLOAD_PIECE = 256 << 10    # the bytes an upload holds in memory at once: read from its client, sent with a part
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
UPLOAD_STATE_SHAPE = {"name": str, "user": str, "size": SIZE, "multipart": str, "tail": SIZE,
                      "parts": [{"number": SIZE, "etag": str, "size": SIZE}]}


def upload_key(upload_id: str, leaf: str) -> str:
    """A key of upload session upload_id (32 hex, checked)."""
    if not _UPLOAD_ID.match(upload_id):
        raise FormatError("not an upload session id: %r" % upload_id[:80])
    return "%s%s/%s" % (UPLOADS_PREFIX, upload_id, leaf)


def upload_range(size: int) -> str:
    """The Range header of a session holding `size` bytes (0-0 when it holds none, as
    docker/distribution answers)."""
    return "0-%d" % max(0, size - 1)


def upload_unknown(upload_id: str) -> RegistryError:
    return RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "blob upload %s is not known here (finished, cancelled, "
                         "collected by gc, or another repository's or user's): start it again"
                         % printable(upload_id[:40]))


def too_large() -> RegistryError:
    return RegistryError(413, "SIZE_INVALID", "a blob may be at most %s here (S3's %d parts of %s)"
                         % (human_size(UPLOAD_MAX), S3_MAX_PARTS, human_size(UPLOAD_PART)))


def digest_mismatch(digest_hex: str, actual_hex: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", "the bytes uploaded are not blob sha256:%s (their sha256 is %s); "
                         "nothing was stored" % (digest_hex, actual_hex))


class UploadState(NamedTuple):
    """An upload session as its state.json has it."""

    name: str                # the repository it was started for
    user: str                # who started it ("" when anonymous)
    size: int = 0            # bytes received
    multipart: str = ""      # S3: the multipart upload of `data` ("" before its first part)
    parts: Tuple[Tuple[int, str, int], ...] = ()  # S3: (number, ETag, size) of its parts, numbered from 1
    tail: int = 0            # S3: the last bytes, in `tail` (fewer than S3_SMALLEST_PART)

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "user": self.user, "size": self.size, "multipart": self.multipart,
                "parts": [{"number": n, "etag": etag, "size": size} for n, etag, size in self.parts],
                "tail": self.tail}

    @classmethod
    def from_json(cls, doc: Any, what: str) -> "UploadState":
        check_shape(doc, UPLOAD_STATE_SHAPE, what)
        parts = tuple((p["number"], p["etag"], p["size"]) for p in doc["parts"])
        if (parts or doc["tail"]) and sum(size for _, _, size in parts) + doc["tail"] != doc["size"]:
            raise FormatError("%s: its parts and tail are not its size" % what)  # (S3; a directory has neither)
        return cls(doc["name"], doc["user"], doc["size"], doc["multipart"], parts, doc["tail"])


class UploadFile(OutputFile):
    """A file an upload writes (a part spooled, a session's data, a blob on its way into a
    directory store), counted (and, if `hashed`, hashed: sha256()) as it is written; an OSError
    (a full disk) becomes a StoreError.  keep: the bytes of an existing file it goes on from
    (the rest of it, written by a request that failed, is cut off)."""

    def __init__(self, path: str, keep: Optional[int] = None, write_through: bool = False, hashed: bool = False):
        self.keep, self.size = keep, 0
        self.sha = hashlib.sha256() if hashed else None
        super().__init__(path, write_through)

    def _open(self, path: str) -> IO[bytes]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if self.keep is not None else os.O_TRUNC), 0o644)
        try:
            if self.keep is not None:
                if os.fstat(fd).st_size < self.keep:
                    raise StoreError("%s is shorter than the %d bytes its upload counts" % (path, self.keep))
                os.ftruncate(fd, self.keep)
                os.lseek(fd, self.keep, os.SEEK_SET)
            return os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise

    def _error(self, e: OSError) -> StoreError:
        return StoreError("cannot write %s: %s" % (self.path, _os_reason(e)))

    def write(self, data: bytes) -> int:
        n = super().write(data)
        if self.sha is not None:
            self.sha.update(data)
        self.size += n
        return n

    def sha256(self) -> str:
        """The hex sha256 of what was written (a hashed file)."""
        assert self.sha is not None
        return self.sha.hexdigest()

    def sync(self) -> None:
        """Make what was written durable (fsync)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise self._error(e)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


def spool_path(spool: Optional[str]) -> str:
    """A new, empty temp file in spool (None: the system's temp dir) for a part on its way to S3."""
    import tempfile  # lazy (start-up time): only writes and work directories need it
    try:
        fd, path = tempfile.mkstemp(prefix=".tmp-dogestry-part-", dir=spool)
    except OSError as e:
        raise StoreError("cannot create a temp file in %s: %s" % (spool or tempfile.gettempdir(), _os_reason(e)))
    os.close(fd)
    return path


def remove_file(path: str) -> None:
    """Remove a temp file (gone already: fine)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


class PartWriter:
    """Bytes going up to S3 as the parts of one multipart upload while they arrive.

    Each part is spooled to a small temp file (its sha256, the signed payload hash, computed on
    the way) and uploaded by one of UPLOAD_PARTS_AHEAD threads while the next part fills; when
    they are all busy the writer waits (and with it the client).  The parts go to the multipart
    upload upload_id, or (none yet) to one create() makes when the first part goes up.
    """

    def __init__(self, client: S3Client, key: str, upload_id: str, create: Callable[[], str], first: int,
                 spool: Optional[str]):
        import queue  # lazy (start-up time): only work in threads needs it
        self.client, self.key, self.number, self.spool = client, key, first, spool
        self.upload_id, self.create, self.made = upload_id, create, False
        self.parts = []  # type: List[Tuple[int, str, int]]
        self.pending = None  # type: Optional[UploadFile]  # the part being spooled
        self._queue = queue.Queue(maxsize=1)  # type: queue.Queue
        self._workers = []  # type: List[threading.Thread]
        self._error = None  # type: Optional[BaseException]
        self._lock = threading.Lock()

    @property
    def spooled(self) -> int:
        """Bytes spooled, not yet sent as a part."""
        return self.pending.size if self.pending else 0

    def write(self, data: bytes) -> int:
        count = len(data)
        while data:
            if self.pending is None:
                self.pending = UploadFile(spool_path(self.spool), hashed=True)
            room = UPLOAD_PART - self.pending.size
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            self.pending.write(piece)
            if self.pending.size == UPLOAD_PART:
                self.send()
        return count

    def send(self) -> None:
        """Upload what is spooled as the next part (of any size)."""
        part, self.pending = self.pending, None
        if part is None:
            return
        part.close()
        try:
            self._raise_error()
            if self.number > S3_MAX_PARTS:
                raise too_large()
            if not self.upload_id:
                self.upload_id, self.made = self.create(), True
            upload_id = self.upload_id
            if len(self._workers) < UPLOAD_PARTS_AHEAD:
                self._workers.append(start_thread(self._work, (upload_id,), "dogestry-part"))
            self._queue.put((self.number, part.path, part.size, part.sha256()))
        except BaseException:
            remove_file(part.path)
            raise
        self.number += 1

    def take(self) -> Optional[UploadFile]:
        """What is spooled, handed over (closed; the caller removes the file), if anything."""
        part, self.pending = self.pending, None
        if part is not None:
            part.close()
        return part

    def finish(self) -> Tuple[Tuple[int, str, int], ...]:
        """Wait for every part to be uploaded: (number, ETag, size) of each, in order (or the
        first error a part met)."""
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join()
        self._workers = []
        self._raise_error()
        return tuple(sorted(self.parts))

    def give_up(self) -> None:
        """After a failure: stop (close()), and abort the multipart upload this writer made, if it did."""
        self.close()
        if self.made:
            self.client._abort_upload(self.key, self.upload_id)

    def close(self) -> None:
        """Give up (after a failure): parts not yet sent are dropped, what is spooled removed."""
        with self._lock:
            self._error = self._error or Interrupted("the upload was given up")
        for _ in self._workers:
            self._queue.put(None)
        self._workers = []
        part = self.take()
        if part is not None:
            remove_file(part.path)

    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _work(self, upload_id: str) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            number, path, size, sha = item
            try:
                with self._lock:
                    failed = self._error is not None
                if not failed:
                    etag = self.client._upload_part(self.key, upload_id, path, (number, 0, size), sha, lambda n: None,
                                                    UPLOAD_PIECE)
                    with self._lock:
                        self.parts.append((number, etag, size))
            except BaseException as e:  # raised in the writer's thread
                with self._lock:
                    self._error = self._error or e
            finally:
                remove_file(path)


def stored_sha256(store: Store, key: str, size: int) -> str:
    """The hex sha256 of a stored object of `size` bytes, read back (StoreError if it is another size)."""
    sha, count = hashlib.sha256(), 0
    with contextlib.closing(store.open(key, size)) as f:
        for data in iter(lambda: f.read(CHUNK), b""):
            sha.update(data)
            count += len(data)
    if count != size:
        raise StoreError("%s: %s is %d bytes, not the %d its upload counts" % (store.url, key, count, size))
    return sha.hexdigest()


class UploadBackend(Protocol):
    """What a kind of store does for uploads (S3Uploads, LocalUploads)."""

    def write(self, upload_id: str, state: UploadState, body: Iterable[bytes]) -> UploadState: ...

    def complete(self, upload_id: str, state: UploadState, digest_hex: str, sha_hex: Optional[str]) -> None: ...

    def discard(self, upload_id: str, state: UploadState, completed: bool = False) -> None: ...

    def put_blob(self, digest_hex: str, body: Iterable[bytes], sha: Any) -> int: ...


class S3Uploads:
    """Upload sessions and monolithic uploads in an S3 store (see above)."""

    def __init__(self, store: S3Store, spool: Optional[str] = None):
        self.store, self.client, self.spool = store, store.client, spool

    def _key(self, upload_id: str, leaf: str) -> str:
        return self.store._key(upload_key(upload_id, leaf))

    def _source(self, key: str) -> str:
        """key as the x-amz-copy-source of a copy."""
        return uri_encode("/%s/%s" % (self.client.bucket, key), safe="/")

    def _create(self, key: str) -> str:
        """A multipart upload of key; any more of them a retried request made are aborted."""
        since = self.client.now() - UPLOAD_CLOCK_MARGIN
        upload_id, retried = self.client._create_upload(key)
        if retried:
            self.client.abort_uploads(key, since=since, keep=upload_id)
        return upload_id

    def write(self, upload_id: str, state: UploadState, body: Iterable[bytes]) -> UploadState:
        """Add the body's bytes to a session (after its tail): its new state, not yet saved."""
        pieces = iter(body)
        first = next(pieces, b"")
        if not first:
            return state
        key = self._key(upload_id, "data")
        writer = PartWriter(self.client, key, state.multipart, functools.partial(self._create, key),
                            len(state.parts) + 1, self.spool)
        tail = None  # type: Optional[UploadFile]
        try:
            if state.tail:
                with contextlib.closing(self.store.open(upload_key(upload_id, "tail"), state.tail)) as f:
                    if copy_stream(f, writer, state.tail) != state.tail:
                        raise StoreError("%s: the tail of upload %s came back short" % (self.store.url, upload_id))
            added = writer.write(first)
            for data in pieces:
                added += writer.write(data)
            if writer.spooled >= S3_SMALLEST_PART:
                writer.send()
            tail = writer.take()
            parts = writer.finish()
            if tail is not None:
                self._put_file(upload_key(upload_id, "tail"), tail)
        except BaseException:
            writer.give_up()
            raise
        finally:
            if tail is not None:
                remove_file(tail.path)
        return state._replace(size=state.size + added, multipart=writer.upload_id, parts=state.parts + parts,
                              tail=tail.size if tail is not None else 0)

    def _put_file(self, key: str, spooled: UploadFile, sha256_hex: Optional[str] = None) -> None:
        """PUT a spooled file as key (its payload hash: the file's, or the one it must have)."""
        self.client.put(self.store._key(key), lambda: FileRange(spooled.path, 0, spooled.size, None, self.client.cancelled,
                                                                UPLOAD_PIECE),
                        spooled.size, sha256_hex or spooled.sha256())

    def complete(self, upload_id: str, state: UploadState, digest_hex: str, sha_hex: Optional[str]) -> None:
        """Make blob digest_hex of a session's bytes if they are that blob (DIGEST_INVALID if not).
        sha_hex: their sha256, if this process kept it (else they are read back)."""
        if sha_hex is not None and sha_hex != digest_hex:
            raise digest_mismatch(digest_hex, sha_hex)
        source = upload_key(upload_id, "tail")  # a session of fewer bytes than one part: all of it
        if state.multipart:
            source = upload_key(upload_id, "data")
            parts = [(number, etag) for number, etag, _ in state.parts]
            if state.tail:
                number = len(parts) + 1
                parts.append((number, self.client.copy_part(self.store._key(source), state.multipart, number,
                                                            self._source(self._key(upload_id, "tail")))))
            self.client._complete_upload(self.store._key(source), state.multipart, parts)
        if sha_hex is None:
            sha_hex = stored_sha256(self.store, source, state.size)
            if sha_hex != digest_hex:
                raise digest_mismatch(digest_hex, sha_hex)
        self.client.copy_object(self.client.bucket, self.store._key(source), self.store._key(blob_key("sha256:" + digest_hex)),
                                state.size, workers=UPLOAD_COPY_WORKERS)

    def discard(self, upload_id: str, state: UploadState, completed: bool = False) -> None:
        """Remove a session's keys, and abort its multipart upload unless it was completed."""
        if state.multipart and not completed:
            self.client._abort_upload(self._key(upload_id, "data"), state.multipart)
        self.store.delete_many([upload_key(upload_id, leaf) for leaf in ("data", "tail", "state.json")])

    def put_blob(self, digest_hex: str, body: Iterable[bytes], sha: Any) -> int:
        """Store the body as blob digest_hex, straight to its key, if it is that blob (sha: the
        hash the body's bytes go through on their way here); its size."""
        key = self.store._key(blob_key("sha256:" + digest_hex))
        writer = PartWriter(self.client, key, "", functools.partial(self._create, key), 1, self.spool)
        whole = None  # type: Optional[UploadFile]
        try:
            size = sum(writer.write(data) for data in body)
            if writer.made:  # more than one part: completed only if the bytes hashed on the way are the blob
                if writer.spooled:
                    writer.send()
                parts = writer.finish()
                if sha.hexdigest() != digest_hex:
                    raise digest_mismatch(digest_hex, sha.hexdigest())
                self.client._complete_upload(key, writer.upload_id, [(number, etag) for number, etag, _ in parts])
                return size
            whole = writer.take()
            if sha.hexdigest() != digest_hex:
                raise digest_mismatch(digest_hex, sha.hexdigest())
            if whole is None:
                self.store.put_bytes(blob_key("sha256:" + digest_hex), b"")
                return 0
            try:  # one PUT whose payload hash S3 checks against the digest
                self._put_file(blob_key("sha256:" + digest_hex), whole, digest_hex)
            except S3Error as e:
                if e.code == "XAmzContentSHA256Mismatch":
                    raise digest_mismatch(digest_hex, "another (S3 says)")
                raise
            return size
        except BaseException:
            writer.give_up()
            raise
        finally:
            if whole is not None:
                remove_file(whole.path)


class LocalUploads:
    """Upload sessions and monolithic uploads in a directory store: files, synced and renamed."""

    def __init__(self, store: LocalStore):
        self.store = store

    def write(self, upload_id: str, state: UploadState, body: Iterable[bytes]) -> UploadState:
        """Add the body's bytes to a session's data file: its new state, not yet saved."""
        path = self.store.path(upload_key(upload_id, "data"))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise StoreError("%s: cannot write %s: %s" % (self.store.url, path, _os_reason(e)))
        data_file = UploadFile(path, keep=state.size, write_through=True)
        try:
            for data in body:
                data_file.write(data)
            data_file.sync()
        except BaseException:  # none of this request's bytes stay
            data_file.close()
            if state.size:
                with contextlib.suppress(DogestryError):
                    UploadFile(path, keep=state.size).close()
            else:
                remove_file(path)
            raise
        finally:
            data_file.close()
        return state._replace(size=state.size + data_file.size)

    def complete(self, upload_id: str, state: UploadState, digest_hex: str, sha_hex: Optional[str]) -> None:
        """Make blob digest_hex of a session's bytes if they are that blob (DIGEST_INVALID if not):
        the data file, cut to the session's size, synced and renamed."""
        key = upload_key(upload_id, "data")
        UploadFile(self.store.path(key), keep=state.size).close()  # what failed requests added goes
        if sha_hex is None:
            sha_hex = stored_sha256(self.store, key, state.size)
        if sha_hex != digest_hex:
            raise digest_mismatch(digest_hex, sha_hex)
        if not self.store._move_into_place(blob_key("sha256:" + digest_hex), self.store.path(key)):
            raise StoreError("%s: cannot rename %s into place" % (self.store.url, key))

    def discard(self, upload_id: str, state: UploadState, completed: bool = False) -> None:
        """Remove a session's files."""
        for leaf in ("data", "state.json"):
            self.store.delete(upload_key(upload_id, leaf))

    def put_blob(self, digest_hex: str, body: Iterable[bytes], sha: Any) -> int:
        """Store the body as blob digest_hex if it is that blob (sha: the hash the body's bytes go
        through on their way here): a temp file beside it, synced and renamed; its size."""
        import tempfile  # lazy (start-up time): only writes and work directories need it
        target = self.store.path(blob_key("sha256:" + digest_hex))
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(target))
            os.close(fd)
        except OSError as e:
            raise StoreError("%s: cannot write %s: %s" % (self.store.url, target, _os_reason(e)))
        blob = UploadFile(path, write_through=True)
        try:
            for data in body:
                blob.write(data)
            blob.sync()
            blob.close()
            if sha.hexdigest() != digest_hex:
                raise digest_mismatch(digest_hex, sha.hexdigest())
            try:
                os.chmod(path, 0o644)
                os.replace(path, target)
            except OSError as e:
                raise StoreError("%s: cannot write %s: %s" % (self.store.url, target, _os_reason(e)))
        finally:
            blob.close()
            remove_file(path)
        return blob.size


class UploadSession:
    """A session this process serves: its state as last seen, the sha256 of its bytes (None when
    some of them reached another process, or the one before a restart), one request at a time."""

    def __init__(self, state: Optional[UploadState], sha: Any, now: float):
        self.state, self.sha, self.used = state, sha, now
        self.lock = threading.Lock()


class BlobUploads:
    """The blob uploads of one store: sessions (at most `most` in progress in this process at a
    time, with monolithic uploads) and monolithic uploads.  Errors are the registry API's."""

    def __init__(self, store: Store, refresh: float = GC_MIN_GRACE / 4, spool: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic, most: int = UPLOAD_SESSIONS, idle: float = UPLOAD_IDLE):
        self.store, self.refresh, self.clock, self.most, self.idle = store, refresh, clock, most, idle
        self.backend = self._backend(store, spool)
        self._sessions = {}  # type: Dict[str, UploadSession]
        self._lock = threading.Lock()

    @staticmethod
    def _backend(store: Store, spool: Optional[str]) -> UploadBackend:
        if isinstance(store, S3Store):
            return S3Uploads(store, spool)
        if isinstance(store, LocalStore):
            return LocalUploads(store)
        raise StoreError("%s: this kind of store takes no uploads" % store.url)

    def start(self, name: str, user: str) -> str:
        """A new session for repository `name` and `user`: its id."""
        upload_id = binascii.hexlify(os.urandom(16)).decode()
        state = UploadState(name, user)
        with self._lock:
            self._admit(upload_id, UploadSession(state, hashlib.sha256(), self.clock()))
        try:
            self._save(upload_id, state)
        except BaseException:
            with self._lock:
                self._sessions.pop(upload_id, None)
            raise
        return upload_id

    def status(self, upload_id: str, name: str, user: str) -> int:
        """The bytes a session holds."""
        return self._read(upload_id, name, user).size

    def append(self, upload_id: str, name: str, user: str, body: Iterable[bytes], first: Optional[int] = None,
               length: Optional[int] = None) -> int:
        """Add the body's bytes to a session (first: where the client says they start, length: how
        many it says they are); the bytes the session holds then."""
        with self._claim(upload_id, name, user) as session:
            return self._append(upload_id, session, body, first, length).size

    def finish(self, upload_id: str, name: str, user: str, digest_hex: str, body: Iterable[bytes],
               first: Optional[int] = None, length: Optional[int] = None) -> int:
        """Add the body's bytes (if any), then make blob digest_hex of the session's bytes if they
        are that blob (DIGEST_INVALID if not); the session is gone either way.  The blob's size."""
        with self._claim(upload_id, name, user) as session:
            state = session.state
            assert state is not None
            self._check_range(state, first, length)  # a 416 leaves the session as it was
            try:
                if state.size == 0:  # all of the blob in this request: straight to its key
                    size = self._put(digest_hex, body, length)
                else:
                    state = self._append(upload_id, session, body, first, length)
                    self.backend.complete(upload_id, state, digest_hex, session.sha.hexdigest() if session.sha else None)
                    size = state.size
            except BaseException:
                self._forget(upload_id, session, session.state or state, False)
                raise
            self._forget(upload_id, session, state, True)
            return size

    def cancel(self, upload_id: str, name: str, user: str) -> None:
        """Drop a session and its bytes."""
        with self._claim(upload_id, name, user) as session:
            assert session.state is not None
            self._forget(upload_id, session, session.state, False)

    def put(self, digest_hex: str, body: Iterable[bytes], length: Optional[int] = None) -> int:
        """A monolithic upload: the body stored as blob digest_hex if it is that blob; its size."""
        token = "monolithic-" + binascii.hexlify(os.urandom(8)).decode()
        upload = UploadSession(None, None, self.clock())
        upload.lock.acquire()  # in progress: never idle
        with self._lock:
            self._admit(token, upload)
        try:
            return self._put(digest_hex, body, length)
        finally:
            with self._lock:
                self._sessions.pop(token, None)

    # -- the sessions this process serves --

    def _admit(self, upload_id: str, session: UploadSession) -> UploadSession:
        """Count a session in (the caller holds _lock): 429 when `most` are in progress."""
        now = self.clock()
        for key, other in list(self._sessions.items()):
            if now - other.used > self.idle and not other.lock.locked():
                del self._sessions[key]
        if len(self._sessions) >= self.most:
            raise RegistryError(429, "TOOMANYREQUESTS", "this server has %d uploads in progress, as many as it takes "
                                "at once: try again in a moment" % self.most, {"Retry-After": "10"})
        self._sessions[upload_id] = session
        return session

    @contextlib.contextmanager
    def _claim(self, upload_id: str, name: str, user: str) -> Iterator[UploadSession]:
        """A session of this name and user (404 BLOB_UPLOAD_UNKNOWN for any other, or for no
        session id at all), as the store has it now, for one request at a time."""
        if not _UPLOAD_ID.match(upload_id):
            raise upload_unknown(upload_id)
        with self._lock:
            session = self._sessions.get(upload_id) or self._admit(upload_id, UploadSession(None, None, self.clock()))
        if not session.lock.acquire(blocking=False):
            raise RegistryError(416, "BLOB_UPLOAD_INVALID", "another request is adding to this upload now")
        try:
            try:
                state = self._read(upload_id, name, user)
            except RegistryError:
                with self._lock:
                    if self._sessions.get(upload_id) is session:
                        del self._sessions[upload_id]
                raise
            if state != session.state:  # new here, or another process added to it: the hash is not ours
                session.state, session.sha = state, None
            yield session
        finally:
            session.used = self.clock()
            session.lock.release()

    def _forget(self, upload_id: str, session: UploadSession, state: UploadState, completed: bool) -> None:
        """A session is over: its keys go (a failure to delete them is left to gc), and this process forgets it."""
        with self._lock:
            if self._sessions.get(upload_id) is session:
                del self._sessions[upload_id]
        with contextlib.suppress(DogestryError):
            self.backend.discard(upload_id, state, completed)

    def _read(self, upload_id: str, name: str, user: str) -> UploadState:
        """A session's state from the store, if it is this name's and this user's."""
        if not _UPLOAD_ID.match(upload_id):
            raise upload_unknown(upload_id)
        key = upload_key(upload_id, "state.json")
        try:
            state = UploadState.from_json(read_json(self.store, key, UPLOAD_STATE_SHAPE), key)
        except (NotFound, FormatError):
            raise upload_unknown(upload_id)
        if state.name != name or state.user != user:
            raise upload_unknown(upload_id)
        return state

    def _save(self, upload_id: str, state: UploadState) -> None:
        write_json(self.store, upload_key(upload_id, "state.json"), state.to_json())

    # -- bytes --

    def _check_range(self, state: UploadState, first: Optional[int], length: Optional[int]) -> None:
        """416 unless bytes said to start at `first` go on where the session is; 413 if they would
        make it too large."""
        if first is not None and first != state.size:
            raise RegistryError(416, "BLOB_UPLOAD_INVALID", "the chunk starts at byte %d, but the upload holds %d "
                                "bytes: send the bytes from there" % (first, state.size), {"Range": upload_range(state.size)})
        if length is not None and state.size + length > UPLOAD_MAX:
            raise too_large()

    def _append(self, upload_id: str, session: UploadSession, body: Iterable[bytes], first: Optional[int],
                length: Optional[int]) -> UploadState:
        """Add bytes to a session (the caller holds it): its new state; a failure leaves it as it was."""
        state = session.state
        assert state is not None
        self._check_range(state, first, length)
        before = session.sha.copy() if session.sha is not None else None
        try:
            new = self.backend.write(upload_id, state, self._counted(body, state.size, length, session.sha, upload_id))
            if new != state:
                self._save(upload_id, new)
        except BaseException:
            session.sha = before
            raise
        session.state = new
        return new

    def _put(self, digest_hex: str, body: Iterable[bytes], length: Optional[int]) -> int:
        if length is not None and length > UPLOAD_MAX:
            raise too_large()
        sha = hashlib.sha256()
        return self.backend.put_blob(digest_hex, self._counted(body, 0, length, sha, ""), sha)

    def _counted(self, body: Iterable[bytes], start: int, length: Optional[int], sha: Any,
                 upload_id: str) -> Iterator[bytes]:
        """The body's bytes, hashed (sha, if not None) on their way, at most UPLOAD_MAX with the
        `start` bytes before them, and `length` of them if that was said.  A long body keeps its
        session's state.json young (every `refresh` seconds), so gc leaves the session be."""
        received, touched = 0, self.clock()
        for data in body:
            received += len(data)
            if start + received > UPLOAD_MAX:
                raise too_large()
            if sha is not None:
                sha.update(data)
            if upload_id and self.clock() - touched >= self.refresh:
                self.store.touch(upload_key(upload_id, "state.json"))
                touched = self.clock()
            yield data
        if length is not None and received != length:
            raise RegistryError(400, "SIZE_INVALID", "the chunk is %d bytes, not the %d its Content-Range says"
                                % (received, length))


# === 18. Moving images without an engine: import, export, copy ===
#
# import reads the archives `docker save` (all three shapes, section 10), `podman save`
# (docker-archive and oci-archive), skopeo, buildah and `buildx --output type=oci` write,
# and stores their images as push would; export writes what docker load, podman load,
# skopeo and `ctr import` read; copy moves images between stores.  An OCI image layout
# (OCI image-spec v1.1, "image-layout"): oci-layout, index.json and blobs/sha256/<hex>;
# index.json's descriptors name manifests (or nested indexes), annotated with
# org.opencontainers.image.ref.name and containerd's io.containerd.image.name.

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


class Unpacking:
    """read() of what a compressed stream unpacks to (gzip, bzip2, xz; zstd where Python has
    it), in bounded pieces, however well the input compresses."""

    def __init__(self, raw: IO[bytes], kind: str, head: bytes = b""):
        self.raw, self.kind, self.pending = raw, kind, head
        self.decoder = self._decoder()
        self.buffer = bytearray()

    def _decoder(self) -> Any:
        if self.kind == "gzip":
            return zlib.decompressobj(31)
        if self.kind == "bzip2":
            import bz2
            return bz2.BZ2Decompressor()
        if self.kind == "xz":
            import lzma
            return lzma.LZMADecompressor()
        import importlib
        try:
            zstd = importlib.import_module("compression.zstd")  # the standard library's from Python 3.14
        except ImportError:
            raise UsageError("this Python cannot unpack a zstd-compressed archive: "
                             "zstd -dc FILE | dogestry import STORE -")
        return zstd.ZstdDecompressor()

    def _input(self) -> bytes:
        data, self.pending = self.pending or self.raw.read(CHUNK), b""
        return data

    def _next(self) -> bytes:
        """The next piece of output; b"" at the end of the input."""
        while True:
            if self.decoder.eof:
                rest = self.decoder.unused_data or self._input()
                if not rest:
                    return b""
                self.decoder, self.pending = self._decoder(), rest  # concatenated members or streams
            if self.kind == "gzip":
                data = self.pending or self._input()
                out = self.decoder.decompress(data, CHUNK) if data else b""
                self.pending = self.decoder.unconsumed_tail
            else:
                data = self._input() if self.decoder.needs_input else b""
                out = self.decoder.decompress(data, CHUNK) if data or not self.decoder.needs_input else b""
            if out:
                return out
            if not data:
                raise FormatError("the %s-compressed archive is truncated" % self.kind)

    def read(self, n: int = -1) -> bytes:
        try:
            while n < 0 or len(self.buffer) < n:
                out = self._next()
                if not out:
                    break
                self.buffer += out
        except (zlib.error, OSError, EOFError, ValueError) as e:
            raise FormatError("the %s-compressed archive is corrupt (%s)" % (self.kind, e))
        except Exception as e:  # lzma.LZMAError and zstd's errors are neither of those
            if type(e).__name__ not in ("LZMAError", "ZstdError"):
                raise
            raise FormatError("the %s-compressed archive is corrupt (%s)" % (self.kind, e))
        n = len(self.buffer) if n < 0 else min(n, len(self.buffer))
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


class Prefixed:
    """A stream whose first bytes were already read (to sniff its format)."""

    def __init__(self, head: bytes, rest: IO[bytes]):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        data = self.head if n < 0 else self.head[:n]
        self.head = self.head[len(data):]
        return data if n < 0 else data + (self.rest.read(n - len(data)) if n > len(data) else b"")


def archive_tar(raw: IO[bytes]) -> IO[bytes]:
    """The tar stream of an archive file, unpacked if the whole archive is compressed."""
    head = raw.read(6)
    kind = {b"\x1f\x8b": "gzip", b"BZ": "bzip2"}.get(head[:2]) or \
        ("xz" if head == b"\xfd7zXZ\x00" else "zstd" if head[:4] == b"\x28\xb5\x2f\xfd" else "")
    if not head:
        raise FormatError("the archive is empty")
    if kind:
        return Unpacking(raw, kind, head)  # type: ignore
    return Prefixed(head, raw)  # type: ignore


class ArchivedImage(NamedTuple):
    """An image an archive holds: its config, its layers' member names (bottom first), tags, ID."""

    config: bytes
    members: List[str]
    diff_ids: List[str]
    tags: List[ImageRef]
    image_id: str  # the sha256 of config


# An OCI index (index.json, or a multi-platform image's index) and manifest: what dogestry reads
# of them.  Docker's manifest lists and manifests (schema 2) have the same shape.
DESCRIPTOR_SHAPE = {"digest": DIGEST, "size?": SIZE, "annotations?": OrNull({"*": str}),
                    "platform?": OrNull({"os?": str, "architecture?": str})}
OCI_INDEX_SHAPE = {"manifests": [DESCRIPTOR_SHAPE]}
OCI_MANIFEST_SHAPE = {"config": DESCRIPTOR_SHAPE, "layers?": OrNull([DESCRIPTOR_SHAPE])}


def archive_tag(text: Optional[str]) -> Optional[ImageRef]:
    """A tag of an archive as this store names it: docker.io/library/x:t is x:t (None: not a NAME:TAG)."""
    if text is None or ":" not in text.rsplit("/", 1)[-1]:
        return None
    name, _, tag = text.rpartition(":")
    host, parts = split_registry(name)
    name = "/".join(parts) if host == DOCKER_HUB else "/".join([host] + parts)
    try:
        return parse_image_ref("%s:%s" % (name, tag))
    except UsageError:
        return None


def full_image_name(ref: ImageRef) -> str:
    """NAME:TAG as containerd names it (docker.io/library/x:t for x:t)."""
    host, parts = split_registry(ref.name)
    if host == DOCKER_HUB and len(parts) == 1 and "/" not in ref.name:
        parts = ["library"] + parts
    return "%s/%s:%s" % (host, "/".join(parts), ref.tag)


def archive_blob(contents: SaveContents, descriptor: Dict[str, Any], what: str) -> str:
    """The member of a small blob an OCI descriptor (DESCRIPTOR_SHAPE) names, checked against
    the descriptor's digest and size."""
    digest = descriptor["digest"]
    name = contents.resolve("blobs/sha256/" + digest_hex(digest))
    if name not in contents.small and name not in contents.spooled:
        raise FormatError("the archive lacks %s %s" % (what, digest))
    size = len(contents.read_small(name))
    if contents.digests.get(name) != digest or descriptor.get("size", size) != size:
        raise IntegrityError("the archive's %s %s does not match its digest" % (what, digest))
    return name


def archived_config(contents: SaveContents, name: str) -> Tuple[bytes, List[str], str]:
    """(bytes, rootfs.diff_ids, image ID) of an image config member."""
    config, diff_ids = saved_config(contents, name)
    return config, diff_ids, contents.digests[contents.resolve(name)]


def docker_archive_images(contents: SaveContents) -> List[ArchivedImage]:
    """The images of a `docker save` / `podman save` archive, from its manifest.json."""
    manifest = contents.document("manifest.json", SAVE_MANIFEST_SHAPE, "the archive's manifest.json")
    if not manifest:
        raise FormatError("the archive's manifest.json lists no image")
    images = []
    for entry in manifest:
        config, diff_ids, image_id = archived_config(contents, entry["Config"])
        named = _OCI_BLOB.match(contents.resolve(entry["Config"]))
        if named and image_id != "sha256:" + named.group(1):
            raise IntegrityError("the archive's config %s does not match its digest" % named.group(0))
        members = [contents.resolve(n) for n in entry.get("Layers") or []]
        if len(members) != len(diff_ids):
            raise FormatError("manifest.json lists %d layers but the config %d" % (len(members), len(diff_ids)))
        tags = [t for t in (archive_tag(text) for text in entry.get("RepoTags") or []) if t is not None]
        images.append(ArchivedImage(config, members, diff_ids, tags, image_id))
    return images


class ArchivedIndex(NamedTuple):
    """A multi-platform image an archive holds: its index and every manifest the index reaches,
    each to be kept byte for byte, the images among them, and its tags."""

    root: PushedManifest              # the index
    manifests: List[PushedManifest]   # every manifest the index reaches, each once, children before their index
    images: Dict[str, ArchivedImage]  # manifest digest -> its image (those with a platform: no attestations)
    tags: List[ImageRef]

    @property
    def image_id(self) -> str:
        """What names it among an archive's images: its index's digest."""
        return self.root.digest

    def blobs(self) -> List[Tuple[str, int, Optional[str]]]:
        """(digest, size, its diffID if it is a layer of an image) of every blob its manifests
        name, but their images' configs (image records keep those)."""
        blobs = []  # type: List[Tuple[str, int, Optional[str]]]
        for manifest in self.manifests:
            image = self.images.get(manifest.digest)
            named = manifest.blobs[1:] if image is not None else manifest.blobs
            diff_ids = image.diff_ids if image is not None else [None] * len(named)  # type: Sequence[Optional[str]]
            blobs.extend((digest, size, diff_id) for (digest, size), diff_id in zip(named, diff_ids))
        return blobs


Archived = Union[ArchivedImage, ArchivedIndex]


def archived_manifest(contents: SaveContents, descriptor: Dict[str, Any]) -> PushedManifest:
    """A manifest or index an archive holds, as a descriptor names it (digest and size checked),
    read as the store reads the manifests it keeps (section 16)."""
    name, what = archive_blob(contents, descriptor, "manifest"), "a manifest in the archive"
    doc = contents.document(name, {}, what)
    media_type = doc["mediaType"] if isinstance(doc.get("mediaType"), str) else \
        OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    try:
        return parse_pushed_manifest(contents.read_small(name), media_type, what, doc)
    except RegistryError as e:
        raise FormatError(str(e))


def oci_archive_images(contents: SaveContents, platform: Optional[Platform] = None) -> List[Archived]:
    """The images of an OCI image layout archive, from its index.json (of a multi-platform image:
    all of it, or with platform, its image for that platform)."""
    index = contents.document("index.json", OCI_INDEX_SHAPE, "the archive's index.json")
    found = {}  # type: Dict[str, ArchivedImage]
    items = {}  # type: Dict[str, Archived]
    images = []  # type: List[Archived]
    for descriptor in index["manifests"]:
        annotations = descriptor.get("annotations") or {}
        tag = archive_tag(annotations.get(IMAGE_NAME_ANNOTATION)) or archive_tag(annotations.get(REF_NAME_ANNOTATION))
        archive_blob(contents, descriptor, "manifest")
        if descriptor["digest"] not in items:
            items[descriptor["digest"]] = _oci_item(contents, descriptor, found, platform, tag)
        images.append(items[descriptor["digest"]]._replace(tags=[tag] if tag else []))
    return images


def _oci_item(contents: SaveContents, descriptor: Dict[str, Any], found: Dict[str, ArchivedImage],
              platform: Optional[Platform], tag: Optional[ImageRef]) -> Archived:
    """What a descriptor of index.json names: an image, or a multi-platform image (an index
    with more than one image) whole, or its image for the platform asked for.  An index with
    one image (buildx's output for one platform, with its attestations) is that image."""
    manifest = archived_manifest(contents, descriptor)
    if not manifest.is_index:
        return _oci_image(contents, descriptor, found)
    entries = index_images(manifest)
    if platform is not None:
        what = "%s in the archive" % (tag,) if tag else "the archive's image %s" % manifest.digest
        entry = choose_platform(entries, platform, what)
        return _oci_image(contents, {"digest": entry.digest, "size": entry.size}, found)
    others = [d for d in manifest.doc["manifests"] if ATTESTATION_ANNOTATION not in (d.get("annotations") or {})
              and (descriptor_platform(d) or Platform("", "")).os != "unknown"]
    if len(others) == 1 and others[0]["mediaType"] not in INDEX_TYPES:  # one image (and its attestations)
        return _oci_image(contents, others[0], found)
    manifests = collections.OrderedDict()  # type: collections.OrderedDict  # digest -> PushedManifest
    images = collections.OrderedDict()  # type: collections.OrderedDict  # digest -> ArchivedImage
    _keep_index(contents, manifest, manifests, images, found, ARCHIVE_INDEX_DEPTH)
    return ArchivedIndex(manifest, list(manifests.values()), images, [])


ARCHIVE_INDEX_DEPTH = 3  # an index and at most two indexes nested in it (four documents down with a manifest)


def _keep_index(contents: SaveContents, index: PushedManifest, manifests: Dict[str, PushedManifest],
                images: Dict[str, ArchivedImage], found: Dict[str, ArchivedImage], depth: int) -> None:
    """Every manifest an index reaches (at most `depth` indexes deep) into manifests, children
    before the index naming them; the image of each of its images into images."""
    wanted = {e.digest for e in index_images(index)}
    for descriptor in index.doc["manifests"]:
        if descriptor["digest"] in manifests:
            continue
        child = archived_manifest(contents, descriptor)
        if child.is_index:
            if depth <= 1:
                raise FormatError("the archive's index.json nests indexes too deep")
            _keep_index(contents, child, manifests, images, found, depth - 1)
        elif child.digest in wanted:
            images[child.digest] = _oci_image(contents, descriptor, found)
        manifests[child.digest] = child
    manifests[index.digest] = index


def _oci_image(contents: SaveContents, descriptor: Dict[str, Any], found: Dict[str, ArchivedImage]) -> ArchivedImage:
    """The image an image manifest's descriptor names.  found: digest -> its image, so a
    manifest many descriptors name is read once."""
    name = archive_blob(contents, descriptor, "manifest")
    if descriptor["digest"] in found:
        return found[descriptor["digest"]]
    manifest = contents.document(name, OCI_MANIFEST_SHAPE, "a manifest in the archive")
    config, diff_ids, image_id = archived_config(contents, archive_blob(contents, manifest["config"], "config"))
    layers = manifest.get("layers") or []
    if len(layers) != len(diff_ids):
        raise FormatError("a manifest in the archive lists %d layers but its config %d"
                          % (len(layers), len(diff_ids)))
    members = ["blobs/sha256/" + digest_hex(d["digest"]) for d in layers]
    image = ArchivedImage(config, members, diff_ids, [], image_id)
    found[descriptor["digest"]] = image
    return image


def _whole_indexes(contents: SaveContents, platform: Optional[Platform]) -> bool:
    """Is a `docker save` archive read by its index.json: does that name a multi-platform image
    (an index) that the archive holds whole (or one for --platform)?  docker 25+ with the
    containerd image store saves an image's index, and only the platforms it has pulled: such
    an archive is read by its manifest.json, as before."""
    try:
        index = contents.document("index.json", OCI_INDEX_SHAPE, "the archive's index.json")
    except FormatError:
        return False
    indexes = [d for d in index["manifests"] if d.get("mediaType") in INDEX_TYPES]
    return bool(indexes) and (platform is not None or
                              all(_held_whole(contents, d["digest"], ARCHIVE_INDEX_DEPTH) for d in indexes))


def _held_whole(contents: SaveContents, digest: str, depth: int) -> bool:
    """Does the archive hold a manifest, and every manifest it reaches?"""
    name = "blobs/sha256/" + digest_hex(digest)
    if name not in contents.small:
        return False
    what = "a manifest in the archive"
    try:
        doc = contents.document(name, {}, what)
        children = contents.document(name, OCI_INDEX_SHAPE, what)["manifests"] if "manifests" in doc else []
    except FormatError:
        return True  # held: what is wrong with it is said when it is read
    return depth <= 1 or all(_held_whole(contents, d["digest"], depth - 1) for d in children)


def archive_images(contents: SaveContents, platform: Optional[Platform] = None) -> List[Archived]:
    """Every image an archive holds (one entry per image ID, with all its tags); a multi-platform
    image whole, or with platform, its image for that platform."""
    if contents.resolve("manifest.json") in contents.small and not _whole_indexes(contents, platform):
        images = docker_archive_images(contents)  # type: Sequence[Archived]
    elif "index.json" in contents.small:
        images = oci_archive_images(contents, platform)
    else:
        raise FormatError("not an image archive: it has no manifest.json (docker save, podman save) "
                          "and no index.json (an OCI image layout)")
    merged = collections.OrderedDict()  # type: collections.OrderedDict  # image ID -> (image, {tag: None})
    for image in images:
        _, tags = merged.setdefault(image.image_id, (image, collections.OrderedDict()))
        tags.update((t, None) for t in image.tags)
    return [image._replace(tags=list(tags)) for image, tags in merged.values()]


def choose_archived(images: List[Archived], names: Sequence[str]) -> List[Archived]:
    """The images to import, with the tags to give them: NAME:TAG arguments tag a one-image
    archive, or pick images of a larger one by their tags."""
    refs = [parse_image_ref(n) for n in names]
    if not refs:
        return images
    if len(images) == 1:
        return [images[0]._replace(tags=refs)]
    chosen = collections.OrderedDict()  # type: collections.OrderedDict
    for ref in refs:
        matches = [i for i in images if ref in i.tags]
        if not matches:
            raise UsageError("%s is not a tag of the archive, which holds %d images (%s)" % (
                ref, len(images), ", ".join(str(t) for i in images for t in i.tags) or "untagged"))
        picked = chosen.setdefault(matches[0].image_id, matches[0]._replace(tags=[]))
        picked.tags.append(ref)
    return list(chosen.values())


class ArchiveReader:
    """Streams an archive's members into a LayerPipeline.  A member named by a digest (OCI
    blobs, podman's <diffID>.tar) may be anything (another platform's layer, an attestation):
    unless the store has it (then it is skipped unread), it is spooled and held back until the
    archive's manifests say it is a layer of an image being imported (layer()), or a blob a
    manifest kept byte for byte names (exact_blob()).  A v1 save's <id>/layer.tar is a layer
    by its name, and goes up at once.  Nothing names a blob until the whole archive has been
    read and checked."""

    def __init__(self, store: Store, pipeline: LayerPipeline, freshness: Freshness):
        self.store, self.pipeline, self.freshness = store, pipeline, freshness
        self.known = {}       # type: Dict[str, LayerRecord]  # member -> a record the store has
        self.stored = {}      # type: Dict[str, str]          # member -> digest of a blob the store has
        self.held = {}        # type: Dict[str, Spool]        # member -> its spool, until it is known to be a layer
        self.uploaded = {}    # type: Dict[str, str]          # member -> key of its upload in the pipeline
        self.unnamed = set()  # type: Set[str]                # diffIDs whose index entry is still to write
        self.exact = {}       # type: Dict[str, Optional[ExactBlob]]  # member -> a blob stored as it is (None: it was)

    def spool(self, entry: TarEntry, reader: MemberReader) -> Optional[Spool]:
        """read_save_stream's spool(): what to do with a large member (or a .tar one)."""
        blob = _OCI_BLOB.match(entry.name) or _PODMAN_LAYER.match(entry.name)
        named = "sha256:" + blob.group(1) if blob else None
        if named is None and not entry.name.endswith(".tar"):
            return None  # not a layer: a large document, kept in memory (within limits)
        if named is not None:
            record = reused_layer(self.store, named, self.freshness)  # a layer named by its diffID
            if record is not None or self.store.stat(blob_key(named)) == entry.size:
                reader.skip()
                if record is not None:
                    self.known[entry.name] = record
                else:
                    self.stored[entry.name] = named
                return Spool("", named, entry.size, named, entry.size, "none")
        label = named[7:19] if named else self.pipeline.unnamed_label()  # renamed once its diffID is known
        spooled = self.pipeline.spool(reader, entry.size, label, may_compress=True, unpack=True)
        if named is not None and spooled.raw_digest != named:
            os.unlink(spooled.path)
            raise IntegrityError("archive member %s does not match its digest (%s)" % (entry.name, spooled.raw_digest))
        if named is None:
            self.take(entry.name, spooled)
        else:
            self.held[entry.name] = spooled
        return spooled._replace(path="")

    def layer(self, member: str, small: Optional[bytes], diff_id: str) -> None:
        """A member the archive's manifests name as a layer of an image being imported (its
        bytes, if it was small enough to be kept in memory): stored unless it is already."""
        if member in self.known or member in self.stored or member in self.uploaded or member in self.exact:
            return  # a layer of two images, or one the store has
        if member in self.held:
            self.take(member, self.held.pop(member), diff_id)
        elif small is not None:
            self.small_layer(member, small, diff_id)

    def drop_held(self) -> None:
        """Remove the spools of members no imported image names as a layer."""
        for spooled in self.held.values():
            with contextlib.suppress(OSError):
                os.unlink(spooled.path)
        self.held.clear()

    def take(self, member: str, spooled: Spool, diff_id: Optional[str] = None) -> None:
        """A spooled layer (of diff_id, if the manifests said so yet): dropped if the store has
        it, else uploaded under its diffID where it can be checked (a raw tar's digest, a gzip
        blob's unpacked digest), else (zstd) under its own digest."""
        if diff_id is not None and spooled.tar_digest not in (None, diff_id):
            os.unlink(spooled.path)
            raise IntegrityError("archive member %s does not unpack to layer %s, which the image's config names"
                                 % (member, diff_id))
        known = spooled.tar_digest or diff_id  # unchecked: the store's own (checked) copy of the config's layer
        record = reused_layer(self.store, known, self.freshness) if known else None
        candidate = spooled.tar_digest or spooled.raw_digest
        if record is not None or candidate in self.uploaded.values():
            self.pipeline.drop(spooled, candidate, "already stored" if record is not None else "repeated")
            if record is not None:
                self.known[member] = record
            else:
                self.uploaded[member] = candidate
            return
        self.pipeline.upload(candidate, spooled)
        self.uploaded[member] = candidate

    def small_layer(self, member: str, data: bytes, diff_id: str) -> None:
        """A layer small enough to have been kept in memory: checked against the digest its name
        gives, then dropped if the store has it, else stored as a spooled one would be."""
        named = _OCI_BLOB.match(member)
        if named and sha256_digest(data) != "sha256:" + named.group(1):
            raise IntegrityError("archive member %s does not match its digest" % member)
        record = reused_layer(self.store, diff_id, self.freshness)
        if record is not None and small_layer_checks_out(data, diff_id):
            self.known[member] = record  # checked in memory: no temp space for a layer the store has
            return
        self.take(member, self.pipeline.spool_bytes(data, diff_id[7:19]), diff_id)

    def layer_record(self, contents: SaveContents, member: str, diff_id: str,
                     uploads: Mapping[str, LayerRecord]) -> LayerRecord:
        """The record of an image's layer once every upload finished, checked against its diffID."""
        if member in self.exact:
            record = self.exact_layer(member, diff_id)
        elif member in self.known:
            record = self.known[member]
        elif member in self.uploaded:
            record = uploads[self.uploaded[member]]
            if record.checked:
                self.unnamed.add(diff_id)
            else:  # no unpacker here: the (digest-checked) config's word, and no index entry
                record = record._replace(diff_id=diff_id, raw_size=None)
        elif member in self.stored:
            record = reused_layer(self.store, diff_id, self.freshness) or self._stored_blob(self.stored[member], diff_id)
        else:
            raise FormatError("the archive lacks layer %s (%s)" % (diff_id, member))
        if record.diff_id != diff_id:
            raise IntegrityError("archive member %s does not unpack to layer %s, which the image's config names"
                                 % (member, diff_id))
        return record

    def exact_blob(self, contents: SaveContents, digest: str, size: int) -> None:
        """A blob a manifest kept byte for byte names: the store is to hold it as the archive
        has it, under its own digest.  Left as it is if the store has it; else uploaded (a raw
        one compressed here as it was read, or one the store holds only compressed as a layer
        of that diffID, is unpacked again to the archive's bytes)."""
        member = "blobs/sha256/" + digest_hex(digest)
        name = contents.resolve(member)
        spooled = contents.spooled.get(name)
        held = len(contents.small[name]) if name in contents.small else spooled.raw_size if spooled else None
        if held is None:
            raise FormatError("the archive lacks blob %s, which a manifest in it names" % digest)
        if contents.digests[name] != digest or held != size:
            raise IntegrityError("the archive's blob %s does not match its digest and size" % digest)
        if member in self.exact:
            return
        key = blob_key(digest)
        if member in self.held:
            spool = self.held.pop(member)
            if spool.compression == "chunked":
                spool = self._unchunked(spool, digest, size)
            elif spool.digest != digest:
                with open(spool.path, "rb") as packed:
                    raw = self._unpacked(packed, digest, size)
                os.unlink(spool.path)
                spool = raw
            self.pipeline.upload_blob(spool)
            self.exact[member] = ExactBlob(size, spool.compression, spool.tar_digest, spool.tar_size)
        elif self.store.stat(key) == size:
            self.freshness.seen(key, self.store.age(key))
            self.exact[member] = None
        elif name in contents.small:
            data = contents.small[name]
            self.exact[member] = exact_small_blob(data)
            self.store.put_bytes(key, data)
            self.freshness.written(key)
            self.pipeline.report.add(digest, size)
        elif member in self.known:  # a raw layer the store holds compressed (as a push stores it)
            with contextlib.closing(self.store.open(blob_key(self.known[member].digest))) as packed:
                spool = self._unpacked(packed, digest, size)
            self.pipeline.upload_blob(spool)
            self.exact[member] = ExactBlob(size, "none", digest, size)
        else:  # the store had it when the archive was read
            raise self.freshness.deleted(key)

    def _unpacked(self, packed: IO[bytes], digest: str, size: int) -> Spool:
        """A raw blob of the archive made again from a gzip copy of it, checked against its digest."""
        path = os.path.join(self.pipeline.work_dir, "raw-" + digest_hex(digest))
        sha, written, unpacking = hashlib.sha256(), 0, Unpacking(packed, "gzip")
        with OutputFile(path, self.store.keeps_files) as out:
            for data in iter(lambda: unpacking.read(CHUNK), b""):
                sha.update(data)
                written += len(data)
                if written > size:
                    break
                out.write(data)
        if written != size or "sha256:" + sha.hexdigest() != digest:
            os.unlink(path)
            raise IntegrityError("the compressed copy of blob %s does not unpack to it" % digest)
        return Spool(path, digest, size, digest, size, "none")

    def _unchunked(self, spool: Spool, digest: str, size: int) -> Spool:
        """A raw blob of the archive made again from its spooled recipe and the chunks it stored
        (checked against its digest: a layer's diffID)."""
        path = os.path.join(self.pipeline.work_dir, "raw-" + digest_hex(digest))
        record = LayerRecord(digest, spool.digest, spool.size, "chunked", size)
        with OutputFile(path, self.store.keeps_files) as out:
            for data in ChunkedFeeder(self.store, record, recipe_path=spool.path).chunks(lambda n: None):
                out.write(data)
        os.unlink(spool.path)
        return Spool(path, digest, size, digest, size, "none")

    def exact_layer(self, member: str, diff_id: str) -> LayerRecord:
        """The record of a layer stored as the archive has it (exact_blob), checked against its diffID."""
        digest = "sha256:" + member[-64:]
        named = reused_layer(self.store, diff_id, self.freshness)
        if named is not None and named.digest == digest:
            return named
        blob = self.exact[member]
        if blob is None:
            record = self._stored_blob(digest, diff_id)
        elif blob.tar_digest not in (None, diff_id):
            raise IntegrityError("archive member %s does not unpack to layer %s, which the image's config names"
                                 % (member, diff_id))
        else:
            raw_size = blob.tar_size if blob.tar_digest else None
            record = LayerRecord(diff_id, digest, blob.size, blob.compression, raw_size)
            if record.checked:
                self.unnamed.add(diff_id)
        if named is not None:
            self.unnamed.discard(diff_id)  # the layer index names another blob of it: left as it is
        return record

    def _stored_blob(self, digest: str, diff_id: str) -> LayerRecord:
        """A layer whose blob the store holds but no index entry names (an import cut short):
        read back and checked, gzip or raw (zstd: the config's word, and it stays unnamed)."""
        sha, hasher, size = hashlib.sha256(), DiffIdHasher(), 0
        key = blob_key(digest)
        age = self.store.age(key)
        with contextlib.closing(self.store.open(key)) as f:
            head = f.read(CHUNK)
            compression = detect_compression(head)
            try:
                for data in itertools.chain([head], iter(lambda: f.read(CHUNK), b"")):
                    sha.update(data)
                    size += len(data)
                    if compression != "zstd":
                        hasher.update(data)
                unpacked = hasher.digest() if compression != "zstd" else diff_id
            except zlib.error:
                unpacked = None
        if "sha256:" + sha.hexdigest() != digest or unpacked != diff_id:
            raise IntegrityError("%s: blob %s does not unpack to layer %s" % (self.store.url, digest, diff_id))
        record = LayerRecord(diff_id, digest, size, compression, hasher.size if compression != "zstd" else None)
        if record.checked:
            self.unnamed.add(diff_id)
        else:
            self.freshness.seen(key, age)  # no index entry will keep it young: the blob itself is refreshed
        return record


class ExactBlob(NamedTuple):
    """A blob an import stored as the archive has it: its size, compression, and the digest and
    size of the tar it unpacks to (None: not known, zstd)."""

    size: int
    compression: str
    tar_digest: Optional[str]
    tar_size: Optional[int]


def exact_small_blob(data: bytes) -> ExactBlob:
    """What exact_blob() learns of a blob small enough to have been kept in memory."""
    compression = detect_compression(data[:4])
    if compression == "zstd":
        return ExactBlob(len(data), compression, None, None)
    hasher = DiffIdHasher()
    try:
        hasher.update(data)
        return ExactBlob(len(data), compression, hasher.digest(), hasher.size)
    except zlib.error:  # not a layer (or a broken one: its image's check says so)
        return ExactBlob(len(data), compression, "", None)


def small_layer_checks_out(data: bytes, diff_id: str) -> bool:
    """Does a layer held in memory unpack to diff_id, or is it one that cannot be checked (zstd)?"""
    if detect_compression(data[:4]) == "zstd":
        return True
    hasher = DiffIdHasher()
    try:
        hasher.update(data)
        return hasher.digest() == diff_id
    except zlib.error:
        return False


def import_archive(store: Store, stream: IO[bytes], names: Sequence[str], progress: ProgressSink,
                   options: PushOptions, platform: Optional[Platform] = None,
                   report: Optional[TransferReport] = None) -> List[Archived]:
    """Store the images of an archive (all, or those NAME:TAG arguments pick) as push would, a
    multi-platform image whole (or with platform, its image for that platform); return them,
    with the tags written (report: the blobs sent)."""
    store.ensure()
    freshness = options.freshness(store)
    with work_directory(options.tempdir or store.spool_dir()) as work:
        pipeline = LayerPipeline(store, work, progress, options, freshness, write_index=False, report=report)
        if names and options.chunked:  # the tag the archive is given: its repository's chunks need no asking
            with contextlib.suppress(UsageError):  # (choose_archived says what is wrong with it)
                pipeline.learn_chunks(functools.partial(chunk_hints, store, parse_image_ref(names[0]), platform,
                                                        freshness.clock))
        reader = ArchiveReader(store, pipeline, freshness)
        try:
            contents = read_save_stream(archive_tar(stream), reader.spool, pipeline.abort, what="archive")
            chosen = choose_archived(archive_images(contents, platform), names)
            for item in chosen:  # every tag checked before any blob, image record or tag is written
                target = digest_hex(item.image_id) if isinstance(item, ArchivedImage) else "@" + item.image_id
                for ref in item.tags:
                    check_tag_may_move(store, ref, target)
            indexes = [i for i in chosen if isinstance(i, ArchivedIndex)]
            for index in indexes:  # first: their manifests name their blobs as the archive has them
                for digest, size, _ in index.blobs():
                    reader.exact_blob(contents, digest, size)
            images = [i for i in chosen if isinstance(i, ArchivedImage)]
            for image in images:
                for member, diff_id in zip(image.members, image.diff_ids):
                    reader.layer(member, contents.small.get(member), diff_id)
            reader.drop_held()
            uploads = pipeline.finish()
        except BaseException as e:
            pipeline.cancel(interrupted=isinstance(e, KeyboardInterrupt))
            if isinstance(e, Interrupted) and pipeline.failure is not None:
                raise pipeline.failure
            raise
        finally:
            pipeline.close()
    every = list(collections.OrderedDict((i.image_id, i) for i in images + [
        image for index in indexes for image in index.images.values()]).values())
    layers = [[reader.layer_record(contents, m, d, uploads) for m, d in zip(i.members, i.diff_ids)] for i in every]
    for record in {r.diff_id: r for rs in layers for r in rs if r.checked and r.diff_id in reader.unnamed}.values():
        name_layer(store, record, freshness)  # every check passed: name it
    for image, records in zip(every, layers):
        image_hex = digest_hex(image.image_id)
        if _keep_stored_image(store, image_hex, options.freshness(store)):
            progress.note("image %s is already stored" % image_hex[:12])
        else:
            _secure_and_write_image(store, freshness, image.image_id, image.config, records)
    for image in images:
        for ref in image.tags:
            write_tag(store, ref, digest_hex(image.image_id))
    for index in indexes:
        _keep_archived_index(store, freshness, index)
        progress.note("multi-platform image %s: %s" % (index.image_id[7:19], platform_list(index_images(index.root))))
    return chosen


def _keep_archived_index(store: Store, freshness: Freshness, index: ArchivedIndex) -> None:
    """Store every manifest of a multi-platform image byte for byte (its images' records are
    written), its index last; its tags once every manifest and every blob they name is there
    and stays so (Freshness.secure)."""
    must_exist = {}  # type: Dict[str, Optional[int]]
    for manifest in index.manifests:
        image = index.images.get(manifest.digest)
        blobs = manifest.blobs
        if image is not None:
            must_exist[image_key(digest_hex(image.image_id), "config.json")] = len(image.config)
            blobs = blobs[1:]
        must_exist.update((blob_key(digest), size) for digest, size in blobs)
        store.put_bytes(manifest_key(manifest.digest), manifest.data)  # again if there: a young copy
        freshness.written(manifest_key(manifest.digest))
        must_exist[manifest_key(manifest.digest)] = len(manifest.data)
    freshness.secure({}, must_exist)
    for ref in index.tags:
        point_tag(store, ref, TagTarget(None, index.image_id))


class ExportItem(NamedTuple):
    """An image to export, where it is stored, and the tags to give it in the archive."""

    found: FoundImage
    tags: List[ImageRef]


class ExportedManifest(NamedTuple):
    """A manifest kept byte for byte, exported as it is (--format oci): a multi-platform image's
    index (or with --platform, the manifest of its image for that platform), every manifest it
    reaches and every blob they name, and the tags to give it in the archive."""

    store: Store
    manifest: PushedManifest
    manifests: List[PushedManifest]    # every manifest it reaches, each once, children first, it last
    blobs: List[Tuple[str, int, str]]  # (digest, size, where the store holds it) of every blob they name, each once
    tags: List[ImageRef]


OciExport = Union[ExportItem, ExportedManifest]


def export_items(store: Store, texts: Sequence[str], progress: ProgressSink,
                 platform: Optional[PlatformSource] = None) -> List[ExportItem]:
    """Resolve every IMAGE argument (all before any byte is written); one item per image (of a
    multi-platform tag: the image for the platform)."""
    items = collections.OrderedDict()  # type: collections.OrderedDict
    for text in texts:
        found = find_image(store, text, progress, platform)
        key = (found.store.url, found.image_hex)
        item = items.setdefault(key, ExportItem(found, []))
        if found.ref is not None and found.ref not in item.tags:
            item.tags.append(found.ref)
    return list(items.values())


def oci_export_items(store: Store, texts: Sequence[str], progress: ProgressSink,
                     platform: Optional[Platform]) -> List[OciExport]:
    """export_items() for --format oci: a multi-platform tag is exported as stored, its index
    whole (with platform: the manifest of its image for that platform)."""
    items = collections.OrderedDict()  # type: collections.OrderedDict  # image hex or manifest digest -> item
    for text in texts:
        tagged = index_tag(store, text)
        if tagged is None:
            found = find_image(store, text, progress)
            item = items.setdefault((found.store.url, found.image_hex), ExportItem(found, []))
            ref = found.ref
        else:
            ref, index = tagged
            manifest = index
            if platform is not None:
                entry = choose_platform(index_images(index), platform, "%s in %s" % (ref, store.url))
                manifest = stored_manifest(store, entry.digest, "%s names it" % (ref,))
            if manifest.digest not in items:
                manifests, blobs = stored_manifest_tree(store, manifest)
                items[manifest.digest] = ExportedManifest(store, manifest, manifests, blobs, [])
            item = items[manifest.digest]
        if ref is not None and ref not in item.tags:
            item.tags.append(ref)
    return list(items.values())


def stored_manifest(store: Store, digest: str, why: str) -> PushedManifest:
    """A manifest the store keeps (NotFound naming why it is wanted, if it is gone)."""
    manifest = read_pushed_manifest(store, digest)
    if manifest is None:
        raise NotFound("%s: manifest %s is not stored (%s)" % (store.url, digest, why))
    return manifest


def stored_manifest_tree(store: Store, manifest: PushedManifest,
                         depth: int = ARCHIVE_INDEX_DEPTH) -> Tuple[List[PushedManifest], List[Tuple[str, int, str]]]:
    """Every manifest a stored manifest reaches (at most `depth` indexes deep; children first,
    it last) and (digest, size, key) of every blob they name, where the store holds it (for a
    chunked layer's uncompressed tar, which a push's manifests name: its index entry's key)."""
    manifests = collections.OrderedDict()  # type: collections.OrderedDict  # digest -> PushedManifest
    blobs = collections.OrderedDict()  # type: collections.OrderedDict  # digest -> (digest, size, key)

    def walk(manifest: PushedManifest, depth: int) -> None:
        if depth < 1:
            raise FormatError("%s: index %s nests indexes too deep" % (store.url, manifest.digest))
        for digest in manifest.children:
            if digest not in manifests:
                walk(stored_manifest(store, digest, "index %s names it" % manifest.digest), depth - 1)
        for digest, size in manifest.blobs:
            key = stored_blob_key(store, digest, size) if digest not in blobs else blobs[digest][2]
            if key is None:
                raise NotFound("%s: blob %s is not stored (manifest %s names it)"
                               % (store.url, digest, manifest.digest))
            blobs[digest] = (digest, size, key)
        manifests[manifest.digest] = manifest

    walk(manifest, depth)
    return list(manifests.values()), list(blobs.values())


def docker_archive_stream(items: Sequence[ExportItem], progress: ProgressSink) -> Iterator[bytes]:
    """A `docker save` archive of the items (what docker load and podman load read): layers as
    stored, each once, verified as they go; manifest.json with every image's tags last."""
    manifest, sent = [], set()  # type: List[Dict[str, Any]], Set[str]
    for item in items:
        store, image = item.found.store, item.found.image
        tags = [str(t) for t in item.tags] or None
        if image.legacy:
            result = {}  # type: Dict[str, Any]
            yield from legacy_members(store, image.legacy_chain, progress, sent, result)
            manifest.append({"Config": result["config"], "RepoTags": tags, "Layers": result["paths"]})
            continue
        config_name = "%s.json" % digest_hex(image.image_id)
        if config_name not in sent:
            sent.add(config_name)
            yield tar_bytes_member(config_name, verified_config(store, image))
        paths = []  # type: List[str]
        yield from stored_layer_members(store, image, lambda index: True, sent, progress, False, paths,
                                        ("exporting", "exported"))
        manifest.append({"Config": config_name, "RepoTags": tags, "Layers": paths})
    yield tar_bytes_member("manifest.json", json.dumps(manifest).encode())
    yield TAR_END


def oci_archive_stream(items: Sequence[OciExport], progress: ProgressSink) -> Iterator[bytes]:
    """An OCI image layout archive of the items (what skopeo, podman and ctr import read): the
    blobs as stored (a chunked layer: its uncompressed tar), each once; an image's manifest as
    the registry API serves it, a manifest kept byte for byte (a multi-platform image's index and
    all it reaches) as it is; index.json last."""
    yield tar_bytes_member("oci-layout", OCI_LAYOUT)
    descriptors, sent = [], set()  # type: List[Dict[str, Any]], Set[str]

    def blob(digest: str, data: bytes) -> bytes:
        name = "blobs/sha256/" + digest_hex(digest)
        if name in sent:
            return b""
        sent.add(name)
        return tar_bytes_member(name, data)

    for item in items:
        if isinstance(item, ExportedManifest):
            yield from exported_manifest_members(item, sent, progress)
            descriptor = {"mediaType": item.manifest.media_type, "digest": item.manifest.digest,
                          "size": len(item.manifest.data)}  # type: Dict[str, Any]
        else:
            store, image = item.found.store, item.found.image
            yield blob(image.image_id, verified_config(store, image))
            yield from stored_layer_members(store, image, lambda index: True, sent, progress, False, [],
                                            ("exporting", "exported"),
                                            lambda r: "blobs/sha256/" + digest_hex(r.tar_digest))
            manifest = registry_manifest(image, OCI_MANIFEST)
            yield blob(sha256_digest(manifest), manifest)
            descriptor = {"mediaType": OCI_MANIFEST, "digest": sha256_digest(manifest), "size": len(manifest)}
        for ref in item.tags:
            descriptors.append(dict(descriptor, annotations={IMAGE_NAME_ANNOTATION: full_image_name(ref),
                                                             REF_NAME_ANNOTATION: str(ref)}))
        if not item.tags:
            descriptors.append(descriptor)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    yield tar_bytes_member("index.json", json.dumps(index, sort_keys=True).encode())
    yield TAR_END


def exported_manifest_members(item: ExportedManifest, sent: Set[str], progress: ProgressSink) -> Iterator[bytes]:
    """Tar members of a manifest kept byte for byte: every blob its manifests name as stored,
    verified as they go, then the manifests as they are (each member once: `sent`)."""
    for digest, size, key in item.blobs:
        name = "blobs/sha256/" + digest_hex(digest)
        if name in sent:
            continue
        sent.add(name)
        task = progress.task(digest[7:19], "exporting", size) if not key.startswith("images/") else None  # not configs
        advance = task.advance if task else lambda n: None
        yield tar_header(name, size)
        if key == layer_index_key(digest):  # a chunked layer's tar (stored_manifest_tree)
            record = chunked_layer(item.store, digest)
            if record is None:
                raise NotFound("%s: layer %s is not stored any more" % (item.store.url, digest))
            yield from layer_tar_chunks(item.store, record, advance)
        else:
            yield from verified_blob_chunks(item.store, LayerRecord(digest, digest, size, "none"), advance, key=key)
        yield tar_padding(size)
        if task:
            task.finish("exported")
    for manifest in item.manifests:
        name = "blobs/sha256/" + digest_hex(manifest.digest)
        if name not in sent:
            sent.add(name)
            yield tar_bytes_member(name, manifest.data)


def write_archive(chunks: Iterable[bytes], path: str) -> None:
    """Write an archive to path: into a FIFO or a character device as it is (/dev/stdout, a pipe);
    else to a temp file beside the file, renamed onto it at the end, so a failure leaves no file.
    A symlink is written through, never replaced: its target gets the archive."""
    import tempfile  # lazy (start-up time): only writes and work directories need it
    target, direct = archive_target(path)
    if direct:
        with OutputFile(target) as out:
            for data in chunks:
                out.write(data)
        return
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".tmp-", dir=directory)
        os.close(fd)
    except OSError as e:
        raise DogestryError("cannot write %s: %s" % (path, _os_reason(e)))
    try:
        with OutputFile(tmp) as out:
            for data in chunks:
                out.write(data)
        try:
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except OSError as e:
            raise DogestryError("cannot write %s: %s" % (path, _os_reason(e)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def archive_target(path: str) -> Tuple[str, bool]:
    """Where export -o PATH writes: (path, True) for a FIFO or character device, written into as it
    is; else (the absolute path of the regular file to replace or create, False), symlinks followed.
    Other kinds of files (directories, sockets, block devices) are refused."""
    try:
        st = os.stat(path)  # through symlinks
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise DogestryError("cannot write %s: %s" % (path, _os_reason(e)))
    if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return path, True
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise DogestryError("cannot write %s: it is %s (export -o writes a file, a FIFO or a character device)"
                            % (path, _file_kind(st.st_mode)))
    return _symlink_end(path), False


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _symlink_end(path: str) -> str:
    """The absolute path a chain of symlinks at path ends at (path itself if it is none).  As the
    kernel's fs.protected_symlinks does for open(), a link in a sticky world-writable directory
    (/tmp) is followed only if the caller or the directory's owner owns it: the file renamed onto
    its target must not be one another user pointed the link at."""
    path = os.path.abspath(path)
    for _ in range(40):  # SYMLOOP_MAX
        try:
            link = os.lstat(path)
            if not stat.S_ISLNK(link.st_mode):
                return os.path.realpath(path)
            parent = os.stat(os.path.dirname(path))
            shared = parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH
            if shared and link.st_uid not in (os.geteuid(), parent.st_uid):
                raise DogestryError("cannot write %s: a symlink someone else owns in a shared directory "
                                    "(as the kernel's protected_symlinks, it is not followed)" % path)
            path = os.path.join(os.path.dirname(path), os.readlink(path))
        except FileNotFoundError:
            return os.path.realpath(path)
        except OSError as e:
            raise DogestryError("cannot write %s: %s" % (path, _os_reason(e)))
    raise DogestryError("cannot write %s: too many levels of symbolic links" % path)


# --- copy: store to store ---


def same_s3_endpoint(src: Store, dst: Store) -> bool:
    """Can dst copy src's objects server-side (two S3 stores on one endpoint)?"""
    return isinstance(src, S3Store) and isinstance(dst, S3Store) and not isinstance(src, PresignedS3Store) \
        and src.client.endpoint == dst.client.endpoint


def same_store(a: Store, b: Store) -> bool:
    """Do two stores name one place (a directory through a symlink, a bucket by two URLs)?"""
    if isinstance(a, LocalStore) and isinstance(b, LocalStore):
        return os.path.realpath(a.root) == os.path.realpath(b.root)
    return a.url == b.url and (not isinstance(a, S3Store) or same_s3_endpoint(a, b))


class BlobCopier:
    """Copies blobs (and a chunked layer's chunks) from one store to another: server-side between
    S3 buckets on one endpoint (falling back to streaming if dst's keys may not read src), else
    streamed and verified."""

    def __init__(self, src: Store, dst: Store, work_dir: str, progress: ProgressSink,
                 report: Optional[TransferReport] = None):
        self.src, self.dst, self.work_dir, self.progress = src, dst, work_dir, progress
        self.server_side = same_s3_endpoint(src, dst)
        self.report = report or TransferReport()  # the blobs copied
        self.chunk_hints = {}  # type: Dict[str, ChunkHint]  # chunks dst's recipes name: not asked about

    def copy(self, record: LayerRecord, freshness: Freshness) -> None:
        """Make dst hold record's blob: kept (and refreshed) if there, else copied and checked."""
        key = blob_key(record.digest)
        if self.dst.stat(key) == record.size:
            with contextlib.suppress(StoreError):  # S3 refreshes at most 5 GiB in place: copy it again
                if self.dst.touch(key):
                    freshness.refreshed()
                    return
        task = self.progress.task(record.diff_id[7:19], "copying", record.size)
        if self.server_side and self._server_side(key, record):
            task.advance(record.size)
            task.finish("copied (server-side)")
        else:
            self._stream(key, record, task)
            task.finish("copied")
        self.report.add(record.digest, record.size)

    def copy_chunks(self, record: LayerRecord, freshness: Freshness) -> None:
        """Make dst hold every chunk a chunked layer's recipe (in src) names, CHUNK_FETCHES at a
        time: kept (relied on, as a push does) if there, else copied."""
        chunks = dict(read_recipe(self.src, record).chunks)  # each chunk once
        task = self.progress.task(record.diff_id[7:19], "copying chunks", sum(chunks.values()))
        with thread_pool(CHUNK_FETCHES, "dogestry-chunks") as pool:
            futures = [pool.submit(self._copy_chunk, record, chunk_hex, size, freshness, task)
                       for chunk_hex, size in sorted(chunks.items())]
            try:
                copied = sum(future.result() for future in futures)
            finally:
                for future in futures:
                    future.cancel()
        task.finish("%d chunks, %d copied" % (len(chunks), copied))

    def _copy_chunk(self, record: LayerRecord, chunk_hex: str, size: int, freshness: Freshness,
                    task: TaskSink) -> bool:
        """Copy one chunk unless dst has it; whether it was copied."""
        key = chunk_key(chunk_hex)
        hint = self.chunk_hints.get(chunk_hex)
        if hint is not None:  # relied on through its recipe, as a push does
            hint.rely(freshness)
            self.report.add_chunk(key, None)
            task.advance(size)
            return False
        age = self.dst.age(key)
        if age is not None:
            freshness.relied_on(key, age)
            self.report.add_chunk(key, None)
        else:
            stored = self._server_side_chunk(key, record) if self.server_side else None
            if stored is None:
                stored = self._stream_chunk(key, record, chunk_hex, size)
            freshness.written(key)
            self.report.add_chunk(key, stored)
        task.advance(size)
        return age is None

    def missing_chunk(self, key: str, record: LayerRecord) -> IntegrityError:
        """The error of a chunk src lacks."""
        return IntegrityError("%s: chunk %s of layer %s is missing (deleted by hand?); nothing was tagged"
                              % (self.src.url, key[len(CHUNK_PREFIX):][:12], record.diff_id))

    def _server_side_chunk(self, key: str, record: LayerRecord) -> Optional[int]:
        """Copy a chunk server-side; its size (None: dst may not read src, stream it)."""
        stored = self.src.stat(key)
        if stored is None:
            raise self.missing_chunk(key, record)
        try:
            if self._server_side(key, record._replace(size=stored)):
                return stored
        except S3Error as e:
            if e.status == 404 or e.code == "NoSuchKey":
                raise self.missing_chunk(key, record)
            raise
        return None

    def _stream_chunk(self, key: str, record: LayerRecord, chunk_hex: str, size: int) -> int:
        """Copy a chunk through this machine, checked against its name and size; its stored size."""
        try:
            data = self.src.get_bytes(key, limit=CHUNK_OBJECT_MAX)
        except NotFound:
            raise self.missing_chunk(key, record)
        try:
            unpacked = unpack_chunk(data, size)
        except zlib.error:
            unpacked = b""
        if len(unpacked) != size or hashlib.sha256(unpacked).hexdigest() != chunk_hex:
            raise IntegrityError("%s: chunk %s of layer %s is corrupt; nothing was tagged"
                                 % (self.src.url, chunk_hex[:12], record.diff_id))
        self.dst.put_bytes(key, data, if_absent=True)
        return len(data)

    def _server_side(self, key: str, record: LayerRecord) -> bool:
        src, dst = self.src, self.dst
        assert isinstance(src, S3Store) and isinstance(dst, S3Store)
        try:
            dst.client.copy_object(src.location.bucket, src._key(key), dst._key(key), record.size)
        except S3Error as e:
            if e.status != 403 and e.code != "AccessDenied":
                raise
            self.progress.note("%s may not read %s (%s): copying through this machine instead"
                               % (dst.url, src.url, e.code or e.status))
            self.server_side = False
            return False
        return True  # its size is checked with every blob's before the image is written (Freshness.secure)

    def _stream(self, key: str, record: LayerRecord, task: TaskSink) -> None:
        if isinstance(self.src, LocalStore) and isinstance(self.dst, S3Store):
            self._upload_file(self.dst, self.src.path(key), key, record, task)
            return
        path = os.path.join(self.work_dir, "blob-" + digest_hex(record.digest))
        with OutputFile(path, self.dst.keeps_files) as out:
            for data in verified_blob_chunks(self.src, record, task.advance):
                out.write(data)
        self.dst.put_file(key, path, record.size, record.digest, consume=True)

    def _upload_file(self, dst: "S3Store", path: str, key: str, record: LayerRecord, task: TaskSink) -> None:
        """Send a directory store's blob file straight to S3, checked against its digest as it goes."""
        corrupt = IntegrityError("%s: blob %s is corrupt; nothing was copied" % (self.src.url, record.digest))
        try:
            if os.path.getsize(path) != record.size:
                raise corrupt
            dst.put_verified(key, path, record.size, record.digest, task.advance)
        except IntegrityError:
            raise corrupt
        except OSError as e:
            raise StoreError("%s: cannot read %s: %s" % (self.src.url, key, _os_reason(e)))


def copy_tag_manifest(dst: Store, ref: ImageRef, manifest: Optional[PushedManifest]) -> None:
    """The manifest an image tag of src was pushed with through the registry (tag_pushed_manifest),
    to dst too (before the tag), so dst's registry serves the same digest; where dst lacks a blob it
    names (the image was stored there by `dogestry push`, with blobs of its own), dst serves its own."""
    if manifest is None or any(stored_blob_key(dst, digest, size) is None for digest, size in manifest.blobs):
        return
    if dst.stat(manifest_key(manifest.digest)) != len(manifest.data):
        dst.put_bytes(manifest_key(manifest.digest), manifest.data)
    dst.put_bytes(tag_manifest_key(ref), manifest.digest.encode())


def copy_image(found: FoundImage, dst: Store, copier: BlobCopier, progress: ProgressSink,
               options: PushOptions, freshness: Optional[Freshness] = None) -> str:
    """Store an image of one store in another (the original layout becomes the current one):
    only the layers dst lacks, image last; return its image ID.  freshness: the one of a tag
    this image is part of (an index's), else the image's own."""
    src, image = found.store, found.image
    if image.legacy:
        progress.note("%s is in the original dogestry layout: storing it in the current one" % found.image_hex[:12])
        return migrate_image(src, found.image_hex, progress, options, target=dst)
    image_hex = digest_hex(image.image_id)
    freshness = freshness or options.freshness(dst)
    if _keep_stored_image(dst, image_hex, freshness):
        progress.note("%s: image %s is already stored" % (dst.url, image_hex[:12]))
        return image.image_id
    config = verified_config(src, image)

    def copy_layer(record: LayerRecord) -> LayerRecord:
        stored = reused_layer(dst, record.diff_id, freshness)
        if stored is not None:
            return stored
        if record.chunked:  # its chunks, then its recipe, then its index entry
            copier.copy_chunks(record, freshness)
        copier.copy(record, freshness)
        name_layer(dst, record, freshness)
        return record

    unique = list({r.diff_id: r for r in image.layers}.values())
    pool = thread_pool(min(4, max(1, len(unique))), "dogestry-copy")
    try:
        copied = {r.diff_id: r for r in pool.map(copy_layer, unique)}
    except BaseException as e:
        for store in (src, dst):
            store.cancel(interrupted=isinstance(e, KeyboardInterrupt))
        raise
    finally:
        pool.shutdown(wait=True)
    _secure_and_write_image(dst, freshness, image.image_id, config, [copied[r.diff_id] for r in image.layers])
    return image.image_id

# --- copy: manifests pushed through the registry (indexes, their images, referrers) ---
#
# A tag of an index (or an artifact) is copied with every manifest it reaches, byte for byte
# (digests unchanged): the manifests the index names, recursively (each platform's image, the
# attestations), and the manifests whose subject is one of them (signatures, SBOMs), recursively.
# A tag of an image takes along the referrers of the manifests the registry serves for it.  All
# of it is read from SRC before anything is written; in DST each image is stored as copy_image
# stores it, every other blob a manifest names under its digest, an index after the manifests it
# names, the tag last, once everything it reaches is stored and checked (Freshness.secure).

REFERRER_LISTING_TAGS = 5  # a copy of more tags than this (or --all) lists manifests/referrers/ once, whole


class ReferrerLister:
    """The referrers SRC lists for a subject (manifests/referrers/<subject hex>/): one listing per
    subject, or (whole=True, for copies of many tags) one listing of every subject's at the first ask."""

    def __init__(self, store: Store, whole: bool = False):
        self.store, self.whole = store, whole
        self._all = None  # type: Optional[Dict[str, List[str]]]

    def referrers(self, subject: str) -> List[str]:
        """The digests of the manifests whose subject is `subject`."""
        if not self.whole:
            return self._digests(self.store.list("manifests/referrers/%s/" % digest_hex(subject)))
        if self._all is None:
            grouped = collections.defaultdict(list)  # type: Dict[str, List[str]]
            for key in self.store.list("manifests/referrers/"):
                grouped[key.split("/")[2]].append(key)
            self._all = {subject_hex: self._digests(keys) for subject_hex, keys in grouped.items()}
        return self._all.get(digest_hex(subject), [])

    @staticmethod
    def _digests(keys: Iterable[str]) -> List[str]:
        parts = (key.split("/") for key in keys)
        return ["sha256:" + p[3] for p in parts if len(p) == 4 and _HEX64.match(p[2]) and _HEX64.match(p[3])]


COPY_MANIFESTS_LIMIT = 20000  # the most manifests one copy reads (a store a hostile writer made may hold more)


def manifests_reached(store: Store, roots: Sequence[str], subjects: Sequence[str],
                      lister: ReferrerLister) -> List[PushedManifest]:
    """Every manifest of store the roots reach (the manifests an index names, recursively) and
    the referrers of those and of `subjects` (recursively), each once, the manifests an index
    names before it; NotFound if one is not stored, FormatError past COPY_MANIFESTS_LIMIT."""
    found = collections.OrderedDict()  # type: collections.OrderedDict[str, PushedManifest]
    todo = collections.deque((digest, "the tag") for digest in roots)
    todo.extend((digest, "the referrers of %s" % subject) for subject in subjects for digest in lister.referrers(subject))
    while todo:
        digest, named_by = todo.popleft()
        if digest in found:
            continue
        if len(found) >= COPY_MANIFESTS_LIMIT:
            raise FormatError("%s: what is copied reaches more than %d manifests (indexes, their manifests and "
                              "referrers); nothing was copied" % (store.url, COPY_MANIFESTS_LIMIT))
        manifest = read_pushed_manifest(store, digest)
        if manifest is None:
            raise NotFound("%s: manifest %s, which %s names, is not stored; nothing was copied"
                           % (store.url, digest, named_by))
        found[digest] = manifest
        todo.extend((child, digest) for child in manifest.children)
        todo.extend((referrer, "the referrers of %s" % digest) for referrer in lister.referrers(digest))
    return children_first(found)


def children_first(found: Mapping[str, PushedManifest]) -> List[PushedManifest]:
    """The manifests, each after every manifest it names (without recursion: a chain of nested
    indexes may be deeper than Python's stack)."""
    ordered, placed = [], set()  # type: List[PushedManifest], Set[str]
    for manifest in found.values():
        stack = [(manifest, False)]
        while stack:
            current, expanded = stack.pop()
            if current.digest in placed:
                continue
            if expanded:
                placed.add(current.digest)
                ordered.append(current)
                continue
            stack.append((current, True))
            stack.extend((found[child], False) for child in reversed(current.children) if child not in placed)
    return ordered


def served_digests(store: Store, found: FoundImage, pushed: Optional[PushedManifest]) -> List[str]:
    """The manifest digests the registry serves for an image (its referrers' subjects): the manifest
    its tag was pushed with, and the ones made from it (none for the original layout)."""
    if found.image.legacy:
        return []
    made = [sha256_digest(registry_manifest(found.image, kind)) for kind in (OCI_MANIFEST, DOCKER_MANIFEST)]
    return ([pushed.digest] if pushed is not None else []) + made


def _manifest_image(store: Store, manifest: PushedManifest) -> Optional[str]:
    """The image hex of an image manifest whose image record the store holds (None: none)."""
    if manifest.is_index or manifest.doc["config"]["mediaType"] not in IMAGE_CONFIG_TYPES:
        return None
    image_hex = digest_hex(manifest.doc["config"]["digest"])
    return image_hex if store.stat(image_key(image_hex, "manifest.json")) is not None else None


def copy_blob(src: Store, dst: Store, digest: str, size: int, copier: BlobCopier,
              freshness: Freshness) -> StoredBlob:
    """Store a blob a manifest names in dst under blobs/ (checked against its digest), or for a
    chunked layer's uncompressed tar the layer, chunked as in src (copy_chunked_tar); where dst holds it."""
    found = stored_blob(src, digest, size)
    if found is None:
        raise NotFound("%s: blob %s (%d bytes) is not stored; nothing was tagged" % (src.url, digest, size))
    if found.layer is not None:
        return StoredBlob(copy_chunked_tar(src, dst, found.layer, copier, freshness), found.layer)
    source, key = found.key, blob_key(digest)
    if source == key:
        copier.copy(LayerRecord(digest, digest, size, "none"), freshness)
    else:  # an image config, kept only in its image record
        data = src.get_bytes(source, limit=DOCUMENT_LIMIT)
        if sha256_digest(data) != digest:
            raise IntegrityError("%s: %s is not blob %s" % (src.url, source, digest))
        dst.put_bytes(key, data)
    freshness.written(key)
    return StoredBlob(key)


def copy_chunked_tar(src: Store, dst: Store, record: LayerRecord, copier: BlobCopier, freshness: Freshness) -> str:
    """For a blob a manifest names that is a chunked layer's uncompressed tar (its diffID, as
    manifests made from images name it): make dst hold the layer, chunked as in src (kept if dst
    has it so); return its index entry's key."""
    key = layer_index_key(record.diff_id)
    held = chunked_layer(dst, record.diff_id)
    if held is not None and held.tar_size == record.tar_size:
        freshness.seen(key, dst.age(key))
        return key
    copier.copy_chunks(record, freshness)
    copier.copy(record, freshness)
    name_layer(dst, record, freshness)
    return key


def copy_manifests(src: Store, dst: Store, manifests: Sequence[PushedManifest], copier: BlobCopier,
                   progress: ProgressSink, options: PushOptions, freshness: Freshness,
                   copied: Dict[Tuple[str, str], str]) -> Tuple[Dict[str, Optional[int]], Dict[str, Callable[[], None]]]:
    """Store manifests of src in dst, byte for byte, with what they name (the images as copy_image
    stores them, only what dst lacks; every other blob) and their referrer listings, the manifests
    an index names before it.  Return what a tag of them relies on: key -> size, and how to write
    again the keys written here (for Freshness.secure)."""
    for manifest in manifests:
        image_hex = _manifest_image(src, manifest)
        if image_hex is not None and (src.url, image_hex) not in copied:
            found = FoundImage(src, image_hex, None, load_stored_image(src, image_hex))
            copied[(src.url, image_hex)] = copy_image(found, dst, copier, progress, options, freshness)
    must_exist, rewrite = {}, {}  # type: Dict[str, Optional[int]], Dict[str, Callable[[], None]]
    for digest, size in sorted({blob for manifest in manifests for blob in manifest.blobs}):
        held = stored_blob(dst, digest, size)
        if held is None:
            held = copy_blob(src, dst, digest, size, copier, freshness)
        else:
            freshness.seen(held.key, dst.age(held.key))
        must_exist.update(held.must_exist(size))
    for manifest in manifests:
        key = manifest_key(manifest.digest)
        rewrite[key] = functools.partial(dst.put_bytes, key, manifest.data)
        _keep_or_write(dst, key, len(manifest.data), rewrite[key], freshness)
        must_exist[key] = len(manifest.data)
        if manifest.subject:
            listing = referrer_key(manifest.subject, manifest.digest)
            rewrite[listing] = functools.partial(write_json, dst, listing, manifest.descriptor())
            _keep_or_write(dst, listing, None, rewrite[listing], freshness)
            must_exist[listing] = None
    return must_exist, rewrite


def _keep_or_write(store: Store, key: str, size: Optional[int], write: Callable[[], None], freshness: Freshness) -> None:
    """Keep a small key store holds already (of that size, if given), else write it."""
    age = store.age(key)
    if age is not None and (size is None or store.stat(key) == size):
        freshness.seen(key, age)
        return
    write()
    freshness.written(key)


class CopyItem(NamedTuple):
    """What one argument of copy names in SRC: an image, or a tag naming a manifest pushed through
    the registry (an index, an artifact); and the manifests that go with it (all that the tag's
    manifest reaches; for an image, its referrers)."""

    text: str
    ref: Optional[ImageRef]
    image: Optional[FoundImage]
    pushed: Optional[PushedManifest]  # an image tag's: the manifest it was pushed with; else the tag's manifest
    manifests: List[PushedManifest]

    @property
    def tag_content(self) -> str:
        """What the tag holds in SRC (what check_tag_may_move compares)."""
        if self.image is not None:
            return self.image.image_hex
        assert self.pushed is not None
        return "@" + self.pushed.digest


def copy_item(src: Store, text: str, progress: ProgressSink, lister: ReferrerLister) -> CopyItem:
    """Resolve one argument of copy, reading from SRC every manifest that goes with it."""
    ref = None  # type: Optional[ImageRef]
    with contextlib.suppress(UsageError):
        ref = parse_image_ref(text)
    target = None  # type: Optional[TagTarget]
    if ref is not None:
        with contextlib.suppress(NotFound):
            target = read_tag_target(src, ref)
    if ref is not None and target is not None and target.manifest is not None:
        manifests = manifests_reached(src, [target.manifest], [], lister)
        root = next(m for m in manifests if m.digest == target.manifest)
        return CopyItem(text, ref, None, root, manifests)
    found = find_image(src, text, progress)
    pushed = tag_pushed_manifest(found.store, found.ref, found.image_hex) \
        if found.ref is not None and not found.image.legacy else None
    subjects = served_digests(found.store, found, pushed)
    return CopyItem(text, found.ref, found, pushed, manifests_reached(found.store, [], subjects, lister))


def copy_manifest_tag(item: CopyItem, src: Store, dst: Store, copier: BlobCopier, progress: ProgressSink,
                      options: PushOptions, copied: Dict[Tuple[str, str], str]) -> str:
    """Copy a tag naming an index or an artifact with everything it reaches; the tag last.  Its digest."""
    assert item.ref is not None and item.pushed is not None
    freshness = options.freshness(dst)
    must_exist, rewrite = copy_manifests(src, dst, item.manifests, copier, progress, options, freshness, copied)
    freshness.secure(rewrite, must_exist)
    point_tag(dst, item.ref, TagTarget(None, item.pushed.digest))
    if item.pushed.is_index:
        progress.note("%s: the index of %s, with %d more manifests" % (
            item.ref, platform_list(index_images(item.pushed)), len(item.manifests) - 1))
    return item.pushed.digest


def copy_image_tag(item: CopyItem, dst: Store, copier: BlobCopier, progress: ProgressSink, options: PushOptions,
                   copied: Dict[Tuple[str, str], str]) -> str:
    """Copy an image (and the manifest its tag was pushed with, and its referrers); its tag last.  Its ID."""
    image = item.image
    assert image is not None
    freshness = options.freshness(dst)
    key = (image.store.url, image.image_hex)
    if key not in copied:
        copier.chunk_hints = {}
        if item.ref is not None and any(r.chunked for r in image.image.layers):
            with contextlib.suppress(DogestryError):  # (hints only)
                platform = stored_image_platform(image.store, image.image)
                copier.chunk_hints = chunk_hints(dst, item.ref, platform, freshness.clock)
        copied[key] = copy_image(image, dst, copier, progress, options, freshness)
    image_id = copied[key]
    if item.manifests:
        must_exist, rewrite = copy_manifests(image.store, dst, item.manifests, copier, progress, options, freshness,
                                             copied)
        freshness.secure(rewrite, must_exist)
    if item.ref is not None:
        copy_tag_manifest(dst, item.ref, item.pushed)
        write_tag(dst, item.ref, digest_hex(image_id))
    return image_id


# === 19. The accelerator server (-server) ===
#
# Speaks just enough of the Docker Engine API for `docker pull` and dogestry clients:
# HEAD/GET /_ping, GET /version, POST /images/create, the original's /status/check, and
# POST /dogestry/v1/pull (delegated pulls with presigned URLs).  Everything else is
# refused; nothing is ever proxied to dockerd.  See the README's security model.

SERVER_MAX_PULLS = 2
SERVER_MAX_CONNECTIONS = 512  # the most connections served at once by default, open files permitting
# Open files a server keeps for itself, out of its open-files limit (RLIMIT_NOFILE):
SERVER_OWN_FILES = 32   # stdio, the listening socket, the spare, the selector, the registry's index readers (8)
SERVER_PULL_FILES = 24  # a pull: its docker connections (two pipelined loads, inspect and tag) and S3
                        # connections (two tar streams, each reading a blob with 4 ranged GETs, and more)
SERVER_CONNECTION_FILES = 2  # a client's connection: its socket, and the store connection or file its thread reads
SERVER_BODY_LIMIT = 1 << 20
SERVER_BACKLOG = 1024  # a burst of connections waits in the kernel, not in SYN retries (capped by somaxconn)
SERVER_WRITE_TIMEOUT = 60.0
NOT_SERVED = "dogestry server: %s is not served (only image pulls are)"
_VERSION_PREFIX = re.compile(r"^/v[0-9]+(?:\.[0-9]+)?(/.*)$")
_TAGS_ROUTE = re.compile(r"^/v2/(.+)/tags/list$")
_CONTENT_ROUTE = re.compile(r"^/v2/(.+)/(manifests|blobs)/([^/]+)$")
_REFERRERS_ROUTE = re.compile(r"^/v2/(.+)/referrers/([^/]+)$")
_UPLOADS_ROUTE = re.compile(r"^/v2/(.+)/blobs/uploads/([^/]*)$")
_CHUNK_RANGE = re.compile(r"^(?:bytes[ =])?([0-9]{1,30})-([0-9]{1,30})(?:/(?:[0-9]{1,30}|\*))?$")
_PRESIGN_PARAMS = frozenset(("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                             "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token", "x-id"))
_BLOB_KEY = re.compile(r"^blobs/sha256/[0-9a-f]{64}$")
_INDEX_PULL_KEY = re.compile(r"^(?:manifests/sha256/[0-9a-f]{64}|images/[0-9a-f]{64}/(?:manifest|config)\.json)$")


def _is_registry_path(target: str) -> bool:
    path = urllib.parse.urlsplit(target).path
    return path == "/v2" or path.startswith("/v2/")


class ServerLimits(NamedTuple):
    """What one server lets its clients hold: connections, request time, pulls."""

    max_connections: int = SERVER_MAX_CONNECTIONS
    read_timeout: float = 30.0      # from waiting for a request to the end of its body
    max_pulls: int = SERVER_MAX_PULLS
    pulls_per_client: int = 1


class StoreChoice(NamedTuple):
    """A store a request may read: its URL, and whose identity pays for the reads."""

    url: str                        # a directory or an s3:// URL (for messages and shared pulls)
    own: bool                       # the server's own store, read with the server's identity
    location: Optional[S3Location]  # the S3 location (None for a directory store)


def s3_url(location: S3Location) -> str:
    """An S3 location as an s3:// URL, with its region, endpoint and profile if it has them."""
    query = [(k, v) for k, v in (("region", location.region), ("endpoint", location.endpoint),
                                 ("profile", location.profile)) if v]
    return "s3://%s/%s" % (location.bucket, location.prefix) + ("?" + urllib.parse.urlencode(query) if query else "")


def _under(location: S3Location, base: S3Location) -> bool:
    return location.bucket == base.bucket and location.prefix.startswith(base.prefix)


class ServerPolicy:
    """Which stores and image names a server's clients may use: its STORE, -allow and -registry.

    choose() is the one place that decides whether a store is the server's own (read with
    its identity) or one the client pays for with its own keys; client query strings never
    choose an endpoint or a region.
    """

    def __init__(self, own: Optional[str], allowed: Sequence[str], registries: Sequence[str],
                 env_endpoint: Optional[str]):
        self.own = own
        self.own_location = parse_s3_url(own) if own and own.startswith("s3://") else None
        self.allowed = [self._allowed_entry(url) for url in allowed]
        self.registries = {self._registry_entry(name) for name in registries}
        self.endpoint = (self.own_location.endpoint if self.own_location else None) or env_endpoint
        self.region = self.own_location.region if self.own_location else None

    @staticmethod
    def _allowed_entry(url: str) -> S3Location:
        location = parse_s3_url(url)
        if location.endpoint or location.region or location.profile:
            raise UsageError("-allow takes s3://bucket/prefix/ (the server's own endpoint and region apply)")
        return location

    @staticmethod
    def _registry_entry(name: str) -> str:
        host, parts = split_registry(name.lower() + "/x")
        if parts != ["x"] or not re.match(r"^%s$" % _DOMAIN, host):
            raise UsageError("invalid -registry %r: expected a registry host name like registry.example.com[:5000]"
                             % name)
        return host

    @property
    def is_open(self) -> bool:
        """No store and no -allow: any client may name any bucket (the original's behaviour)."""
        return not self.own and not self.allowed

    def image_path(self, name: str) -> List[str]:
        """The path components of an image name, if -registry lets clients pull under its host."""
        host, parts = split_registry(name)
        if self.registries and host not in self.registries:
            raise Refused("this server does not serve images of %s (it serves %s)"
                          % (host, ", ".join(sorted(self.registries))))
        return parts

    def choose(self, named: Optional[str], prefix: str, has_keys: bool) -> StoreChoice:
        """The store a client may read for an image under `prefix` when it names `named` (or none)."""
        if not named or named == self.own:
            if not self.own:
                raise UsageError("no store: log in with `dogestry login` (S3_URL) or start the server with a store")
            if self.own_location:
                return self._s3_choice(self.own_location._replace(prefix=self.own_location.prefix + prefix), True)
            return StoreChoice(self.own.rstrip("/") + "/" + prefix, True, None)
        if not named.startswith("s3://"):
            raise UsageError("only s3:// stores may be named by clients (got %r)" % named[:100])
        location = parse_s3_url(named)
        if location.endpoint or location.region or location.profile:
            raise Refused("this server does not take S3 endpoints, regions or profiles from clients: "
                          "name the store as s3://bucket/prefix/")
        location = location._replace(prefix=location.prefix + prefix)
        if self.own_location and _under(location, self.own_location):
            return self._s3_choice(location, True)
        if not has_keys:  # never lend the server's own AWS identity to a client's choice of bucket
            raise Refused("a store named by the client needs its AWS keys (dogestry login)")
        if not self.is_open and not any(_under(location, a) for a in self.allowed):
            raise Refused("s3://%s/%s is not a store this server serves (see its -allow list)"
                          % (location.bucket, location.prefix))
        return self._s3_choice(location, False)

    def _s3_choice(self, location: S3Location, own: bool) -> StoreChoice:
        location = location._replace(region=self.region, endpoint=self.endpoint)
        return StoreChoice(s3_url(location), own, location)

    def presigned_region(self, url: str, location: S3Location, key: str) -> str:
        """Check that a presigned URL reads exactly `key` of `location` on this server's S3
        endpoint (so a client cannot point the server anywhere else); return its region."""
        parts = urllib.parse.urlsplit(url)
        try:
            pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise Refused("bad presigned URL for %s" % key)
        names = [name for name, _ in pairs]
        scope = dict(pairs).get("X-Amz-Credential", "").split("/")
        if len(names) != len(set(names)) or not set(names) <= _PRESIGN_PARAMS or len(scope) != 5 \
                or not _REGION_RE.match(scope[2]) or "X-Amz-Signature" not in names:
            raise Refused("bad presigned URL for %s" % key)
        scheme, host, port, base = s3_target(location.bucket, scope[2], location.endpoint)
        try:
            url_port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            url_port = -1
        if (parts.scheme, parts.hostname, url_port, parts.path) != (
                scheme, host, port, uri_encode(base + "/" + location.prefix + key, safe="/")) \
                or parts.username or parts.password or parts.fragment:
            raise Refused("the presigned URL for %s does not point to s3://%s/%s on this server's S3 endpoint"
                          % (key, location.bucket, location.prefix))
        return scope[2]

    def presigned_chunks(self, location: S3Location, chunks: Any) -> Tuple[Dict[str, str], str]:
        """The URLs of a delegated pull's chunks (key -> URL), made for `location` from the query
        they share and each chunk's signature (section 15), checked as presigned_region checks
        any; and their region."""
        if not isinstance(chunks, dict) or not isinstance(chunks.get("query"), str) or \
                not isinstance(chunks.get("signatures"), dict):
            raise UsageError("a delegated pull's chunks need a query and signatures")
        signatures = chunks["signatures"]  # type: Dict[Any, Any]
        if len(signatures) > DELEGATION_CHUNKS_MAX:
            raise UsageError("a delegated pull carries at most %d chunks (not %d)"
                             % (DELEGATION_CHUNKS_MAX, len(signatures)))
        if not all(isinstance(h, str) and _HEX64.match(h) and isinstance(v, str) and _HEX64.match(v)
                   for h, v in signatures.items()):
            raise UsageError("a delegated pull's chunks are sha256 hex digests, each with a signature of 64 hex "
                             "digits")
        query = chunks["query"]  # type: str
        scope = dict(urllib.parse.parse_qsl(query)).get("X-Amz-Credential", "").split("/")
        if len(scope) != 5 or not _REGION_RE.match(scope[2]):
            raise Refused("bad presigned URL for the chunks")
        region = scope[2]
        scheme, host, port, base = s3_target(location.bucket, region, location.endpoint)
        netloc = "[%s]" % host if ":" in host else host
        if port != (443 if scheme == "https" else 80):
            netloc += ":%d" % port
        urls = {chunk_key(h): "%s://%s%s?%s&X-Amz-Signature=%s" % (
            scheme, netloc, uri_encode(base + "/" + location.prefix + chunk_key(h), safe="/"), query, signature)
            for h, signature in signatures.items()}
        for key, url in itertools.islice(urls.items(), 1):  # they differ only in the chunk and the signature
            region = self.presigned_region(url, location, key)
        return urls, region


class JsonProgress:
    """Progress as docker's JSON lines, written to an HTTP response."""

    def __init__(self, emit: Callable[[Dict[str, Any]], None], clock: Callable[[], float] = time.monotonic):
        self.emit, self.clock = emit, clock

    def note(self, message: str) -> None:
        self.emit({"status": message})

    def task(self, label: str, action: str, total: Optional[int]) -> "JsonTask":
        return JsonTask(self, label, action.capitalize(), total)


class JsonTask:
    """One layer's progress lines (throttled to a few a second)."""

    def __init__(self, owner: JsonProgress, label: str, action: str, total: Optional[int]):
        self.owner, self.label, self.action, self.total = owner, label, action, total
        self.current, self.last = 0, 0.0
        owner.emit({"status": action, "id": label})

    def advance(self, n: int) -> None:
        self.current += n
        now = self.owner.clock()
        if now - self.last >= 0.25:
            self.last = now
            detail = {"current": self.current}
            if self.total:
                detail["total"] = self.total
            self.owner.emit({"status": self.action, "id": self.label, "progressDetail": detail,
                             "progress": human_size(self.current) + ("/" + human_size(self.total) if self.total else "")})

    def rename(self, label: str) -> None:
        self.label = label

    def phase(self, action: str, total: Optional[int], summary: Optional[str] = None) -> None:
        self.action, self.total, self.current, self.last = action.capitalize(), total, 0, 0.0
        self.owner.emit({"status": self.action, "id": self.label})

    def finish(self, status: str = "done") -> None:
        self.owner.emit({"status": status.capitalize(), "id": self.label})


class Located(NamedTuple):
    """A stored image found for a pull, what it is called there, and the key under which
    identical pulls share one download (and its platform, if chosen from a multi-platform tag)."""

    store: Store
    image: StoredImage
    label: str
    share_key: str
    platform: Optional[Platform] = None


class PullRequest(NamedTuple):
    """A pull a client asked for: how to find the image, the name to give it, who asked."""

    locate: Callable[[], Located]
    tag_as: Optional[ImageRef]
    client: str


class DogestryServer(_ThreadingHTTPServer):
    """The accelerator: pulls from a store into the local dockerd, for docker and dogestry clients.

    Connections are bounded (when all are taken, the one that has waited longest for its
    request is closed to make room), each request must arrive within the read timeout, and
    running out of file descriptors sheds new connections instead of spinning.  Made by
    http_server_class(), which puts it on the standard library's threading HTTP server.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = SERVER_BACKLOG
    handler_class: Type[ServerHandler]  # set by http_server_class()

    def __init__(self, address: Tuple[str, int], docker: DockerClient, policy: ServerPolicy,
                 open_store: Callable[[StoreChoice, Optional[Credentials]], Store],
                 presigned_store: Callable[[S3Location, Dict[str, str], Dict[str, int]], Store],
                 log: IO[str], errors: IO[str], tls: Optional[ssl.SSLContext] = None,
                 limits: ServerLimits = ServerLimits(), private: str = "", registry: Optional[Registry] = None,
                 htpasswd: Optional[Htpasswd] = None, redirect: bool = True, anonymous_push: bool = False,
                 uploads: Optional[BlobUploads] = None):
        super().__init__(address, self.handler_class)
        self.docker, self.policy, self.open_store, self.presigned_store = docker, policy, open_store, presigned_store
        self.log, self.errors, self.tls, self.limits = log, errors, tls, limits
        self.registry, self.htpasswd, self.redirect = registry, htpasswd, redirect
        self.anonymous_push = anonymous_push  # -anonymous-push: anyone who reaches the port may push
        self.uploads = uploads  # the registry's blob uploads (with a registry)
        self.inflight = {}  # type: Dict[str, "concurrent.futures.Future[str]"]
        self.inflight_lock = threading.Lock()
        self.log_lock = threading.Lock()
        self.slots = threading.Condition()
        self.pulls_by_client = collections.Counter()  # type: collections.Counter
        self.connections = {}  # type: Dict[Any, Optional[float]]
        # socket -> since when it waits for a request (None: busy with one)
        self.connections_lock = threading.Lock()
        self.stopping = False  # set by server_close()
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)  # given up to shed a connection at EMFILE
        self._api_version = None  # type: Optional[str]
        self._engine_platform = None  # type: Optional[Platform]
        self._private = private  # a directory store's path: never shown to clients

    # -- connections --

    def get_request(self) -> Tuple[Any, Any]:
        """accept(), shedding a connection when out of file descriptors; TLS is set up (not shaken) here."""
        try:
            sock, address = self.socket.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self._shed_connection()
            raise
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                sock.close()
                raise
        return sock, address

    def _shed_connection(self) -> None:
        """Out of file descriptors: close the spare one, accept and close the next connection with
        it, take it back.  Without this, the listener stays readable and the loop spins."""
        if self._spare_fd < 0:
            return
        os.close(self._spare_fd)
        self._spare_fd = -1
        try:
            sock, _ = self.socket.accept()
            sock.close()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        self.log_line("-", "out of file descriptors: a new connection was closed at once")

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection within the bound, closing the longest-waiting idle one if need be."""
        import socket  # lazy (start-up time): only commands that talk to a network need it
        with self.connections_lock:
            if len(self.connections) >= self.limits.max_connections:
                idle = [(since, id(s), s) for s, since in self.connections.items() if since is not None]
                if not idle:
                    return False  # every connection is busy with a request: refuse the newcomer
                _, _, oldest = min(idle)
                del self.connections[oldest]
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(oldest, socket.SHUT_RDWR)  # its thread sees EOF and ends
            self.connections[request] = time.monotonic()
        return True

    def set_waiting(self, request: Any, waiting: bool) -> None:
        """Mark a connection as waiting for a request (may be closed for room) or busy with one."""
        with self.connections_lock:
            if request in self.connections:
                self.connections[request] = time.monotonic() if waiting else None

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.pop(request, None)

    def server_close(self) -> None:
        self.stopping = True  # connections the exit breaks off are not errors worth a line
        super().server_close()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1

    # -- logs --

    def log_line(self, client: str, message: str) -> None:
        """One access-log line, control characters escaped."""
        with self.log_lock:
            self.log.write("%s - - [%s] %s\n" % (client, time.strftime("%d/%b/%Y %H:%M:%S"), printable(message)))
            self.log.flush()

    def report_bug(self, client: str) -> None:
        """A handler bug: its traceback on the server's stderr (the client gets a 500)."""
        import traceback
        with self.log_lock:
            self.errors.write("dogestry server: internal error serving %s:\n%s" % (client, traceback.format_exc()))
            self.errors.flush()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A broken connection is one log line; anything else is a bug, with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            if not self.stopping:
                self.log_line(client_address[0], "connection error: %s" % _os_reason(error))
        else:
            self.report_bug(client_address[0])

    def public(self, text: str) -> str:
        """Text fit for clients: the path of a directory store stays private."""
        return text.replace(self._private, "<server store>") if self._private else text

    def api_version(self) -> str:
        """The local dockerd's API version (what docker clients should speak), else 1.41."""
        if self._api_version is None:
            try:
                self._api_version = self.docker.api_version()
            except DogestryError:
                return "1.41"
        return self._api_version

    def engine_platform(self) -> Platform:
        """The local engine's platform (what a pull takes of a multi-platform tag), asked once;
        linux/amd64 while the engine cannot say (it is asked again next time)."""
        if self._engine_platform is None:
            try:
                self._engine_platform = self.docker.platform()
            except DogestryError:
                return Platform("linux", "amd64")
        return self._engine_platform

    # -- pulls --

    def pull(self, found: Located, tag_as: Optional[ImageRef], client: str, progress: ProgressSink) -> Tuple[str, bool]:
        """Load an image unless the engine has it, then tag it.

        Returns the image ID and whether the requested tag now names another image than before.
        """
        image = found.image
        if not image.legacy and self.docker.inspect_image(image.image_id) is not None:
            progress.note("%s: already on the Docker host" % image.image_id[7:19])  # no slot needed
            image_id = image.image_id
        else:
            image_id = self._shared_pull(found, client, progress)
        if tag_as is None:
            return image_id, False
        before = self.docker.inspect_image(str(tag_as))
        self.docker.tag(image_id, tag_as)
        return image_id, before is None or before.get("Id") != image_id

    def _shared_pull(self, found: Located, client: str, progress: ProgressSink) -> str:
        """Pull once per image and store identity at a time: later identical requests share the result."""
        import concurrent.futures  # lazy (start-up time): only parallel work needs it
        with self.inflight_lock:
            future = self.inflight.get(found.share_key)
            leader = future is None
            if leader:
                future = self.inflight[found.share_key] = concurrent.futures.Future()
        assert future is not None
        if not leader:
            progress.note("Waiting for the pull of %s already under way" % found.image.image_id[7:19])
            return future.result()
        try:
            with self.pull_slot(client, progress):
                image_id = load_image(self.docker, found.store, found.image, [], progress)
            future.set_result(image_id)
            return image_id
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self.inflight_lock:
                self.inflight.pop(found.share_key, None)

    @contextlib.contextmanager
    def pull_slot(self, client: str, progress: ProgressSink) -> Iterator[None]:
        """Hold one of max_pulls slots, at most pulls_per_client of them per client address."""
        def free() -> bool:
            return sum(self.pulls_by_client.values()) < self.limits.max_pulls and \
                self.pulls_by_client[client] < self.limits.pulls_per_client

        with self.slots:
            if not free():
                progress.note("Waiting for a free pull slot (%d pulls at a time, %d per client)"
                              % (self.limits.max_pulls, self.limits.pulls_per_client))
                self.slots.wait_for(free)
            self.pulls_by_client[client] += 1
        try:
            yield
        finally:
            with self.slots:
                self.pulls_by_client[client] -= 1
                if not self.pulls_by_client[client]:
                    del self.pulls_by_client[client]
                self.slots.notify_all()


def name_splits(parts: Sequence[str]) -> List[Tuple[str, str]]:
    """(store prefix, image name) for every way to split path components, longest prefix first:
    team/app -> ('team/', 'app'), ('', 'team/app')."""
    return [("".join(p + "/" for p in parts[:i]), "/".join(parts[i:])) for i in range(len(parts) - 1, -1, -1)]


class FramingError(DogestryError):
    """A request's body is framed wrongly (RFC 9112 section 6) or too large: status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestBody:
    """A request's body as its headers frame it: read whole up to a limit, or streamed in pieces."""

    _CHUNK_LINE = re.compile(rb"^([0-9A-Fa-f]{1,8})[ \t]*(?:;[^\r\n]*)?\r\n$")

    def __init__(self, rfile: Any, length: Optional[int]):
        self.rfile, self.length = rfile, length  # length None: chunked
        self.done = length == 0

    @classmethod
    def framed(cls, rfile: Any, headers: Any, version: str) -> "RequestBody":
        """The body the headers announce; FramingError for anything ambiguous (RFC 9112 6.1-6.3)."""
        codings = headers.get_all("Transfer-Encoding") or []
        lengths = headers.get_all("Content-Length") or []
        if codings:
            if lengths:
                raise FramingError(400, "a request may not have both Transfer-Encoding and Content-Length")
            if version == "HTTP/1.0":
                raise FramingError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
            if [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
                raise FramingError(501, "only Transfer-Encoding: chunked is supported")
            return cls(rfile, None)
        if not lengths:
            return cls(rfile, 0)
        if len(lengths) > 1 or not re.match(r"^[0-9]{1,15}$", lengths[0].strip(" \t")):
            raise FramingError(400, "bad Content-Length")
        return cls(rfile, int(lengths[0].strip(" \t")))

    def read(self, limit: int) -> bytes:
        """The whole body (FramingError 413 if longer than limit, 400 if cut short or malformed)."""
        return b"".join(self.pieces(limit))

    def pieces(self, limit: int, piece: int = CHUNK) -> Iterator[bytes]:
        """The body as it arrives, in pieces of at most `piece` bytes, never held whole (FramingError
        413 once it is longer than limit, 400 if it is cut short or malformed)."""
        if self.length is None:
            yield from self._chunked_pieces(limit, piece)
        else:
            if self.length > limit:
                raise FramingError(413, "request body too large (at most %s)" % human_size(limit))
            yield from self._exactly(self.length, piece, "request body cut short")
        self.done = True

    def discard(self, limit: int) -> bool:
        """Read and drop a body of known length up to limit bytes (so its client can read an answer
        refusing it); False, and nothing read, for a longer or chunked one."""
        if self.length is None or self.length > limit:
            return False
        for _ in self._exactly(self.length, CHUNK, "request body cut short"):
            pass
        self.done = True
        return True

    def _exactly(self, count: int, piece: int, short: str) -> Iterator[bytes]:
        while count:
            data = self.rfile.read(min(piece, count))
            if not data:
                raise FramingError(400, short)
            count -= len(data)
            yield data

    def _chunked_pieces(self, limit: int, piece: int) -> Iterator[bytes]:
        total = 0
        while True:
            m = self._CHUNK_LINE.match(self.rfile.readline(1024))
            if not m:
                raise FramingError(400, "malformed chunked request body")
            size = int(m.group(1), 16)
            if not size:
                break
            total += size
            if total > limit:
                raise FramingError(413, "request body too large (at most %s)" % human_size(limit))
            yield from self._exactly(size, piece, "malformed chunked request body")
            if self.rfile.read(2) != b"\r\n":
                raise FramingError(400, "malformed chunked request body")
        for _ in range(64):  # trailer fields, up to the empty line
            line = self.rfile.readline(8192)
            if line == b"\r\n":
                return
            if not line.endswith(b"\r\n"):
                break
        raise FramingError(400, "malformed chunked request trailer")


class DeadlineReader(io.RawIOBase):
    """Reads a socket so that a request must arrive whole before a deadline: one byte every
    few seconds cannot hold a connection (the socket's own timeout is per read).

    While a body streams (`idle` set: an upload of any size), the deadline moves forward each
    time the server asks for more of it: a client that sends nothing for `idle` seconds is cut
    off, and the time the server spends storing what came is not the client's.
    """

    def __init__(self, sock: socket.socket, write_timeout: float):
        super().__init__()
        self.sock, self.write_timeout = sock, write_timeout
        self.deadline = time.monotonic()
        self.idle = None  # type: Optional[float]
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        import socket  # lazy (start-up time): only commands that talk to a network need it
        if self.idle is not None:
            self.deadline = time.monotonic() + self.idle
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request took too long")
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.write_timeout)
        self.received += n
        return n


class RequestHandler(_HTTPRequestHandler):
    """One client connection: strict HTTP/1.0 and 1.1 within the server's limits, JSON answers,
    access log lines on stdout.  The protocols (below) answer what it routes to them."""

    server_version = "dogestry/" + __version__
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as written: no 40 ms delayed-ACK stall per answer
    server: DogestryServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.reader = DeadlineReader(self.connection, SERVER_WRITE_TIMEOUT)
        self.rfile = io.BufferedReader(self.reader, 1 << 16)  # type: ignore[assignment]
        self.body = RequestBody(self.rfile, 0)
        self.answered = False

    def version_string(self) -> str:
        return self.server_version  # no Python version for the world to see

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (http.server's name)
        self.server.log_line(self.client_address[0], format % args)

    def handle(self) -> None:
        """Shake hands (TLS) within the read timeout, then serve requests until the client is done."""
        import ssl  # lazy (start-up time): only TLS needs it
        self.close_connection = True
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.settimeout(self.server.limits.read_timeout)
                self.connection.do_handshake()  # bounded as a whole by the timeout (CPython's _ssl)
            except (OSError, ValueError) as e:
                self.server.log_line(self.client_address[0], "TLS handshake failed: %s" % _os_reason(e))
                return
        self.close_connection = False
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        """Read one request within the deadline, answer it; close when its body went unread."""
        import socket  # lazy (start-up time): only commands that talk to a network need it
        self.server.set_waiting(self.connection, True)
        self.reader.deadline = time.monotonic() + self.server.limits.read_timeout
        self.reader.idle = None
        self.body, self.answered = RequestBody(self.rfile, 0), False
        received = self.reader.received
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(414)
                return
            if not self.parse_request():
                self.close_connection = True
                return
            self.server.set_waiting(self.connection, False)
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, "method %s is not supported" % self.command)
                return
            try:
                method()
            except OSError:
                raise
            except Exception:
                self.server.report_bug(self.client_address[0])
                if not self.answered:
                    self._refuse(500, "dogestry server: internal error (see the server's log)")
                self.close_connection = True
            if not self.body.done:
                self.close_connection = True  # what is left of the body must not be read as a request
            self.wfile.flush()
        except socket.timeout:
            if self.reader.received != received:  # an idle keep-alive connection just ends quietly
                self.log_error("request timed out: connection closed")
            self.close_connection = True

    def parse_request(self) -> bool:
        """http.server's parsing, then only HTTP/1.0 and 1.1, with unambiguous framing."""
        if not super().parse_request():
            return False
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(505 if self.request_version.startswith("HTTP/") and
                            self.request_version != "HTTP/0.9" else 400, "only HTTP/1.0 and HTTP/1.1 are served")
            return False
        try:
            self.body = RequestBody.framed(self.rfile, self.headers, self.request_version)
        except FramingError as e:
            self.send_error(e.status, str(e))
            return False
        return True

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        self.answered = True
        super().send_response(code, message)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (bad request line, huge headers, ...) as JSON too; then close."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # answer junk with a status line, never as HTTP/0.9
        try:
            self._send(code, json.dumps({"message": message or self.responses.get(code, ("error",))[0]}).encode()
                       + b"\n", extra={"Connection": "close"})
        except OSError:
            pass

    def _route(self) -> str:
        path = urllib.parse.urlsplit(self.path).path
        m = _VERSION_PREFIX.match(path)
        return m.group(1) if m else path

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              extra: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Api-Version", self.server.api_version())
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"message": message}).encode() + b"\n")

    def _read_body(self) -> Optional[bytes]:
        """The request body (at most SERVER_BODY_LIMIT), or None after refusing it and closing."""
        try:
            return self.body.read(SERVER_BODY_LIMIT)
        except FramingError as e:
            self.close_connection = True
            self._refuse(e.status, str(e))
            return None

    def _stream_body(self, limit: int) -> Iterator[bytes]:
        """The request body as it arrives, at most `limit` bytes, UPLOAD_PIECE at a time
        (RequestBody.pieces): the client has the read timeout for each piece, however long the whole takes."""
        self.reader.idle = self.server.limits.read_timeout
        return self.body.pieces(limit, UPLOAD_PIECE)


class DockerApiHandler(RequestHandler):
    """The Docker Engine API, as much of it as `docker pull` and dogestry clients need: pulls
    into the server's host, never proxied to dockerd."""

    def _docker_get(self, route: str) -> None:
        """GET (and HEAD) of the Docker API: /_ping, /version, the original's /status/check."""
        if route == "/_ping":
            self._send(200, b"OK", "text/plain; charset=utf-8",
                       {"Docker-Experimental": "false", "OSType": "linux", "Cache-Control": "no-cache"})
        elif route == "/status/check":
            self._send(200, b"OK", "text/plain; charset=utf-8", {DELEGATION_HEADER: DELEGATION_PROTOCOL,
                                                                 DELEGATION_INDEX_HEADER: DELEGATION_INDEX_PROTOCOL,
                                                                 DELEGATION_CHUNKS_HEADER: DELEGATION_CHUNKS_PROTOCOL})
        elif route == "/version":
            platform = self.server.engine_platform()  # a -pullhosts client reads the host's platform here
            self._send(200, json.dumps({
                "Version": __version__, "ApiVersion": self.server.api_version(), "MinAPIVersion": "1.24",
                "Os": platform.os, "Arch": platform.architecture,
                "Components": [{"Name": "dogestry", "Version": __version__}],
            }).encode())
        elif route == "/":
            self._refuse(404, "dogestry API, nothing to see here")
        else:
            self._refuse(403, NOT_SERVED % route)

    def _docker_post(self, route: str, body: bytes) -> None:
        """POST of the Docker API: /images/create (docker pull), and delegated pulls."""
        try:
            if route == "/images/create":
                request = self._docker_pull()
            elif route == DELEGATION_ROUTE:
                request = self._delegated_pull(body)
            else:
                return self._refuse(403, NOT_SERVED % route)
        except Refused as e:
            return self._refuse(403, self.server.public(str(e)))
        except DogestryError as e:
            return self._refuse(400, self.server.public(str(e)))
        self._stream_pull(request)

    def _stream_pull(self, request: PullRequest) -> None:
        """Answer a pull with docker's JSON progress lines, as chunks."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lock = threading.Lock()
        gone = threading.Event()

        def emit(doc: Dict[str, Any]) -> None:
            """Send one progress line; a client that hung up just stops getting them."""
            if gone.is_set():
                return
            data = self.server.public(json.dumps(doc)).encode() + b"\r\n"
            with lock:
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                except OSError:
                    gone.set()
                    self.close_connection = True

        def fail(message: str) -> None:
            emit({"errorDetail": {"message": message}, "error": message})

        progress = JsonProgress(emit)
        try:
            found = request.locate()
            progress.note("Pulling %s from %s" % (found.label, found.store.url))
            image_id, newer = self.server.pull(found, request.tag_as, request.client, progress)
            progress.note("Digest: %s" % image_id)
            if found.platform is not None:  # which image of a multi-platform tag (the docker CLI shows no aux)
                emit({"aux": {"ID": image_id, "Platform": str(found.platform)}})
            if request.tag_as:
                progress.note("Status: %s for %s" % ("Downloaded newer image" if newer else "Image is up to date",
                                                     request.tag_as))
        except DogestryError as e:
            fail("dogestry: " + str(e))
        except Exception:
            self.server.report_bug(self.client_address[0])
            fail("dogestry: internal error (see the server's log)")
        if gone.is_set():
            return
        with lock, contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")

    # -- the registry API (/v2/) --

    def _docker_pull(self) -> PullRequest:
        """POST /images/create from the docker CLI: fromImage, tag, X-Registry-Auth."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if query.get("fromSrc"):
            raise UsageError("importing images is not served")
        name = (query.get("fromImage") or [""])[0]
        tag = (query.get("tag") or [""])[0]
        asked = (query.get("platform") or [""])[0]  # docker pull --platform os/arch[/variant]
        platform = parse_platform(asked) if asked else None
        if "@" in name or "@" in tag:
            raise UsageError("pulls by digest are not served; use a tag")
        if ":" in name.rsplit("/", 1)[-1] and not tag:
            name, tag = name.rsplit(":", 1)
        wanted = parse_image_ref("%s:%s" % (name, tag or "latest"))
        policy = self.server.policy
        parts = policy.image_path(wanted.name)
        auth = self._registry_auth()
        creds = None
        if auth.get("username") or auth.get("password"):
            if not auth.get("username") or not auth.get("password"):
                raise UsageError("X-Registry-Auth needs both the AWS access key (username) and secret (password)")
            creds = Credentials(auth["username"], auth["password"], auth.get("identitytoken") or None, None,
                                "X-Registry-Auth")
        candidates, refusal = [], None  # type: List[Tuple[StoreChoice, ImageRef]], Optional[Refused]
        for prefix, image in name_splits(parts):
            try:
                candidates.append((policy.choose(auth.get("email"), prefix, creds is not None),
                                   ImageRef(image, wanted.tag)))
            except Refused as e:
                refusal = refusal or e
        if not candidates:
            assert refusal is not None
            raise refusal
        who = hashlib.sha256(("%s\0%s" % (creds.access_key, creds.secret_key)).encode()).hexdigest() if creds else ""

        def locate() -> Located:
            """The first candidate whose tag exists (tags only: never image IDs); of a
            multi-platform tag, the image of the platform asked, else of the server's engine."""
            first = None  # type: Optional[NotFound]
            for choice, ref in candidates:
                store = self.server.open_store(choice, None if choice.own else creds)
                try:
                    image_hex, entry = tag_image_choice(store, ref, lambda: platform or self.server.engine_platform())
                except NoMatchingPlatform:
                    raise
                except NotFound as e:
                    first = first or e
                    continue
                return self._located(store, image_hex, ref, entry,
                                     "%s#%s#%s" % (choice.url, "" if choice.own else who, image_hex))
            assert first is not None
            raise first

        return PullRequest(locate, wanted, self.client_address[0])

    def _located(self, store: Store, image_hex: str, ref: ImageRef, entry: Optional[IndexEntry],
                 share_key: str) -> Located:
        """What a pull of tag ref found: its image (of a multi-platform tag, the entry's)."""
        label = str(ref) + (" for " + str(entry.platform) if entry else "")
        return Located(store, load_stored_image(store, image_hex), label, share_key,
                       entry.platform if entry else None)

    def _delegated_pull(self, body: bytes) -> PullRequest:
        """POST /dogestry/v1/pull from `dogestry -pullhosts`: presigned URLs of one image's objects,
        or of a multi-platform tag's index and images (the server picks its engine's platform, or
        the one the request names)."""
        doc = parse_json(body, "the pull request")
        if not isinstance(doc, dict) or not isinstance(doc.get("objects"), dict) or \
                not isinstance(doc.get("store"), str) or not isinstance(doc.get("tag"), (str, type(None))) or \
                not (isinstance(doc.get("image"), str) or isinstance(doc.get("index"), str) and doc["tag"]) or \
                not isinstance(doc.get("platform"), (str, type(None))):
            raise UsageError("a delegated pull needs store, image (or index), tag and objects")
        policy = self.server.policy
        index = doc.get("index")  # type: Optional[str]
        if index is not None and not (index.startswith("sha256:") and _HEX64.match(index[7:])):
            raise UsageError("a delegated pull names a bad index digest")
        image_hex = digest_hex(doc["image"]) if index is None else ""
        platform = parse_platform(doc["platform"]) if doc.get("platform") else None
        tag_as = parse_image_ref(doc["tag"]) if doc["tag"] else None
        if tag_as is not None:
            policy.image_path(tag_as.name)
        if not doc["store"].startswith("s3://"):
            raise UsageError("delegated pulls read s3:// stores only")
        choice = policy.choose(doc["store"], "", True)
        location = choice.location
        assert location is not None
        wanted = {image_key(image_hex, "manifest.json"), image_key(image_hex, "config.json")} if image_hex else set()
        urls, sizes, regions = {}, {}, set()  # type: Dict[str, str], Dict[str, int], Set[str]
        for key, entry in doc["objects"].items():
            if not (key in wanted or _BLOB_KEY.match(key) or index is not None and _INDEX_PULL_KEY.match(key)):
                raise Refused("a delegated pull may only read the image's manifests, config and blobs (not %r)"
                              % key[:100])
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or \
                    not isinstance(entry.get("size"), int) or entry["size"] < 0:
                raise UsageError("objects in a delegated pull need a url and a size")
            regions.add(policy.presigned_region(entry["url"], location, key))
            urls[location.prefix + key], sizes[key] = entry["url"], entry["size"]
        if doc.get("chunks") is not None:
            chunk_urls, region = policy.presigned_chunks(location, doc["chunks"])
            urls.update((location.prefix + key, url) for key, url in chunk_urls.items())
            regions.update([region] if chunk_urls else [])
        if len(regions) > 1:
            raise Refused("the presigned URLs of one pull name several regions")
        located = location._replace(region=regions.pop() if regions else location.region)

        def locate() -> Located:
            store = self.server.presigned_store(located, urls, sizes)
            if index is None:
                return Located(store, load_stored_image(store, image_hex), str(tag_as) if tag_as else image_hex[:12],
                               "%s#presigned#%s" % (choice.url, image_hex))
            assert tag_as is not None
            pushed = read_pushed_manifest(store, index)
            if pushed is None or not pushed.is_index:
                raise NotAnImage("%s: %s names no image index" % (store.url, manifest_key(index)))
            chosen_hex, entry = index_image_for(store, tag_as, pushed, platform or self.server.engine_platform())
            return self._located(store, chosen_hex, tag_as, entry, "%s#presigned#%s" % (choice.url, chosen_hex))

        return PullRequest(locate, tag_as, self.client_address[0])

    def _registry_auth(self) -> Dict[str, str]:
        header = self.headers.get("X-Registry-Auth")
        if not header or header.strip() in ("", "e30=", "e30"):
            return {}
        try:
            padded = header.strip() + "=" * (-len(header.strip()) % 4)
            doc = parse_json(base64.urlsafe_b64decode(padded.encode("ascii")), "X-Registry-Auth")
        except (ValueError, UnicodeError, binascii.Error, FormatError):
            raise UsageError("X-Registry-Auth is not base64url JSON")
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise UsageError("X-Registry-Auth is not a JSON object of strings")
        return doc


def certificate_user(connection: Any) -> Optional[str]:
    """The subject CN of the client certificate a TLS connection verified (-tlsverify): "" if it has
    not exactly one CN, None without a verified certificate."""
    import ssl  # lazy (start-up time): only TLS needs it
    if not isinstance(connection, ssl.SSLSocket):
        return None
    certificate = connection.getpeercert()  # type: Any  # {"subject": ((("commonName", "alice"),), ...), ...}
    if not certificate:
        return None
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if len(names) == 1 else ""


class RegistryHandler(RequestHandler):
    """The registry API (/v2/): the OCI Distribution Spec for the server's STORE."""

    def _registry_request(self) -> None:
        """/v2/…: the OCI Distribution API; every answer carries the spec's version header."""
        self._who = None  # type: Optional[Caller]  # who sent this request, once known
        try:
            self._registry_answer()
        except RegistryError as e:
            extra = dict(e.headers, **({"WWW-Authenticate": 'Basic realm="dogestry"'} if e.status == 401 else {}))
            self._registry_send(e.status, registry_error_body(e.code, self.server.public(str(e))), extra=extra)
        except TagImmutable as e:  # the spec has no code of its own for it
            self._registry_send(403, registry_error_body("DENIED", self.server.public(str(e))))
        except FramingError as e:  # an upload's body, framed wrongly or too large
            self.close_connection = True
            self._registry_send(e.status, registry_error_body("SIZE_INVALID" if e.status == 413 else
                                                              "BLOB_UPLOAD_INVALID", str(e)))
        except NotFound as e:
            self._registry_send(404, registry_error_body("MANIFEST_UNKNOWN", self.server.public(str(e))))
        except DogestryError as e:  # the store failed (S3 down, a broken image): not the client's fault
            self._registry_send(500, registry_error_body("UNKNOWN", self.server.public(str(e))))

    def _registry_send(self, status: int, body: bytes, content_type: str = "application/json",
                       extra: Optional[Dict[str, str]] = None) -> None:
        self._send(status, body, content_type, dict(REGISTRY_API_HEADERS, **(extra or {})))

    def _registry_empty(self, status: int, headers: Dict[str, str]) -> None:
        """An answer whose headers say it all (no body; a 204 without Content-Length, RFC 9110 8.6)."""
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Length", "0")
        for name, value in dict(REGISTRY_API_HEADERS, **headers).items():
            self.send_header(name, value)
        self.end_headers()

    def _registry_answer(self) -> None:
        """Who may ask, then the read or the write asked for."""
        registry = self.server.registry
        if registry is None:
            raise RegistryError(404, "UNSUPPORTED", "this dogestry server has no store: the registry API needs one "
                                "(dogestry -server STORE)")
        self._require("pull", "")  # every request, before anything else: a write needs more (its route asks)
        if self.command not in ("GET", "HEAD"):
            return self._registry_write(registry)
        self._registry_read(registry)

    def _registry_write(self, registry: Registry) -> None:
        """A write (POST, PUT, PATCH, DELETE): refused here (RegistryWriteHandler answers them)."""
        raise RegistryError(405, "UNSUPPORTED", "this registry takes no writes")

    def _upload_status(self, registry: Registry, name: str, upload_id: str) -> None:
        """GET of an upload session: none here (RegistryWriteHandler answers it)."""
        raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "this registry takes no uploads")

    def _require(self, right: str, name: str) -> None:
        """Go on only if the request's user may `right` (pull, push, delete) repository `name`:
        RegistryError 401 (who is it?) or 403 (not this user) otherwise (see registry_access)."""
        registry_access(right, name, self._caller(), self.server.htpasswd, self.server.anonymous_push)

    def _user(self) -> str:
        """The name of the user this request comes from, for handlers to record (upload sessions
        keep it, so no one else may continue them): the -htpasswd user who logged in (Basic), else
        the subject CN of the client certificate (-tlsverify), else "" (anonymous).  Wrong
        credentials are a RegistryError 401 here too."""
        return self._caller().user

    def _caller(self) -> Caller:
        """Who sent this request (found out once per request): see Caller."""
        if self._who is None:
            self._who = self._identify()
        return self._who

    def _identify(self) -> Caller:
        """A password login if the request has one (401 if it is wrong), else a client certificate."""
        htpasswd, authorization = self.server.htpasswd, self.headers.get("Authorization", "")
        if htpasswd is not None and authorization:
            user = htpasswd.login(authorization, self.client_address[0])
            if user is None:
                raise RegistryError(401, "UNAUTHORIZED", "wrong user name or password")
            return Caller(user, "password")
        subject = certificate_user(self.connection)
        return Caller(subject, "certificate") if subject is not None else Caller()

    def _registry_read(self, registry: Registry) -> None:
        """GET and HEAD: the API's version check, the catalog, tags, manifests and blobs."""
        parts = urllib.parse.urlsplit(self.path)
        route, query = parts.path, urllib.parse.parse_qs(parts.query)
        if route in ("/v2", "/v2/"):
            return self._registry_send(200, b"{}\n")
        if route == "/v2/_catalog":
            names, last = page(registry.repositories(), query)
            return self._registry_list({"repositories": names}, route, last, query)
        m = _TAGS_ROUTE.match(route)
        if m:
            tags, last = page(registry.tags(m.group(1)), query)
            return self._registry_list({"name": m.group(1), "tags": tags}, route, last, query)
        m = _REFERRERS_ROUTE.match(route)
        if m:
            return self._referrers(registry, repository_name(m.group(1)), m.group(2), query)
        m = _UPLOADS_ROUTE.match(route)
        if m and m.group(2):
            return self._upload_status(registry, repository_name(m.group(1)), m.group(2))
        m = _CONTENT_ROUTE.match(route)
        if not m:
            raise RegistryError(404, "NAME_UNKNOWN", "%s is not part of the registry API" % route[:100])
        name, kind, reference = m.groups()
        repository_name(name)
        if kind == "blobs":
            return self._send_blob(registry, reference)
        data, media_type, digest = registry.manifest(name, reference, ", ".join(self.headers.get_all("Accept") or []))
        self._registry_send(200, data, media_type, {"Docker-Content-Digest": digest})

    def _referrers(self, registry: Registry, name: str, digest: str, query: Mapping[str, List[str]]) -> None:
        """GET /v2/<name>/referrers/<digest>: an image index of the manifests whose subject it is."""
        if check_digest(digest) is None:
            raise RegistryError(400, "DIGEST_INVALID", "only sha256 digests are stored (%s)" % digest[:100])
        artifact_type = query["artifactType"][0] if query.get("artifactType") else None
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": registry.referrers(digest, artifact_type)}
        self._registry_send(200, json.dumps(index, sort_keys=True).encode(), OCI_INDEX,
                            {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {})

    def _registry_list(self, doc: Dict[str, Any], route: str, last: Optional[str],
                       query: Mapping[str, List[str]]) -> None:
        """A page of a list, with a Link to the next one (RFC 8288) if there is more."""
        extra = {}
        if last is not None:
            n = (query.get("n") or [str(REGISTRY_PAGE)])[0]
            extra["Link"] = '<%s?%s>; rel="next"' % (route, urllib.parse.urlencode({"n": n, "last": last}))
        self._registry_send(200, json.dumps(doc).encode() + b"\n", extra=extra)

    def _send_blob(self, registry: Registry, digest: str) -> None:
        """A blob: its headers (HEAD), a redirect to a presigned URL (S3), or its bytes (Range: 206).
        A chunked layer's tar is no stored object to redirect to: it is assembled here."""
        key, size, layer = registry.served_blob(digest)
        headers = dict(REGISTRY_API_HEADERS, **{"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"})
        if self.command == "HEAD":
            return self._blob_head(200, size, headers)
        if layer is None and registry.presign is not None and self.server.redirect:
            headers["Location"] = registry.presign(key)
            return self._blob_head(307, 0, headers)
        wanted = parse_range(self.headers["Range"], size) if self.headers.get("Range") else None
        first, last = wanted or (0, size - 1)
        if wanted:
            headers["Content-Range"] = "bytes %d-%d/%d" % (first, last, size)
        self._blob_head(206 if wanted else 200, last - first + 1, headers)
        try:
            if layer is not None:
                for data in chunked_tar_range(registry.store, layer, first, last):
                    self.wfile.write(data)
            else:
                self._blob_body(registry.store, key, digest, size, first, last)
        except DogestryError as e:  # the answer is cut short: the client sees a truncated body
            self.server.log_line(self.client_address[0], "blob %s: %s" % (digest, e))
            self.close_connection = True

    def _blob_head(self, status: int, length: int, headers: Dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _blob_body(self, store: Store, key: str, digest: str, size: int, first: int, last: int) -> None:
        """The bytes first..last of a stored blob: sendfile from a directory store; from S3, a whole
        blob verified as it streams (its last piece held back unless the digest matches)."""
        count = last - first + 1
        if isinstance(store, LocalStore):
            if not count:  # the empty blob: sendfile takes no count of 0
                return
            with open(store.path(key), "rb") as f:
                if self.connection.sendfile(f, first, count) != count:
                    raise IntegrityError("%s changed while it was sent" % key)
            return
        if first == 0 and count == size:
            record = LayerRecord(digest, digest, size, "none")
            for data in verified_blob_chunks(store, record, lambda n: None, key=key):
                self.wfile.write(data)
            return
        with contextlib.closing(store.open_range(key, first, last)) as f:
            if copy_stream(f, self.wfile, count) != count:
                raise IntegrityError("%s came back short" % key)

    # -- what a client may ask for --


class RegistryWriteHandler(RegistryHandler):
    """The registry API's writes: blob uploads, manifests, deletes (section 17 stores them)."""

    def _registry_write(self, registry: Registry) -> None:
        route = urllib.parse.urlsplit(self.path).path
        m = _UPLOADS_ROUTE.match(route)
        if m:
            name, session = repository_name(m.group(1)), m.group(2)
            self._require("push", name)
            if self.command == "POST" and not session:
                return self._upload_start(registry, name)
            if session and self.command in ("PATCH", "PUT", "DELETE"):
                return {"PATCH": self._upload_chunk, "PUT": self._upload_finish,
                        "DELETE": self._upload_cancel}[self.command](registry, name, session)
            raise RegistryError(405, "UNSUPPORTED", "%s %s is not part of the registry API" % (self.command, route[:100]))
        m = _CONTENT_ROUTE.match(route)
        if m and m.group(2) == "manifests" and self.command in ("PUT", "DELETE"):
            name = repository_name(m.group(1))
            self._require("push" if self.command == "PUT" else "delete", name)
            return (self._manifest_put if self.command == "PUT" else self._manifest_delete)(registry, name, m.group(3))
        if m and m.group(2) == "blobs" and self.command == "DELETE":
            raise RegistryError(405, "UNSUPPORTED", "blobs are never deleted through the API: gc frees what nothing names")
        raise RegistryError(405, "UNSUPPORTED", "%s %s is not part of the registry API" % (self.command, route[:100]))

    # -- blob uploads --

    def _upload_start(self, registry: Registry, name: str) -> None:
        """POST /v2/<name>/blobs/uploads/: a session, a monolithic upload (?digest=) or a mount (?mount=)."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if query.get("mount") and self._mount(registry, name, query):
            return
        if query.get("digest"):
            digest_hex = self._digest_param(query)
            self._uploads().put(digest_hex, self._stream_body(UPLOAD_MAX), self.body.length)
            return self._blob_created(name, digest_hex)
        upload_id = self._uploads().start(name, self._pusher())
        self._registry_empty(202, dict(self._upload_headers(name, upload_id), Range=upload_range(0)))

    def _mount(self, registry: Registry, name: str, query: Mapping[str, List[str]]) -> bool:
        """?mount=<digest>&from=<name>: 201 if the store has the blob (the store is content
        addressed: any repository's blob, an image's config, or a chunked layer's tar, as GET
        serves them, which a pushed manifest may name); False, to start a session instead, if it
        has not or the arguments are not valid (the spec's fallback)."""
        source = (query.get("from") or [""])[0]
        try:
            if source:
                self._require("pull", repository_name(source))
            registry.served_blob(query["mount"][0])
        except RegistryError as e:
            if e.status in (401, 403):
                raise
            return False
        self._blob_created(name, digest_hex(query["mount"][0]))
        return True

    def _upload_chunk(self, registry: Registry, name: str, session: str) -> None:
        """PATCH /v2/<name>/blobs/uploads/<id>: more bytes of a session."""
        try:
            first, length = self._chunk_range()
            size = self._uploads().append(session, name, self._pusher(), self._stream_body(UPLOAD_MAX), first, length)
        except RegistryError as e:
            raise self._with_upload_headers(e, name, session)
        self._registry_empty(202, dict(self._upload_headers(name, session), Range=upload_range(size)))

    def _upload_finish(self, registry: Registry, name: str, session: str) -> None:
        """PUT /v2/<name>/blobs/uploads/<id>?digest=: the last bytes, then the blob is checked and stored."""
        digest_hex = self._digest_param(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
        try:
            first, length = self._chunk_range()
            self._uploads().finish(session, name, self._pusher(), digest_hex, self._stream_body(UPLOAD_MAX),
                                   first, length)
        except RegistryError as e:
            raise self._with_upload_headers(e, name, session)
        self._blob_created(name, digest_hex)

    def _upload_cancel(self, registry: Registry, name: str, session: str) -> None:
        """DELETE /v2/<name>/blobs/uploads/<id>: the session and its bytes go."""
        self._uploads().cancel(session, name, self._pusher())
        self._registry_empty(204, {})

    def _upload_status(self, registry: Registry, name: str, upload_id: str) -> None:
        """GET /v2/<name>/blobs/uploads/<id>: how many bytes a session holds (its Range)."""
        self._require("push", name)
        size = self._uploads().status(upload_id, name, self._pusher())
        self._registry_empty(204, dict(self._upload_headers(name, upload_id), Range=upload_range(size)))

    def _uploads(self) -> BlobUploads:
        uploads = self.server.uploads
        if uploads is None:
            raise RegistryError(405, "UNSUPPORTED", "this registry takes no uploads")
        return uploads

    def _pusher(self) -> str:
        """Who is pushing, as sessions remember it: the user _require let through ("" when anonymous)."""
        return self._user()

    def _upload_headers(self, name: str, upload_id: str) -> Dict[str, str]:
        return {"Location": "/v2/%s/blobs/uploads/%s" % (name, upload_id), "Docker-Upload-UUID": upload_id,
                "Blob-Upload-Session-ID": upload_id}

    def _with_upload_headers(self, error: RegistryError, name: str, upload_id: str) -> RegistryError:
        """A 416 says where the session is (Range) and where to go on (Location), as the spec asks."""
        if error.status == 416:
            if "Range" not in error.headers:
                with contextlib.suppress(RegistryError):
                    error.headers["Range"] = upload_range(self._uploads().status(upload_id, name, self._pusher()))
            error.headers.update(self._upload_headers(name, upload_id))
        return error

    def _blob_created(self, name: str, digest_hex: str) -> None:
        digest = "sha256:" + digest_hex
        self._registry_empty(201, {"Location": "/v2/%s/blobs/%s" % (name, digest), "Docker-Content-Digest": digest})

    def _digest_param(self, query: Mapping[str, List[str]]) -> str:
        """The hex of the ?digest= a blob is taken with (every one given: the same sha256 digest)."""
        digests = query.get("digest") or []
        if not digests:
            raise RegistryError(400, "DIGEST_INVALID", "finishing an upload needs ?digest=sha256:<hex>")
        found = {check_digest(digest) for digest in digests}
        if len(found) != 1 or None in found:
            raise RegistryError(400, "DIGEST_INVALID", "blobs are taken with one sha256 digest (got %s)"
                                % ", ".join(d[:80] for d in digests[:4]))
        return found.pop() or ""

    def _chunk_range(self) -> Tuple[Optional[int], Optional[int]]:
        """(first byte, length) of the bytes a request brings, as its Content-Range and framing say
        (None where they do not): 416 for a Content-Range of another form or length (the spec's answer)."""
        length = self.body.length
        header = self.headers.get("Content-Range")
        if header is None:
            return None, length
        m = _CHUNK_RANGE.match(header.strip())
        if m:
            first, last = decimal_number(m.group(1)), decimal_number(m.group(2))
            if first <= last and length in (None, last - first + 1):
                return first, last - first + 1
        raise RegistryError(416, "BLOB_UPLOAD_INVALID", "Content-Range %r is not <first>-<last> of the %s bytes sent"
                            % (header[:60], length if length is not None else "chunked"))

    # -- manifests --

    def _manifest_put(self, registry: Registry, name: str, reference: str) -> None:
        """PUT /v2/<name>/manifests/<tag or digest>: a manifest, kept byte for byte."""
        try:
            data = self.body.read(DOCUMENT_LIMIT)
        except FramingError as e:
            if not (e.status == 413 and self.body.discard(4 * DOCUMENT_LIMIT)):
                self.close_connection = True
            raise RegistryError(e.status, "SIZE_INVALID" if e.status == 413 else "MANIFEST_INVALID", str(e))
        manifest = parse_pushed_manifest(data, self.headers.get("Content-Type", ""))
        registry.put_manifest(name, reference, manifest)
        headers = {"Location": "/v2/%s/manifests/%s" % (name, manifest.digest), "Docker-Content-Digest": manifest.digest}
        if manifest.subject:
            headers["OCI-Subject"] = manifest.subject
        self._registry_send(201, b"", extra=headers)

    def _manifest_delete(self, registry: Registry, name: str, reference: str) -> None:
        """DELETE /v2/<name>/manifests/<tag or digest>: tags go as `dogestry rm` removes them."""
        registry.delete_manifest(name, reference)
        self._registry_send(202, b"")


class ServerHandler(DockerApiHandler, RegistryWriteHandler):
    """Routes each request to its protocol: the registry API under /v2/, the Docker API elsewhere."""

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if _is_registry_path(self.path):
            return self._registry_request()
        self._docker_get(self._route())

    def do_POST(self) -> None:
        if _is_registry_path(self.path):
            return self._registry_request()  # its body is read (or streamed) by the route, if at all
        body = self._read_body()
        if body is None:
            return
        self._docker_post(self._route(), body)

    def do_PUT(self) -> None:
        if _is_registry_path(self.path):
            return self._registry_request()
        if self._read_body() is None:  # read, so the client can read the refusal
            return
        self._refuse(403, NOT_SERVED % self._route())

    do_DELETE = do_PATCH = do_PUT


@functools.lru_cache(maxsize=None)
def http_server_class() -> Type[DogestryServer]:
    """DogestryServer, serving with ServerHandler, on the standard library's classes they build on."""
    import http.server  # lazy (start-up time): only -server needs it
    import socketserver  # lazy (start-up time): only -server needs it
    handler = type("ServerHandler", (ServerHandler, http.server.BaseHTTPRequestHandler), {})
    return cast(Type[DogestryServer], type("DogestryServer", (DogestryServer, socketserver.ThreadingMixIn,
                                                              http.server.HTTPServer), {"handler_class": handler}))


# === 20. Commands ===


class StaticCredentials:
    """Fixed credentials where a CredentialChain is expected (the server's X-Registry-Auth keys)."""

    def __init__(self, creds: Credentials):
        self.creds = creds

    def get(self, force_refresh: bool = False) -> Credentials:
        return self.creds


# What ?profile=NAME on an S3 URL overrides, as the AWS CLI's --profile does.
PROFILE_OVERRIDES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY", "AWS_SECRET_KEY")


class Context:
    """Everything a command touches from the outside world, injected (no globals)."""

    def __init__(self, environ: Mapping[str, str], stdout: IO[str], stderr: IO[str],
                 options: argparse.Namespace, stdin: Optional[IO[str]] = None):
        self.stdout, self.stderr, self.stdin, self.options = stdout, stderr, stdin, options
        self.progress = Progress(stderr, quiet=getattr(options, "quiet", False))
        self.remotes = {}  # type: Dict[str, str]
        environ = dict(environ)
        if getattr(options, "config", None):
            config = read_config_file(options.config)
            self.remotes = config.remotes
            if config.access_key and config.secret_key:
                environ.update(AWS_ACCESS_KEY_ID=config.access_key, AWS_SECRET_ACCESS_KEY=config.secret_key)
            if config.docker:
                environ["DOCKER_HOST"] = config.docker
        self.environ = environ

    @property
    def home(self) -> str:
        return self.environ.get("HOME") or os.path.expanduser("~")

    def docker(self) -> DockerClient:
        """A client for DOCKER_HOST (or the default socket)."""
        return DockerClient(docker_endpoint(None, self.environ, self.home),
                            load_batch=load_batch_setting(self.environ))

    def store(self, url: Optional[str] = None) -> Store:
        """The store named on the command line (or a remote of the config file)."""
        url = url or self.options.store
        return open_store(self.remotes.get(url, url), self.s3_store)

    def credentials(self) -> CredentialChain:
        """The AWS credential chain (-use-metaservice forces instance metadata)."""
        return CredentialChain(AwsConfig(self.environ, self.home),
                               force_metadata=bool(getattr(self.options, "use_metaservice", False)))

    def s3_store(self, location: S3Location, creds: Optional[Credentials] = None) -> Store:
        """An S3 store with the AWS SDKs' region, endpoint and credential rules (?profile=NAME:
        that profile's, as the AWS CLI's --profile, over any keys in the environment)."""
        environ = self.environ
        if location.profile:
            environ = {k: v for k, v in environ.items() if k not in PROFILE_OVERRIDES}
            environ["AWS_PROFILE"] = location.profile
        config = AwsConfig(environ, self.home)
        if creds:
            chain = StaticCredentials(creds)  # type: Any
        else:
            chain = CredentialChain(config, force_metadata=bool(getattr(self.options, "use_metaservice", False)))
        return S3Store(location, S3Client(location, chain, config, notify=self.progress.warn))

    def presigned_store(self, location: S3Location, urls: Dict[str, str], sizes: Dict[str, int]) -> Store:
        """The objects of one delegated pull, read through the URLs the client presigned."""
        client = S3Client(location, None, AwsConfig(self.environ, self.home), presigned=urls,  # type: ignore
                          notify=self.progress.warn)
        return PresignedS3Store(location, client, sizes)

    def push_options(self) -> PushOptions:
        return PushOptions(compression=getattr(self.options, "compress", "gzip") or "gzip",
                           tempdir=self.options.tempdir,
                           level=getattr(self.options, "compress_level", GZIP_LEVEL) or GZIP_LEVEL,
                           gc_min_grace=gc_min_grace(self.environ), command=self.options.command,
                           platforms=getattr(self.options, "platforms", "auto"), chunked=chunks_setting(self.environ))


def wants_json(ctx: Context) -> bool:
    """Did the command line ask for --json (one JSON document on stdout instead of text)?"""
    return bool(getattr(ctx.options, "json", False))


def emit_json(ctx: Context, doc: Any) -> None:
    """Write a command's --json document (README: JSON output): one JSON value on stdout, keys sorted."""
    ctx.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    ctx.stdout.flush()


def cmd_push(ctx: Context) -> int:
    """push STORE IMAGE[:TAG]...: store images and their tags."""
    docker, store = ctx.docker(), ctx.store()
    pushed = []  # type: List[Dict[str, Any]]
    for image in ctx.options.images:
        report = TransferReport()
        push_image(docker, store, image, ctx.progress, ctx.push_options(), report)
        pushed.append(dict(report.to_json(), image=image))
    if wants_json(ctx):
        emit_json(ctx, {"store": store.url, "images": pushed, "bytes_sent": sum(p["bytes_sent"] for p in pushed)})
    return 0


def cmd_pull(ctx: Context) -> int:
    """pull STORE IMAGE[:TAG]...: load images into the Docker host (or -pullhosts) and tag them."""
    if ctx.options.pullhosts:
        return fleet_command(ctx)  # prints the JSON statuses of the hosts, --json or not
    docker, store = ctx.docker(), ctx.store()
    pulled = []  # type: List[Dict[str, Any]]
    for image in ctx.options.images:
        report = TransferReport()
        pull_image(docker, store, image, ctx.progress, platform=ctx.options.platform, report=report)
        pulled.append(dict(report.to_json(chunks=False), image=image))
    if wants_json(ctx):
        emit_json(ctx, {"store": store.url, "images": pulled, "bytes_sent": sum(p["bytes_sent"] for p in pulled)})
    return 0


def fleet_command(ctx: Context) -> int:
    """pull to every -pullhosts host (of multi-platform tags, each host its engine's platform, or
    --platform's): through the dogestry servers of hosts that run one, directly to the rest.  The
    JSON status of every host is printed whatever happens (a host that did not finish is
    "failed", with the reason), then the error, if there was one."""
    options = ctx.options
    endpoints = parse_pullhosts(options.pullhosts, ctx.environ, ctx.home)
    statuses = {}  # type: Dict[str, Dict[str, str]]
    failure = None  # type: Optional[BaseException]
    try:
        _fleet_pull_all(ctx, endpoints, statuses)
    except (DogestryError, KeyboardInterrupt) as e:
        failure = e
    reason = "interrupted" if isinstance(failure, KeyboardInterrupt) else str(failure)
    result = [statuses.get(e.url) or {"Host": e.url, "Status": "failed", "Error": reason} for e in endpoints]
    ctx.stdout.write(json.dumps(result) + "\n")
    ctx.stdout.flush()
    if failure is not None:
        raise failure
    return 0 if all(s["Status"] == "ok" for s in result) else 1


def _fleet_pull_all(ctx: Context, endpoints: Sequence[DockerEndpoint], statuses: Dict[str, Dict[str, str]]) -> None:
    options = ctx.options
    batch = load_batch_setting(ctx.environ)
    versions = {}  # type: Dict[str, Any]
    if not options.disable_checks:
        versions = check_hosts([DockerClient(e, timeout=min(HOST_CHECK_TIMEOUT, options.host_timeout))
                                for e in endpoints])
    platform = getattr(options, "platform", None)
    store = ctx.store()
    if isinstance(store, S3Store) and not options.force_local:
        delegate_to_servers(endpoints, store, options.images, options.port, ctx.progress, statuses,
                            options.host_timeout, platform)
    # hosts without a server, and those whose server failed or lied, get a regular pull
    direct = [e for e in endpoints if statuses.get(e.url, {}).get("Status") != "ok"]
    if not direct:
        return
    server_errors = {url: status["ServerError"] for url, status in statuses.items() if "ServerError" in status}
    for endpoint in direct:
        statuses.pop(endpoint.url, None)  # until its direct pull says otherwise
    clients = [DockerClient(e, timeout=options.host_timeout, stream_timeout=options.host_timeout, load_batch=batch)
               for e in direct]
    try:
        fleet_pull(clients, store, options.images, ctx.progress, options.tempdir, statuses,
                   HostPlatforms(platform, versions))
    finally:
        for url, error in server_errors.items():
            if url in statuses:
                statuses[url]["ServerError"] = error


def server_tls_context(options: argparse.Namespace, environ: Mapping[str, str], home: str) -> Optional[ssl.SSLContext]:
    """TLS for -server the dockerd way: -tls or -tlsverify, with -tlscert/-tlskey (default
    $DOCKER_CERT_PATH or ~/.docker/{cert,key}.pem); -tlsverify requires client certificates
    signed by -tlscacert (default ca.pem there)."""
    import ssl  # lazy (start-up time): only TLS needs it
    if not (options.tls or options.tlsverify or options.tlscert or options.tlskey or options.tlscacert):
        return None
    if options.tlscacert and not options.tlsverify:
        raise UsageError("-tlscacert needs -tlsverify (client certificates are checked only with -tlsverify)")
    cert_dir = environ.get("DOCKER_CERT_PATH") or os.path.join(home, ".docker")
    cert = options.tlscert or os.path.join(cert_dir, "cert.pem")
    key = options.tlskey or os.path.join(cert_dir, "key.pem")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError("cannot use the TLS certificate %s with key %s: %s" % (cert, key, _os_reason(e)))
    if options.tlsverify:
        ca = options.tlscacert or os.path.join(cert_dir, "ca.pem")
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as e:
            raise UsageError("cannot use the TLS CA certificate %s: %s" % (ca, _os_reason(e)))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def registry_presigner(store: Store) -> Optional[Callable[[str], str]]:
    """For an S3 store: key -> a presigned GET URL that registry clients are redirected to."""
    if not isinstance(store, S3Store):
        return None
    return lambda key: store.client.presign(store.location.prefix + key, BLOB_URL_TTL)


def raise_open_files_limit() -> Optional[int]:
    """Let a server use every file descriptor it is allowed (the soft limit up to the hard one, as Go
    does); return the limit it has now (None where there is none to know)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return None if soft == resource.RLIM_INFINITY else soft


def server_max_connections(asked: Optional[int], open_files: Optional[int], max_pulls: int = SERVER_MAX_PULLS) -> int:
    """The connections a server serves at once: `asked` (-max-connections), which the open-files limit
    must allow, or else what that limit leaves after the server's own files, at most SERVER_MAX_CONNECTIONS."""
    if open_files is None:
        return asked or SERVER_MAX_CONNECTIONS
    spare = (open_files - SERVER_OWN_FILES - max_pulls * SERVER_PULL_FILES) // SERVER_CONNECTION_FILES
    room = max(1, min(SERVER_MAX_CONNECTIONS, spare))
    if asked is None:
        return room
    if asked > open_files:
        raise UsageError("-max-connections %d is more than the open-files limit of %d (ulimit -n); without it "
                         "the server serves %d, leaving files for its own use" % (asked, open_files, room))
    return asked


OPEN_SERVER_WARNING = (
    "dogestry: warning: this server has no store and no -allow list: any client that reaches it may pull "
    "from any S3 bucket it has keys for and tag the image on this host under any name; restrict it with "
    "STORE, -allow s3://bucket/prefix/, -registry NAME and -tlsverify")


def server_serves(options: argparse.Namespace, own: Optional[str], policy: ServerPolicy,
                  htpasswd: Optional[Htpasswd], engine: str) -> List[str]:
    """The lines after the server's first: what its Docker API and its registry API serve, to whom."""
    sources = ([printable(own) + " (and prefixes under it)"] if own else []) + \
        ["s3://%s/%s" % (a.bucket, a.prefix) for a in policy.allowed]
    docker = "Docker API: docker pull into %s, from %s" % (
        engine, "any S3 bucket a client has keys for" if policy.is_open else ", ".join(sources))
    if not own:
        return [docker, "registry API: off (no STORE given; 'dogestry -server STORE' serves it at /v2/)"]
    return [docker, "registry API: /v2/ for %s; %s" % (printable(own), registry_users(options, htpasswd))]


def registry_users(options: argparse.Namespace, htpasswd: Optional[Htpasswd]) -> str:
    """Who may pull and push through the registry API, in a few words."""
    if htpasswd is not None:
        rights = list(htpasswd.rights.values())
        certificates = sum(1 for stored in htpasswd.users.values() if stored == CERTIFICATE_ONLY)
        return "%d user%s of -htpasswd %s (%d may push, %d may delete%s)%s%s" % (
            len(rights), "" if len(rights) == 1 else "s", printable(htpasswd.path), sum("push" in r.rights for r in rights),
            sum("delete" in r.rights for r in rights),
            ", %d by client certificate only" % certificates if certificates else "",
            "; client certificates log in as their CN" if options.tlsverify else "",
            "; -anonymous-push: every user may push" if options.anonymous_push else "")
    pullers = "client certificate holders" if options.tlsverify else "anyone who reaches the port"
    return "%s may pull, %s" % (pullers, "and push (-anonymous-push)" if options.anonymous_push
                                 else "nobody may push (no -htpasswd users, no -anonymous-push)")


def cmd_server(ctx: Context) -> int:
    """-server [STORE]: serve image pulls to docker clients and dogestry -pullhosts."""
    options = ctx.options
    open_files = raise_open_files_limit()
    limits = ServerLimits(max_connections=server_max_connections(options.max_connections, open_files),
                          read_timeout=options.read_timeout)
    own = ctx.remotes.get(options.store, options.store) if options.store else None
    private, registry = "", None  # type: str, Optional[Registry]
    if own:
        store = ctx.store(own)
        store.check()
        private = store.root if isinstance(store, LocalStore) else ""
        registry = Registry(store, registry_presigner(store), gc_min_grace=gc_min_grace(ctx.environ))
    htpasswd = Htpasswd(options.htpasswd) if options.htpasswd else None
    policy = ServerPolicy(own, options.allow or [], options.registry or [],
                          ctx.environ.get("AWS_ENDPOINT_URL_S3") or ctx.environ.get("AWS_ENDPOINT_URL"))
    tls = server_tls_context(options, ctx.environ, ctx.home)

    def open_for(choice: StoreChoice, creds: Optional[Credentials]) -> Store:
        if choice.own:
            return ctx.store(choice.url)  # the server's own store (and prefixes under it)
        assert choice.location is not None
        return ctx.s3_store(choice.location, creds)

    uploads, spool = None, contextlib.ExitStack()  # type: Optional[BlobUploads], contextlib.ExitStack
    if registry is not None:  # S3 parts are spooled in a temp dir of the server's own
        parts = None if isinstance(registry.store, LocalStore) else spool.enter_context(work_directory(options.tempdir))
        uploads = BlobUploads(registry.store, gc_min_grace(ctx.environ) / 4, parts)
    try:
        server = http_server_class()((options.address, options.port), ctx.docker(), policy, open_for,
                                     ctx.presigned_store, ctx.stdout, ctx.stderr, tls, limits, private, registry,
                                     htpasswd, options.redirect, options.anonymous_push, uploads)
    except OSError as e:
        spool.close()
        raise DogestryError("cannot listen on %s:%d: %s" % (options.address, options.port, _os_reason(e)))
    except BaseException:
        spool.close()
        raise
    ctx.stdout.write("dogestry server %s listening on %s:%d%s (Docker at %s; %d connections at most, %s)\n"
                     % (__version__, options.address, server.server_address[1],
                        " with TLS" + (", client certificates required" if options.tlsverify else "") if tls
                        else " over plain HTTP",
                        server.docker.endpoint.url, limits.max_connections,
                        "-max-connections" if options.max_connections is not None else
                        "for an open-files limit of %d" % open_files if open_files is not None else "the default"))
    for line in server_serves(options, own, policy, htpasswd, server.docker.endpoint.url):
        ctx.stdout.write("  " + line + "\n")
    ctx.stdout.flush()
    if policy.is_open:
        ctx.stderr.write(OPEN_SERVER_WARNING + "\n")
        ctx.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        ctx.stdout.write("dogestry server stopped\n")
    finally:
        server.server_close()
        spool.close()  # the temp dir of uploads' parts
    return 0


def docker_config_path(environ: Mapping[str, str], home: str) -> str:
    """$DOCKER_CONFIG/config.json, or ~/.docker/config.json."""
    return os.path.join(environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker"), "config.json")


def cmd_login(ctx: Context) -> int:
    """login REGISTRY: store AWS keys and the S3 URL as docker credentials for REGISTRY."""
    stdin = ctx.stdin or sys.stdin
    tty = hasattr(stdin, "isatty") and stdin.isatty()

    def ask(prompt: str, secret: bool) -> str:
        import getpass  # lazy (start-up time): only password prompts need it
        if tty and secret:
            answer = getpass.getpass(prompt, stream=ctx.stderr)  # type: ignore[arg-type]
        else:
            ctx.stderr.write(prompt)
            ctx.stderr.flush()
            answer = stdin.readline()
            if not tty:
                ctx.stderr.write("\n")
        answer = answer.strip()
        if not answer:
            raise UsageError("%s cannot be blank" % prompt.rstrip(": "))
        return answer

    path = docker_config_path(ctx.environ, ctx.home)
    ctx.stderr.write("Updating docker file %s...\n" % path)
    access_key = ask("AWS_ACCESS_KEY: ", True)
    secret_key = ask("AWS_SECRET_KEY: ", True)
    s3_url = ask("S3_URL: ", False)
    parse_s3_url(s3_url)
    update_docker_config(path, ctx.options.registry, {
        "auth": base64.b64encode(("%s:%s" % (access_key, secret_key)).encode()).decode(), "email": s3_url})
    ctx.stdout.write("Login saved for %s in %s\n" % (ctx.options.registry, path))
    return 0


def cmd_passwd(ctx: Context) -> int:
    """passwd USER [--push] [--delete] [--names P,...] [--certificate]: a line for -htpasswd FILE."""
    options = ctx.options
    user = options.user
    if not re.match(r"^[^:\s\x00-\x1f\x7f]{1,128}$", user):
        raise UsageError("invalid user name %r: no colon, space or control character" % user[:100])
    rights = ",".join(r for r in REGISTRY_RIGHTS[1:] if getattr(options, r))
    if options.names is not None and not rights:
        raise UsageError("--names limits push and delete: give --push or --delete too")
    try:
        names = ",".join(parse_user_rights(rights, options.names or "").names)
    except ValueError as e:
        raise UsageError("--names: %s" % e)
    if options.names is not None and not names:
        raise UsageError("--names needs at least one repository name prefix (team/, team/app)")
    stored = CERTIFICATE_ONLY if options.certificate else password_hash(_new_password(ctx))
    fields = [user, stored] + ([rights] if rights else []) + ([names] if names else [])
    ctx.stdout.write(":".join(fields) + "\n")
    return 0


def _new_password(ctx: Context) -> str:
    """A password asked twice on a terminal, else read from stdin (one line)."""
    import getpass  # lazy (start-up time): only password prompts need it
    stdin = ctx.stdin or sys.stdin
    if hasattr(stdin, "isatty") and stdin.isatty():
        password = getpass.getpass("Password: ", stream=ctx.stderr)  # type: ignore[arg-type]
        if getpass.getpass("Password again: ", stream=ctx.stderr) != password:  # type: ignore[arg-type]
            raise UsageError("the passwords differ")
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("the password cannot be blank")
    return password


def update_docker_config(path: str, registry: str, entry: Dict[str, str]) -> None:
    """Set auths[registry] in a docker config.json, keeping every other key; atomic, mode 0600.

    A symlinked config.json is written through the link (as the docker CLI does), and
    concurrent logins take turns on a lock of the file's directory, so none is lost.
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        lock = os.open(directory, os.O_RDONLY)
    except OSError as e:
        raise DogestryError("cannot write %s: %s" % (path, _os_reason(e)))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _update_docker_config(path, directory, registry, entry)
    finally:
        os.close(lock)


def _update_docker_config(path: str, directory: str, registry: str, entry: Dict[str, str]) -> None:
    import tempfile  # lazy (start-up time): only writes and work directories need it
    doc = {}  # type: Dict[str, Any]
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise DogestryError("cannot read %s: %s" % (path, e))
    if not isinstance(doc, dict):
        raise DogestryError("%s is not a JSON object" % path)
    auths = doc.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise DogestryError("%s: \"auths\" is not a JSON object" % path)
    auths[registry] = entry
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent="\t")
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise DogestryError("cannot write %s: %s" % (path, _os_reason(e)))
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def binary_stream(stream: Any) -> IO[bytes]:
    """The bytes under a text stream (sys.stdin/stdout), or the stream itself if it is binary."""
    return getattr(stream, "buffer", stream)


def cmd_import(ctx: Context) -> int:
    """import STORE FILE|- [NAME:TAG...]: store the images of a docker save, podman save or OCI archive."""
    store, path, platform = ctx.store(), ctx.options.file, ctx.options.platform
    report = TransferReport()
    if path == "-":
        images = import_archive(store, binary_stream(ctx.stdin or sys.stdin), ctx.options.names, ctx.progress,
                                ctx.push_options(), platform, report)
    else:
        try:
            archive = open(path, "rb")
        except OSError as e:
            raise DogestryError("cannot read %s: %s" % (path, _os_reason(e)))
        with archive:
            images = import_archive(store, archive, ctx.options.names, ctx.progress, ctx.push_options(), platform,
                                    report)
    if wants_json(ctx):
        emit_json(ctx, imported_json(store, images, report))
        return 0
    for image in images:
        for ref in image.tags:
            ctx.stdout.write("Imported image: %s\n" % printable(str(ref)))
        if not image.tags:
            what = "image ID" if isinstance(image, ArchivedImage) else "multi-platform image"
            ctx.stdout.write("Imported %s: %s\n" % (what, image.image_id))
    return 0


def imported_json(store: Store, chosen: Sequence[Archived], report: TransferReport) -> Dict[str, Any]:
    """import --json: every image stored (those of multi-platform images too) with its layers, and the indexes."""
    images, indexes = [], []  # type: List[Dict[str, Any]], List[Dict[str, Any]]
    for item in chosen:
        if isinstance(item, ArchivedImage):
            images.append(_stored_image_json(store, item.image_id, [str(r) for r in item.tags], None, report))
            continue
        entries = index_images(item.root)
        indexes.append({"digest": item.root.digest, "tags": [str(r) for r in item.tags],
                        "platforms": [{"platform": str(e.platform), "digest": e.digest,
                                       "image_id": item.images[e.digest].image_id if e.digest in item.images else None}
                                      for e in entries]})
        images.extend(_stored_image_json(store, item.images[e.digest].image_id, [], str(e.platform), report)
                      for e in entries if e.digest in item.images)
    return {"store": store.url, "images": images, "indexes": indexes,
            "bytes_sent": sum(report.sent.values()) + sum(report.chunks_sent.values()),
            "chunks_sent": len(report.chunks_sent), "chunks_skipped": report.chunks_kept}


def _stored_image_json(store: Store, image_id: str, tags: List[str], platform: Optional[str],
                       report: TransferReport) -> Dict[str, Any]:
    layers = load_stored_image(store, digest_hex(image_id)).layers
    return dict(layers_json(layers, report.sent), image_id=image_id, tags=tags, platform=platform)


def cmd_export(ctx: Context) -> int:
    """export STORE IMAGE... -o FILE|-: write an archive docker load, podman load (or, --format oci,
    skopeo and ctr import) read."""
    if wants_json(ctx) and ctx.options.output == "-":
        raise UsageError("--json prints its document on stdout: write the archive with -o FILE")
    store = ctx.store()
    store.check()
    if ctx.options.format == "oci":
        items = oci_export_items(store, ctx.options.images, ctx.progress, ctx.options.platform)
        legacy = [i.found.image_hex[:12] for i in items if isinstance(i, ExportItem) and i.found.image.legacy]
        if legacy:
            raise UsageError("%s: %s in the original dogestry layout, which an OCI archive cannot hold unread: "
                             "run 'dogestry migrate STORE' first (or export --format docker)"
                             % (store.url, ", ".join(legacy)))
        chunks = oci_archive_stream(items, ctx.progress)  # type: Iterable[bytes]
    else:
        found = export_items(store, ctx.options.images, ctx.progress, export_platform(ctx))
        chunks, items = docker_archive_stream(found, ctx.progress), list(found)
    if ctx.options.output != "-":
        written = [0]
        write_archive(_counted(chunks, written), ctx.options.output)
        if wants_json(ctx):
            emit_json(ctx, exported_json(store, ctx.options, items, written[0]))
        return 0
    out = binary_stream(ctx.stdout)
    if hasattr(out, "isatty") and out.isatty():
        raise UsageError("refusing to write an image archive to a terminal: use -o FILE or redirect stdout")
    ctx.stdout.flush()
    for data in chunks:
        out.write(data)
    out.flush()
    return 0


def _counted(chunks: Iterable[bytes], total: List[int]) -> Iterator[bytes]:
    for data in chunks:
        total[0] += len(data)
        yield data


def exported_json(store: Store, options: argparse.Namespace, items: Sequence[OciExport], size: int) -> Dict[str, Any]:
    """export --json: the archive written, its format and bytes, and what it holds."""
    images = []  # type: List[Dict[str, Any]]
    for item in items:
        if isinstance(item, ExportItem):
            image = item.found.image
            images.append({"image_id": image.image_id if not image.legacy else "sha256:" + item.found.image_hex,
                           "tags": [str(r) for r in item.tags], "manifest": None,
                           "layers": [{"diff_id": r.diff_id, "digest": r.digest, "size": r.size} for r in image.layers]})
        else:
            images.append({"image_id": None, "tags": [str(r) for r in item.tags], "manifest": item.manifest.digest,
                           "layers": []})
    return {"store": store.url, "output": options.output, "format": options.format, "bytes": size, "images": images}


def export_platform(ctx: Context) -> PlatformSource:
    """The platform export --format docker takes of multi-platform tags (docker load takes one
    image, not an index): --platform, else that of the engine at DOCKER_HOST if one answers,
    else this machine's.  Asked once, and only for such a tag."""
    chosen = []  # type: List[Platform]

    def platform() -> Platform:
        if not chosen:
            chosen.append(ctx.options.platform or _engine_or_machine_platform(ctx))
            ctx.progress.note("exporting the %s image of multi-platform tags" % (chosen[0],))
        return chosen[0]
    return platform


def _engine_or_machine_platform(ctx: Context) -> Platform:
    try:
        return ctx.docker().platform()
    except DockerError as e:
        ctx.progress.note("no Docker engine answered (%s): taking this machine's platform" % e)
        return make_platform("linux", os.uname().machine)


def cmd_copy(ctx: Context) -> int:
    """copy SRC DST IMAGE...|--all: copy images (and multi-platform tags, with their referrers)
    between stores, only what DST lacks, tags last."""
    options = ctx.options
    if bool(options.images) == bool(options.all):
        raise UsageError("name the images to copy, or --all (not both)")
    src, dst = ctx.store(options.source), ctx.store(options.destination)
    if same_store(src, dst):
        raise UsageError("%s is both the source and the destination" % src.url)
    src.check()
    if options.all:
        texts = [str(ref) for ref, _ in list_tag_targets(src)] + [str(ref) for ref, _ in original_images_at_root(src)]
        if not texts:
            ctx.progress.note("nothing to copy: %s has no tags" % src.url)
    else:
        texts = options.images
    lister = ReferrerLister(src, whole=bool(options.all) or len(texts) > REFERRER_LISTING_TAGS)
    items = [copy_item(src, text, ctx.progress, lister) for text in texts]  # all read before anything is copied
    dst.ensure()
    for item in items:
        if item.ref is not None and not (item.image is not None and item.image.image.legacy):
            check_tag_may_move(dst, item.ref, item.tag_content)  # (an original-layout image gets its ID when copied)
    push_options = ctx.push_options()
    copied = {}  # type: Dict[Tuple[str, str], str]  # (store, image) -> image ID in dst
    report, done = TransferReport(), []  # type: TransferReport, List[Dict[str, Any]]
    with work_directory(push_options.tempdir or dst.spool_dir()) as work:
        copier = BlobCopier(src, dst, work, ctx.progress, report)
        for item in items:
            if item.image is None:
                what = copy_manifest_tag(item, src, dst, copier, ctx.progress, push_options, copied)
            else:
                what = copy_image_tag(item, dst, copier, ctx.progress, push_options, copied)
            if wants_json(ctx):
                done.append(copied_json(dst, item, what, report))
            else:
                ctx.stdout.write("Copied %s (%s)\n" % (printable(str(item.ref or item.text)), what))
    if wants_json(ctx):
        emit_json(ctx, {"source": src.url, "destination": dst.url, "images": done,
                        "bytes_sent": sum(report.sent.values()) + sum(report.chunks_sent.values()),
                        "chunks_sent": len(report.chunks_sent), "chunks_skipped": report.chunks_kept})
    return 0


def copied_json(dst: Store, item: CopyItem, what: str, report: TransferReport) -> Dict[str, Any]:
    """copy --json of one argument: the image (its layers, which this copy sent) or the manifest its tag names."""
    doc = {"image": item.text, "tag": str(item.ref) if item.ref else None}  # type: Dict[str, Any]
    if item.image is None:
        return dict(doc, image_id=None, manifest=what, **layers_json([], report.sent))
    layers = load_stored_image(dst, digest_hex(what)).layers
    return dict(doc, image_id=what, manifest=None, **layers_json(layers, report.sent))


def cmd_list(ctx: Context) -> int:
    """list STORE: the REPOSITORY TAG IMAGE-ID table of a store (and PLATFORMS, if a tag has several)."""
    store = ctx.store()
    store.check()
    targets = list_tag_targets(store)
    if wants_json(ctx):
        emit_json(ctx, listed_json(store, targets))
        return 0
    with thread_pool(min(TAG_READERS, max(1, len(targets))), "dogestry-indexes") as pool:
        described = list(pool.map(lambda item: describe_target(store, item[1]), targets))
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "PLATFORMS", "")]  # type: List[Tuple[str, ...]]
    rows += [(printable(ref.name), printable(ref.tag), target.image_hex[:12] if target.image_hex else "-", platforms,
              note) for (ref, target), (platforms, note) in zip(targets, described)]
    rows += [(printable(ref.name), printable(ref.tag), image_hex[:12], "", "(original layout, at the bucket root)")
             for ref, image_hex in original_images_at_root(store)]
    if not any(row[3] for row in rows[1:]):  # no multi-platform tag: the table older versions print
        rows = [row[:3] + row[4:] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        ctx.stdout.write(("   ".join("%-*s" % (w, cell) for w, cell in zip(widths, row)) + "   " + row[-1]).rstrip()
                         + "\n")
    if len(rows) == 1:
        hint_stores_below(ctx, store)
    return 0


LIST_HINT_LOOKS = 8  # prefixes an empty list looks into for stores (a listing of one key each, at once)


def hint_stores_below(ctx: Context, store: Store) -> None:
    """For a list that found no tags: one line on stderr naming the stores right below STORE."""
    try:
        found, there = store.stores_below(LIST_HINT_LOOKS)
    except DogestryError:  # a hint only: the listing it needs may be denied where the table was not
        return
    if not found:
        return
    url = ctx.remotes.get(ctx.options.store, ctx.options.store)
    more = " (looked into %d of the %d there)" % (LIST_HINT_LOOKS, there) if there > LIST_HINT_LOOKS else ""
    ctx.stderr.write("dogestry: no tags at the top of %s, but stores below it%s: %s; list one with "
                     "'dogestry list %s'\n" % (printable(url), more, ", ".join(printable(f) for f in found),
                                                printable(store_url_below(url, found[0]))))


def store_url_below(url: str, name: str) -> str:
    """The STORE argument of the store `name` (`team/`) right below the store `url` names."""
    if not re.match(r"(?i)(s3|file)://", url):
        return os.path.join(url, name)
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def listed_json(store: Store, targets: List[Tuple[ImageRef, TagTarget]]) -> Dict[str, Any]:
    """list --json: every tag with what it names, when it was pushed, its size and platforms (each tag's
    records read on TAG_READERS threads)."""
    ages = {e.key: e.age for e in store.list_entries("repositories/")}
    now = time.time()

    def pushed(ref: ImageRef) -> Optional[str]:
        age = ages.get(tag_key(ref))
        return None if age is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - age))

    with thread_pool(min(TAG_READERS, max(1, len(targets))), "dogestry-indexes") as pool:
        tags = list(pool.map(lambda item: dict(_target_json(store, item[1]), name=item[0].name, tag=item[0].tag,
                                               pushed=pushed(item[0])), targets))
    tags += [{"name": ref.name, "tag": ref.tag, "kind": "original", "image_id": image_hex, "manifest": None,
              "pushed": None, "size": None, "platforms": []} for ref, image_hex in original_images_at_root(store)]
    return {"store": store.url, "tags": tags}


def _image_size(store: Store, image_hex: str) -> Optional[int]:
    with contextlib.suppress(NotFound, FormatError):
        return sum(r.tar_size if r.chunked else r.size for r in load_stored_image(store, image_hex).layers)
    return None


def _target_json(store: Store, target: TagTarget) -> Dict[str, Any]:
    """What list --json says of one tag's target: kind, image ID or manifest digest, size, platforms."""
    if target.image_hex is not None:
        return {"kind": "image", "image_id": "sha256:" + target.image_hex, "manifest": None,
                "size": _image_size(store, target.image_hex), "platforms": []}
    doc = {"kind": "unreadable", "image_id": None, "manifest": target.manifest, "size": None,
           "platforms": []}  # type: Dict[str, Any]
    try:
        index = read_pushed_manifest(store, str(target.manifest))
    except DogestryError:
        index = None
    if index is None:
        return doc
    if not index.is_index:
        return dict(doc, kind="artifact", size=sum(size for _, size in index.blobs))
    platforms = []  # type: List[Dict[str, Any]]
    for entry in index_images(index):
        image_hex = None  # type: Optional[str]
        with contextlib.suppress(NotFound, FormatError):
            image_hex = image_of_manifest(store, entry.digest)
        platforms.append({"platform": str(entry.platform), "digest": entry.digest,
                          "image_id": None if image_hex is None else "sha256:" + image_hex,
                          "size": None if image_hex is None else _image_size(store, image_hex)})
    return dict(doc, kind="index", platforms=platforms, size=sum(p["size"] or 0 for p in platforms))


def describe_target(store: Store, target: TagTarget) -> Tuple[str, str]:
    """What list shows of a tag besides its image ID: the platforms of an index (read from it: one
    GET; nothing for one image, whose platform only its config says) and a note."""
    if target.manifest is None:
        return "", ""
    short = target.manifest[:19]
    try:
        index = read_pushed_manifest(store, target.manifest)
    except DogestryError:
        index = None
    if index is None:
        return "?", "(manifest %s, which cannot be read)" % short
    if not index.is_index:
        return "", "(manifest %s, pushed through the registry: an artifact)" % short
    return ",".join(sorted({str(e.platform) for e in index_images(index)})) or "-", "(index %s)" % short


def cmd_inspect(ctx: Context) -> int:
    """inspect STORE IMAGE: what the store holds for an image (or a multi-platform tag's index), as JSON."""
    store = ctx.store()
    store.check()
    platform = ctx.options.platform  # type: Optional[Platform]
    tagged = index_tag(store, ctx.options.image) if platform is None else None
    if tagged is not None:
        ctx.stdout.write(json.dumps(inspect_index(store, tagged[1]), indent=2) + "\n")
        return 0
    store, image_hex, ref, image, named_hex = find_image(store, ctx.options.image, ctx.progress,
                                                         None if platform is None else lambda: platform)
    tags = [str(r) for r, h in list_tags(store) if h in (image_hex, named_hex)]
    doc = {"Id": image.image_id if not image.legacy else image_hex, "RepoTags": tags}  # type: Dict[str, Any]
    if image.legacy:
        doc["Format"] = "dogestry-v1 (original layout)"
        doc["Layers"] = [{"V1Id": v, "Size": store.stat(image_key(v, "layer.tar"))} for v in image.legacy_chain]
        doc["Config"] = read_json(store, image_key(image_hex, "json"))
    else:
        doc["Format"] = MANIFEST_MEDIA_TYPE
        doc["Layers"] = [r.to_json() for r in image.layers]
        doc["Size"] = sum(r.tar_size if r.chunked else r.size for r in image.layers)
        doc["Config"] = read_json(store, image_key(image_hex, "config.json"))
    ctx.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


def inspect_index(store: Store, index: "PushedManifest") -> Dict[str, Any]:
    """inspect's JSON of an image index: its digest, media type, tags, each platform's manifest and
    image ID (null where its image is not stored), buildx's attestations, and the index itself."""
    def image_id(digest: str) -> Optional[str]:
        with contextlib.suppress(NotFound, FormatError):
            return "sha256:" + image_of_manifest(store, digest)
        return None

    entries = index_images(index)
    with thread_pool(min(TAG_READERS, max(1, len(entries))), "dogestry-inspect") as pool:
        ids = list(pool.map(image_id, [e.digest for e in entries]))
    attestations = [d for d in index.doc["manifests"] if ATTESTATION_ANNOTATION in (d.get("annotations") or {})]
    return {"Id": index.digest, "RepoTags": [str(r) for r, t in list_tag_targets(store) if t.manifest == index.digest],
            "Format": index.media_type, "Size": len(index.data),
            "Platforms": [{"Platform": str(e.platform), "Id": image, "Digest": e.digest, "MediaType": e.media_type,
                           "Size": e.size} for e, image in zip(entries, ids)],
            "Attestations": [{"Digest": d["digest"], "For": (d.get("annotations") or {}).get(ATTESTED_ANNOTATION)}
                             for d in attestations],
            "Index": index.doc}


def cmd_rm(ctx: Context) -> int:
    """rm STORE IMAGE:TAG|IMAGE_ID...: delete tags, or every tag of an image (gc then frees it)."""
    store = ctx.store()
    store.check()
    if ctx.options.platform is not None:
        return rm_platform(ctx, store, ctx.options.platform)
    doomed = []  # type: List[Tuple[ImageRef, str]]
    all_tags = None  # type: Optional[List[Tuple[ImageRef, str]]]
    for text in ctx.options.images:  # all or nothing: resolve every argument before deleting any tag
        ref = None  # type: Optional[ImageRef]
        with contextlib.suppress(UsageError):
            ref = parse_image_ref(text)
        if ref is not None and store.stat(tag_key(ref)) is not None:
            target = read_tag_target(store, ref)
            doomed.append((ref, target.image_hex or digest_hex(str(target.manifest))))
            continue
        if image_id_prefix(text) is None:
            parse_image_ref(text)  # the reference's own usage error, if it is one
            raise NotFound("%s not found in %s" % (text, store.url))
        image_hex, _ = resolve_image(store, text)
        all_tags = list_tags(store) if all_tags is None else all_tags
        tags = [(r, h) for r, h in all_tags if h == image_hex]
        if not tags:
            ctx.progress.note("image %s has no tags of its own in %s (gc frees it, unless a multi-platform tag"
                              " names it)" % (image_hex[:12], store.url))
        doomed.extend(tags)
    doomed = sorted(set(doomed))
    markers = set(store.list(PROTECTED_PREFIX))
    protected = [ref for ref, _ in doomed if protection_key(ref) in markers]
    if protected and not ctx.options.force:
        raise DogestryError("%s %s protected in %s: 'dogestry unprotect' first, or rm --force; nothing was deleted"
                            % (", ".join(printable(str(r)) for r in protected), "is" if len(protected) == 1 else "are",
                               store.url))
    if doomed:
        remove_tags(store, doomed, unprotect=protected)
    for ref, image_hex in doomed:
        ctx.progress.note("deleted %s (%s)%s from %s" % (ref, image_hex[:12],
                                                         " and its protection" if ref in protected else "", store.url))
    if wants_json(ctx):
        emit_json(ctx, {"store": store.url, "platform": None, "changed": [],
                        "deleted": [{"tag": str(ref), "target": "sha256:" + image_hex, "unprotected": ref in protected}
                                    for ref, image_hex in doomed]})
    return 0


def rm_platform(ctx: Context, store: Store, platform: Platform) -> int:
    """rm --platform: take that platform's image from each tag (a tag whose last image it was goes)."""
    refs = [parse_image_ref(text) for text in ctx.options.images]
    for ref in refs:  # all or nothing: every tag must be there and may change before any does
        if store.stat(tag_key(ref)) is None:
            raise NotFound("%s not found in %s" % (ref, store.url))
    markers = set(store.list(PROTECTED_PREFIX))
    protected = [ref for ref in refs if protection_key(ref) in markers]
    if protected and not ctx.options.force:
        raise DogestryError("%s %s protected in %s: 'dogestry unprotect' first, or rm --force; nothing was changed"
                            % (", ".join(printable(str(r)) for r in protected), "is" if len(protected) == 1 else "are",
                               store.url))
    deleted, changed = [], []  # type: List[Dict[str, Any]], List[Dict[str, Any]]
    for ref in refs:
        index = remove_platform(store, ref, platform, Freshness(store, gc_min_grace(ctx.environ), command="rm"))
        if index is None:
            if ref in protected:
                store.delete(protection_key(ref))
            ctx.progress.note("deleted %s from %s: %s was its last image" % (ref, store.url, platform))
            deleted.append({"tag": str(ref), "target": None, "unprotected": ref in protected})
        else:
            ctx.progress.note("removed %s from %s in %s (it holds %s)" % (platform, ref, store.url,
                                                                          platform_list(index_images(index))))
            changed.append({"tag": str(ref), "index": index.digest,
                            "platforms": [str(e.platform) for e in index_images(index)]})
    if wants_json(ctx):
        emit_json(ctx, {"store": store.url, "platform": str(platform), "deleted": deleted, "changed": changed})
    return 0


def cmd_gc(ctx: Context) -> int:
    """gc STORE: delete what no tag reaches and is older than the grace period."""
    grace, shortest = parse_duration(ctx.options.grace), gc_min_grace(ctx.environ)
    if grace < shortest:
        raise UsageError("--grace %s is too short: at least %s, what pushes running at the same time rely on"
                         % (ctx.options.grace, human_duration(shortest)))
    store = ctx.store()
    report = collect_garbage(store, grace, ctx.progress, dry_run=ctx.options.dry_run)
    verb = "would delete" if ctx.options.dry_run else "deleted"
    parts = [part for unit in report.deleted for part in unit.parts()]
    if wants_json(ctx):
        emit_json(ctx, gc_json(store, report, parts, ctx.options.dry_run))
        return 0
    for kind, name, size in parts:
        ctx.stdout.write("%s %s %s (%s)\n" % (verb, kind, printable(name), human_size(size)))
    counts = collections.Counter(kind for kind, _, _ in parts)
    plan = report.plan
    ctx.stdout.write("gc %s: %s %d images, %d layer records, %d blobs, %s%s%s%s%s%s%s\n" % (
        store.url, verb, counts["image"], counts["layer"], counts["blob"],
        "%d chunks, " % counts["chunk"] if counts["chunk"] or plan.chunks else "",
        "%d manifests, %d other records, " % (counts["manifest"], counts["record"])
        if counts["manifest"] or counts["record"] else "",
        human_size(sum(u.size for u in report.deleted)),
        "; %d abandoned upload session%s" % (counts["upload"], "s" if counts["upload"] > 1 else "")
        if counts["upload"] else "",
        "; %d found in use again and kept" % report.spared if report.spared else "",
        "; %d leftovers of killed pushes removed" % report.leftovers if report.leftovers else "",
        "; " + held_back(plan.held_bytes, plan.held_for, grace) if plan.held_bytes else ""))
    if plan.foreign:
        ctx.stdout.write("gc %s: left alone %d key%s of other shapes than dogestry's (another store nested in this "
                         "one, or someone else's): %s%s\n" % (
                             store.url, len(plan.foreign), "s" if len(plan.foreign) > 1 else "",
                             ", ".join(printable(k) for k in plan.foreign[:3]), ", ..." if len(plan.foreign) > 3 else ""))
    return 0


def gc_json(store: Store, report: GcReport, parts: List[Tuple[str, str, int]], dry_run: bool) -> Dict[str, Any]:
    """gc --json: what was (--dry-run: would be) deleted, what was spared or held back, what was left alone."""
    plan = report.plan
    return {"store": store.url, "dry_run": dry_run,
            "deleted": [{"kind": kind, "name": name, "size": size} for kind, name, size in parts],
            "counts": dict(collections.Counter(kind for kind, _, _ in parts)),
            "bytes": sum(u.size for u in report.deleted), "spared": report.spared, "leftovers": report.leftovers,
            "held_bytes": plan.held_bytes,
            "held_until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + max(0.0, plan.held_for)))
            if plan.held_bytes else None,
            "foreign": list(plan.foreign)}


def held_back(held_bytes: int, held_for: float, grace: float, now: Optional[float] = None) -> str:
    """What no tag reaches but the grace period keeps for now, and until when, for people."""
    until = (time.time() if now is None else now) + max(0.0, held_for)
    return "%s no tag reaches is held back by the %s grace period (young, or untagged less than %s ago) until " \
           "about %s" % (human_size(held_bytes), human_duration(grace), human_duration(grace),
                         time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(until + 59)))


def cmd_prune(ctx: Context) -> int:
    """prune STORE: remove old tags per repository (never protected ones); gc then frees the space."""
    keep, older = ctx.options.keep_last, ctx.options.older_than
    if (keep is None) == (older is None):
        raise UsageError("prune needs one rule: --keep-last N or --older-than DURATION")
    if keep is not None and keep < 0:
        raise UsageError("--keep-last must be 0 or more")
    names = [parse_image_ref(n).name for n in ctx.options.names]
    store = ctx.store()
    store.check()
    doomed, tied = prune_tags(store, keep, None if older is None else parse_duration(older), names)
    if doomed and not ctx.options.dry_run:
        remove_tags(store, doomed)
    verb = "would remove" if ctx.options.dry_run else "removed"
    if wants_json(ctx):
        emit_json(ctx, {"store": store.url, "dry_run": ctx.options.dry_run,
                        "removed": [{"tag": str(ref), "target": "sha256:" + image_hex} for ref, image_hex in doomed],
                        "kept_tied": [{"tags": [str(r) for r in refs], "with": str(boundary)} for refs, boundary in tied]})
        return 0
    for refs, boundary in tied:
        ctx.stdout.write("%s %s too: pushed at the same time as %s, the oldest of the %d kept, as far as the store's "
                         "times tell (prune never removes a tag that may be newer than one it keeps)\n"
                         % ("would keep" if ctx.options.dry_run else "kept", ", ".join(printable(str(r)) for r in refs),
                            printable(str(boundary)), keep))
    for ref, image_hex in doomed:
        ctx.stdout.write("%s %s (%s)\n" % (verb, printable(str(ref)), image_hex[:12]))
    ctx.stdout.write("prune %s: %s %d tags\n" % (store.url, verb, len(doomed)))
    return 0


def cmd_protect(ctx: Context, protect: bool = True) -> int:
    """protect STORE NAME:TAG... [--immutable]: tags prune never removes (and, immutable, no push moves)."""
    store = ctx.store()
    store.check()
    refs = [parse_image_ref(text) for text in ctx.options.images]
    for ref in refs:
        if protect and store.stat(tag_key(ref)) is None:
            raise NotFound("%s not found in %s" % (ref, store.url))
    for ref in refs:
        key = protection_key(ref)
        was = store.stat(key) is not None
        if protect:
            ctx.progress.note(_protect_tag(store, ref, was, getattr(ctx.options, "immutable", False)))
        elif was:
            store.delete(key)
            ctx.progress.note("unprotected %s in %s" % (ref, store.url))
        else:
            ctx.progress.note("%s was not protected in %s" % (ref, store.url))
    return 0


def _protect_tag(store: Store, ref: ImageRef, was: bool, immutable: bool) -> str:
    """Write a tag's protection marker (an immutable one stays immutable); what was done, for people."""
    if was and tag_is_immutable(store, ref):
        return "%s was already protected in %s (immutable)" % (ref, store.url)
    if immutable:
        store.put_bytes(protection_key(ref), IMMUTABLE_MARKER)
        return ("made %s immutable in %s" if was else "protected %s in %s (immutable: no push may move it)") \
            % (ref, store.url)
    if not was:
        store.put_bytes(protection_key(ref), b"")
    return ("%s was already protected in %s" if was else "protected %s in %s") % (ref, store.url)


def cmd_unprotect(ctx: Context) -> int:
    """unprotect STORE NAME:TAG...: let prune remove these tags again."""
    return cmd_protect(ctx, protect=False)


def cmd_migrate(ctx: Context) -> int:
    """migrate STORE [NAME[:TAG]...]: store the original layout's images in the current one."""
    store = ctx.store()
    store.check()
    todo = legacy_images(store, ctx.options.names)
    if not todo:
        ctx.progress.note("nothing to migrate in %s" % store.url)
    for top_hex, refs in sorted(todo.items()):
        image_hex = digest_hex(migrate_image(store, top_hex, ctx.progress, ctx.push_options()))
        if ctx.options.keep_legacy:
            store.put_bytes(image_key(top_hex, "migrated"), image_hex.encode())
        else:
            for ref in refs:
                write_tag(store, ref, image_hex, same=[top_hex])  # the same image: an immutable tag may move
        ctx.stdout.write("migrated %s (%s) -> %s\n" % (", ".join(printable(str(r)) for r in refs), top_hex[:12],
                                                        image_hex[:12]))
    return 0


def cmd_stats(ctx: Context) -> int:
    """stats STORE: what a store holds, how much sharing saves, what gc would free."""
    grace = parse_duration(ctx.options.grace)
    stats = store_stats(ctx.store(), ctx.progress, grace)
    now = time.time()
    if ctx.options.json:
        doc = stats._asdict()
        doc["dedup_ratio"] = round(stats.dedup_ratio, 3) if stats.dedup_ratio else None
        doc["chunk_dedup_ratio"] = round(stats.chunk_dedup_ratio, 3) if stats.chunk_dedup_ratio else None
        doc["held_until"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + stats.held_for)) \
            if stats.held_bytes else None
        ctx.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return 0
    ratio = "%.2fx" % stats.dedup_ratio if stats.dedup_ratio else "-"
    unreferenced = "%s (gc --grace %s frees %s of it now" % (
        human_size(stats.unreferenced_bytes), human_duration(grace), human_size(stats.freeable_bytes))
    unreferenced += "; " + held_back(stats.held_bytes, stats.held_for, grace, now) + ")" if stats.held_bytes else ")"
    rows = [("Repositories", str(stats.repositories)), ("Tags", str(stats.tags)), ("Images", str(stats.images)),
            ("Layer records", str(stats.layers)), ("Blobs", str(stats.blobs)),
            ("Stored", human_size(stats.stored_bytes)),
            ("Without sharing", "%s (dedup %s)" % (human_size(stats.unshared_bytes), ratio)),
            ("Unreferenced", unreferenced),
            ("Indexes", "%d (named by %d tags), of %d images" % (stats.indexes, stats.index_tags, stats.platform_images)),
            ("Platforms", ", ".join("%s %d" % item for item in stats.platforms.items()) or "-"),
            ("Chunks", "%d (%s stored)" % (stats.chunks, human_size(stats.chunk_bytes))),
            ("Chunked layers", "%d: %s of file contents in %s of distinct chunks (dedup %s)" % (
                stats.chunked_layers, human_size(stats.chunk_content_bytes), human_size(stats.chunk_distinct_bytes),
                "%.2fx" % stats.chunk_dedup_ratio if stats.chunk_dedup_ratio else "-"))]
    for label, value in rows:
        ctx.stdout.write("%-16s %s\n" % (label + ":", value))
    return 0


def cmd_remote(ctx: Context) -> int:
    """remote STORE: describe a store."""
    store = ctx.store()
    store.check()
    tags = list_tags(store)
    images = list_image_ids(store)
    blobs = list(store.list_sizes("blobs/"))  # one listing, not a HEAD per blob
    size = sum(blob_size for _, blob_size in blobs)
    if wants_json(ctx):
        emit_json(ctx, {"store": store.url, "kind": store.kind(), "repositories": len({r.name for r, _ in tags}),
                        "tags": len(tags), "images": len(images), "blobs": len(blobs), "blob_bytes": size})
        return 0
    ctx.stdout.write("Store:        %s (%s)\n" % (store.url, store.kind()))
    ctx.stdout.write("Repositories: %d\n" % len({r.name for r, _ in tags}))
    ctx.stdout.write("Tags:         %d\n" % len(tags))
    ctx.stdout.write("Images:       %d\n" % len(images))
    ctx.stdout.write("Layer blobs:  %d (%s)\n" % (len(blobs), human_size(size)))
    return 0


def cmd_version(ctx: Context) -> int:
    """version: print dogestry's version."""
    if wants_json(ctx):
        emit_json(ctx, {"version": __version__, "python": sys.version.split()[0]})
        return 0
    ctx.stdout.write("dogestry version %s (Python %s)\n" % (__version__, sys.version.split()[0]))
    return 0


# === 21. Command line and main() ===

COMMANDS = (
    ("push", cmd_push, "push STORE IMAGE[:TAG]... [--multi-platform | --single-platform]",
     "Store images (and their tags) in STORE."),
    ("pull", cmd_pull, "pull STORE IMAGE[:TAG]...", "Load images from STORE into the Docker host."),
    ("list", cmd_list, "list STORE", "List the repositories and tags in STORE."),
    ("inspect", cmd_inspect, "inspect STORE IMAGE", "Show what STORE holds for IMAGE, as JSON."),
    ("rm", cmd_rm, "rm STORE IMAGE:TAG|IMAGE_ID... [--platform OS/ARCH[/VARIANT]] [--force]",
     "Delete tags from STORE (an image ID: all its tags); protected ones only with --force."),
    ("gc", cmd_gc, "gc STORE [--grace DURATION] [--dry-run]",
     "Delete images, layers and blobs no tag reaches, once older than the grace period."),
    ("prune", cmd_prune, "prune STORE (--keep-last N | --older-than DURATION) [NAME...]",
     "Remove old tags per repository (never protected ones); gc then frees the space."),
    ("protect", cmd_protect, "protect STORE NAME:TAG... [--immutable]",
     "Mark tags that prune never removes (--immutable: and that no push may move to another image)."),
    ("unprotect", cmd_unprotect, "unprotect STORE NAME:TAG...",
     "Let prune remove these tags again (and pushes move them, if they were immutable)."),
    ("stats", cmd_stats, "stats STORE [--json] [--grace DURATION]",
     "Count what STORE holds, what sharing saves, what gc would free (now, and later)."),
    ("migrate", cmd_migrate, "migrate STORE [NAME[:TAG]...] [--keep-legacy]",
     "Store the original dogestry's images in the current layout (dedup, verified pulls, registry)."),
    ("import", cmd_import, "import STORE FILE|- [NAME:TAG...]",
     "Store the images of a docker save, podman save or OCI archive (no Docker engine needed)."),
    ("export", cmd_export, "export STORE IMAGE... -o FILE|- [--format docker|oci]",
     "Write images to an archive for docker load, podman load, skopeo or ctr import."),
    ("copy", cmd_copy, "copy SRC DST IMAGE...|--all",
     "Copy images between stores (only what DST lacks; server-side between buckets on one endpoint)."),
    ("remote", cmd_remote, "remote STORE", "Describe STORE."),
    ("login", cmd_login, "login REGISTRY", "Save AWS keys and an S3 URL as docker credentials for REGISTRY."),
    ("passwd", cmd_passwd, "passwd USER [--push] [--delete] [--names P,...] [--certificate]",
     "Print a line for -server -htpasswd FILE: USER, a hash of a password, and the user's rights."),
    ("version", cmd_version, "version", "Print the version."),
    ("help", None, "help [COMMAND]", "Show help for dogestry or a command."),
)

# The commands whose --json prints one document on stdout (stats has its own; inspect always prints JSON).
JSON_COMMANDS = ("push", "pull", "list", "rm", "gc", "prune", "import", "export", "copy", "remote", "version")

STORE_HELP = "a directory, file:///path or s3://bucket/prefix/?region=REGION"


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns the exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise usage_error(message, self)

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message:
            raise UsageError(message.strip())
        raise _HelpShown(status)

    def print_help(self, file: Any = None) -> None:
        """-h: hand the text to main(), which writes it to its own stdout, once."""
        raise _HelpShown(0, self.format_help())


def usage_error(message: str, parser: argparse.ArgumentParser) -> UsageError:
    """A UsageError that main() follows with PARSER's usage line."""
    error = UsageError(message)
    error.usage = parser.format_usage()
    return error


class _HelpShown(Exception):
    def __init__(self, status: int, text: str = ""):
        super().__init__(status)
        self.status, self.text = status, text


def parse_bool(text: str) -> bool:
    """true/false the Go flag way (1, t, true, 0, f, false, any case)."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes"):
        return True
    if value in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError("expected true or false, not %r" % text)


def _platform_arg(text: str) -> Platform:
    """argparse's type for --platform."""
    try:
        return parse_platform(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e))


EVERY_COMMAND_OPTIONS = frozenset({"config", "lockfile", "use-metaservice", "tempdir"})  # and -q
PULL_OPTIONS = EVERY_COMMAND_OPTIONS | {"pullhosts", "force-local", "disable-checks", "host-timeout", "port"}


def _add_global_options(parser: argparse.ArgumentParser, command: Optional[str] = None) -> None:
    """The original's single-dash options, also accepted as --long; with a command, those of them
    that may also follow it (every command's, and pull's fleet options), left unset unless given."""
    after = PULL_OPTIONS if command == "pull" else EVERY_COMMAND_OPTIONS
    group = parser if command is None else parser.add_argument_group(
        "global options (before or after the command)")  # type: Any

    def flag(name: str, **kw: Any) -> None:
        if command is None:
            group.add_argument("-" + name, "--" + name, **kw)
        elif name in after:
            group.add_argument("-" + name, "--" + name, **dict(kw, default=argparse.SUPPRESS))

    server_defaults = ServerLimits()

    flag("config", metavar="FILE", help="config file: [remote \"NAME\"] url, [s3] keys, [docker] connection")
    flag("pullhosts", metavar="HOSTS", help="pull to these Docker hosts (tcp://host:port,unix:///path,...)")
    flag("lockfile", metavar="PATH", help="wait for and hold this lock, so runs on a machine take turns")
    flag("use-metaservice", action="store_true", help="take AWS credentials from EC2 instance metadata")
    flag("server", action="store_true", help="run the accelerator server: dogestry -server [STORE]")
    flag("address", metavar="ADDR", default="0.0.0.0", help="server listen address (default 0.0.0.0)")
    flag("port", metavar="PORT", type=int, default=SERVER_PORT, help="server port (default %d)" % SERVER_PORT)
    flag("force-local", action="store_true", help="with -pullhosts: never delegate to dogestry servers")
    flag("tempdir", metavar="DIR", help="directory for temporary files (default: $TMPDIR or /tmp)")
    flag("disable-checks", action="store_true", help="with -pullhosts: skip the Docker host checks")
    flag("host-timeout", metavar="SECONDS", type=float, default=HOST_TIMEOUT,
         help="with -pullhosts: a host silent this long fails alone (default %g)" % HOST_TIMEOUT)
    flag("allow", metavar="S3_URL", action="append",
         help="with -server: a store clients may name, s3://bucket/prefix/ (repeatable)")
    flag("registry", metavar="NAME", action="append",
         help="with -server: a registry host name clients may pull under (repeatable)")
    flag("tls", action="store_true", help="with -server: serve TLS with -tlscert and -tlskey")
    flag("tlsverify", action="store_true", help="with -server: TLS, and require client certificates (-tlscacert)")
    flag("tlscacert", metavar="FILE", help="with -tlsverify: the CA that signs client certificates")
    flag("tlscert", metavar="FILE", help="with -server: the server's TLS certificate")
    flag("tlskey", metavar="FILE", help="with -server: the server's TLS key")
    flag("read-timeout", metavar="SECONDS", type=float, default=server_defaults.read_timeout,
         help="with -server: time a client has to send a request (default %g)" % server_defaults.read_timeout)
    flag("htpasswd", metavar="FILE", help="with -server: registry clients must log in as a user of FILE "
         "(lines USER:HASH[:RIGHTS[:NAMES]], see 'dogestry passwd')")
    flag("redirect", metavar="BOOL", type=parse_bool, nargs="?", const=True, default=True,
         help="with -server STORE on S3: send registry clients to presigned S3 URLs for blobs (default true; "
              "-redirect=false streams them through the server)")
    flag("anonymous-push", action="store_true",
         help="with -server STORE: anyone who reaches the port may push into the registry (never delete)")
    flag("max-connections", metavar="N", type=int,
         help="with -server: connections served at once (default: what the open-files limit leaves room for, "
              "at most %d)" % SERVER_MAX_CONNECTIONS)
    if command is None:
        parser.add_argument("-version", "--version", "-v", action="store_true", help="print the version and exit")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress output",
                       **({} if command is None else {"default": argparse.SUPPRESS}))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, then a command and its arguments."""
    parser = _Parser(prog="dogestry", allow_abbrev=False,
                     usage="dogestry [OPTIONS] COMMAND [arg...]",
                     description="Docker images stored in S3 or a directory, no registry needed.",
                     epilog="STORE is %s. Run 'dogestry help COMMAND' for details." % STORE_HELP)
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, func, usage, summary in COMMANDS:
        p = sub.add_parser(name, help=summary, description=summary, usage="dogestry " + usage,
                           allow_abbrev=False)
        p.set_defaults(func=func)
        _add_global_options(p, name)
        if name == "login":
            p.add_argument("registry", metavar="REGISTRY", help="the registry name docker users pull from")
        if name == "passwd":
            p.add_argument("user", metavar="USER", help="the user name registry clients log in with")
            p.add_argument("-push", "--push", action="store_true", help="the user may push (default: pull only)")
            p.add_argument("-delete", "--delete", action="store_true", help="the user may delete tags and manifests")
            p.add_argument("-names", "--names", metavar="P,...",
                           help="push and delete only under these repository name prefixes (team/, team/app)")
            p.add_argument("-certificate", "--certificate", action="store_true",
                           help="no password: USER logs in only with a client certificate whose subject CN is USER "
                           "(-tlsverify)")
        if name in ("push", "pull", "list", "inspect", "rm", "remote", "gc", "protect", "unprotect", "stats",
                    "import", "export"):
            p.add_argument("store", metavar="STORE", help=STORE_HELP)
        if name == "import":
            p.add_argument("file", metavar="FILE", help="the archive (.tar, .tar.gz, ...), - for stdin")
            p.add_argument("names", metavar="NAME:TAG", nargs="*",
                           help="tags for the archive's one image, or the tags of a larger archive to import")
        if name == "export":
            p.add_argument("images", metavar="IMAGE", nargs="+", help="NAME[:TAG] (or an image ID)")
            p.add_argument("-o", "--output", metavar="FILE", required=True, help="the archive to write, - for stdout")
            p.add_argument("-format", "--format", choices=("docker", "oci"), default="docker",
                           help="docker (docker load, podman load; the default) or oci (an OCI image layout:"
                           " skopeo, ctr import)")
        if name == "copy":
            p.add_argument("source", metavar="SRC", help="the store to copy from")
            p.add_argument("destination", metavar="DST", help="the store to copy to")
            p.add_argument("images", metavar="IMAGE", nargs="*", help="NAME[:TAG] (or an image ID)")
            p.add_argument("-all", "--all", action="store_true", help="copy every tag of SRC")
        if name in ("push", "pull", "rm", "protect", "unprotect"):
            p.add_argument("images", metavar="IMAGE", nargs="+", help="NAME[:TAG] (or an image ID)")
        if name in ("pull", "rm", "inspect", "import", "export"):
            p.add_argument("-platform", "--platform", metavar="OS/ARCH[/VARIANT]", type=_platform_arg, help={
                "pull": "the platform to pull from multi-platform tags (default: the engine's)",
                "rm": "remove only this platform from multi-platform tags",
                "inspect": "the image of this platform, of a multi-platform tag",
                "import": "import only this platform of multi-platform images (default: every platform)",
                "export": "the platform to export from multi-platform tags (default for --format docker: the"
                          " engine's, else this machine's; --format oci writes every platform)"}[name])
        if name == "push":
            modes = p.add_mutually_exclusive_group()
            modes.add_argument("-multi-platform", "--multi-platform", dest="platforms", action="store_const",
                               const="multi", default="auto", help=PLATFORM_MODES["multi"])
            modes.add_argument("-single-platform", "--single-platform", dest="platforms", action="store_const",
                               const="single", help=PLATFORM_MODES["single"] + " (default: %s)" % PLATFORM_MODES["auto"])
        if name == "rm":
            p.add_argument("-force", "--force", action="store_true",
                           help="delete protected tags too (and their protection)")
        if name == "protect":
            p.add_argument("-immutable", "--immutable", action="store_true",
                           help="also refuse every push that would move these tags to another image")
        if name in ("gc", "prune"):
            p.add_argument("-dry-run", "--dry-run", action="store_true", help="print what would go, change nothing")
        if name == "gc":
            p.add_argument("-grace", "--grace", metavar="DURATION", default="1h",
                           help="spare anything younger than this (default 1h; 30m, 2h, 7d; at least %s)"
                           % human_duration(GC_MIN_GRACE))
        if name == "prune":
            p.add_argument("store", metavar="STORE NAME", nargs="+",  # split in parse_command_line
                           help="the store, then the repositories to prune (default: all)")
            p.add_argument("-keep-last", "--keep-last", metavar="N", type=int,
                           help="keep the N most recently pushed tags of each repository")
            p.add_argument("-older-than", "--older-than", metavar="DURATION",
                           help="remove tags pushed longer ago than this (30m, 2h, 7d)")
        if name == "migrate":
            p.add_argument("store", metavar="STORE NAME[:TAG]", nargs="+",  # split in parse_command_line
                           help="the store, then the images to migrate (default: all)")
            p.add_argument("-keep-legacy", "--keep-legacy", action="store_true",
                           help="tags keep naming the original layout (for the original tool); this"
                           " version reads the migrated image")
        if name in JSON_COMMANDS:
            p.add_argument("-json", "--json", action="store_true",
                           help="print one JSON document on stdout (README: JSON output); progress stays on stderr")
        if name == "stats":
            p.add_argument("-json", "--json", action="store_true", help="print JSON")
            p.add_argument("-grace", "--grace", metavar="DURATION", default="1h",
                           help="count what a gc with this grace period frees now and holds back (default 1h)")
        if name == "inspect":
            p.add_argument("image", metavar="IMAGE", help="NAME[:TAG] or an image ID prefix")
        if name in ("push", "migrate", "import", "copy"):
            p.add_argument("-compress", "--compress", choices=COMPRESSIONS, default="gzip",
                           help="layer compression (default gzip; layers that do not compress are stored raw)"
                           + ("; copy: for images in the original layout, whose layers are stored anew"
                              if name == "copy" else ""))
            p.add_argument("-compress-level", "--compress-level", metavar="N", type=int, choices=GZIP_LEVELS,
                           default=GZIP_LEVEL, help="gzip level 1-9 (default %d, the fastest; 6 is what docker"
                           " push uses: smaller blobs, faster registry pulls, slower pushes)" % GZIP_LEVEL)
        if name == "help":
            p.add_argument("topic", metavar="COMMAND", nargs="?")
    return parser


def _help_text(parser: argparse.ArgumentParser, topic: Optional[str]) -> str:
    if not topic:
        return parser.format_help()
    command = _command_parser(parser, topic)
    if command is None:
        raise UsageError("unknown command %r (try 'dogestry help')" % topic)
    return command.format_help()


def _command_parser(parser: argparse.ArgumentParser, name: str) -> Optional[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return None


def parse_command_line(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """argparse, plus the original's forms: `-server [STORE]`, and `-pullhosts H STORE IMAGE` without `pull`."""
    head = _Parser(add_help=False, allow_abbrev=False)
    _add_global_options(head)
    head.add_argument("-h", "--help", action="store_true")
    early, rest = head.parse_known_args(argv)
    if early.help:
        return parser.parse_args(argv)
    if not 0 <= early.port <= 65535:
        raise UsageError("-port %d is not a TCP port (0-65535)" % early.port)
    if early.read_timeout <= 0 or (early.max_connections is not None and early.max_connections < 1) \
            or early.host_timeout <= 0:
        raise UsageError("-read-timeout, -host-timeout and -max-connections must be positive")
    if early.server:
        if len(rest) > 1 or any(r.startswith("-") for r in rest):
            raise UsageError("usage: dogestry -server [-address ADDR] [-port PORT] [STORE]")
        early.command, early.store, early.func = "server", rest[0] if rest else None, cmd_server
        return early
    names = {name for name, _, _, _ in COMMANDS}
    if early.pullhosts and rest and rest[0] not in names and not rest[0].startswith("-"):
        at = _first_positional(head, argv)
        argv = argv[:at] + ["pull"] + argv[at:]
    options, extra = parser.parse_known_args(argv)
    if options.command in ("prune", "migrate") and not any(e.startswith("-") for e in extra):
        # STORE NAME...: argparse takes one run of positionals only, so NAMEs after options come as extras
        targets, extra = options.store + extra, []
        options.store, options.names = targets[0], targets[1:]
    trailing = {"import": "names", "export": "images", "copy": "images"}.get(options.command or "")
    if trailing and extra and not any(e.startswith("-") for e in extra):
        setattr(options, trailing, getattr(options, trailing) + extra)  # names after options, as above
        extra = []
    if extra:
        raise usage_error("unrecognized arguments: %s" % " ".join(extra),
                          _command_parser(parser, options.command or "") or parser)
    if options.pullhosts and options.command not in (None, "pull", "help"):
        raise UsageError("-pullhosts goes with pull, not %s" % options.command)
    return options


def _first_positional(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Index of the first argument that is neither an option nor an option's value."""
    takes_value = {s for a in parser._actions if a.nargs is None for s in a.option_strings}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in takes_value else 1
    return i


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own malloc arena, where freed buffers linger; a few suffice.

    mallopt(M_ARENA_MAX) is glibc's; elsewhere this quietly does nothing.
    """
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None).mallopt(-8, arenas)  # -8 is M_ARENA_MAX in glibc's malloc.h


INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE (sysexits.h)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None,
         stdout: Optional[IO[str]] = None, stderr: Optional[IO[str]] = None,
         stdin: Optional[IO[str]] = None) -> int:
    """Run dogestry; the one place where errors become a message and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    limit_malloc_arenas()
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        try:
            options = parse_command_line(parser, argv)
        except _HelpShown as shown:
            stdout.write(shown.text)
            return shown.status
        if options.version:
            return cmd_version(Context(environ, stdout, stderr, options))
        if not options.command:
            raise usage_error("no command given (try 'dogestry help')", parser)
        if options.command == "help":
            stdout.write(_help_text(parser, options.topic))
            return 0
        ctx = Context(environ, stdout, stderr, options, stdin)
        if options.lockfile:
            with file_lock(options.lockfile, ctx.progress):
                return options.func(ctx)
        return options.func(ctx)
    except _HelpShown as shown:
        return shown.status
    except KeyboardInterrupt:
        stderr.write("dogestry: interrupted\n")
        return Interrupted.exit_code
    except DogestryError as e:
        stderr.write("dogestry: error: %s\n" % printable(str(e).replace("\n", " ")))
        if isinstance(e, UsageError):
            stderr.write(e.usage)
        return e.exit_code
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug: one line naming it; the traceback only when asked for
        if environ.get("DOGESTRY_DEBUG") == "1":
            import traceback
            traceback.print_exc(file=stderr)
        stderr.write("dogestry: internal error (a bug; DOGESTRY_DEBUG=1 shows where): %s: %s\n"
                     % (type(e).__name__, printable(str(e).replace("\n", " "))[:500]))
        return INTERNAL_ERROR_EXIT
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def run_as_program() -> None:
    """Run main() and exit with its status; an interrupted run exits at once, not waiting on
    threads still blocked on the network (its work is stopped and cleaned up by then)."""
    status = main()
    if status == Interrupted.exit_code:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run_as_program()
