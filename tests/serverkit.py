"""Helpers for the tests of `dogestry -server`: the server as a subprocess, raw and JSON HTTP
exchanges with it, the docker CLI as its client, and loopback addresses nobody else uses.

Each "host" of a test fleet gets a random address in 127.0.0.0/8 (all of it is loopback), checked
free on the ports the tests use, so concurrent suites on one machine do not collide.
"""

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse

import dogestry
import tempfile

from realdocker import (DOGESTRY, _die_with_parent, client_env, docker_cli, find_docker, remove_tree, run_dogestry,
                        start_dockerd, stop_all)

PORT = dogestry.SERVER_PORT       # the server's default port (the README's)
DOCKER_PORT = 2375
SERVER_READY_TIMEOUT = 15.0


# --- HTTP exchanges ----------------------------------------------------------------------------

class Answer:
    """A whole HTTP answer: status, headers (http.client's response) and body."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def lines(self):
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]

    def errors(self):
        return [d for d in self.lines() if d.get("errorDetail") or d.get("error")]

    def __repr__(self):
        return "<Answer %d %r>" % (self.status, self.body[:400])


def call(address, method, path, headers=None, body=None, timeout=60, port=PORT, source=None):
    """One request on a fresh connection (from loopback address SOURCE if given)."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, resp, resp.read())
    finally:
        conn.close()


def registry_error_code(answer):
    """The code of the one error in a registry API answer (the spec's JSON, with a message)."""
    assert answer.headers.getheader("Content-Type", "").startswith("application/json"), answer
    (error,) = answer.json()["errors"]
    assert error["message"]
    return error["code"]


def pull_request(address, name, auth, tag="latest", timeout=120, port=PORT, source=None):
    """POST /images/create as the docker CLI sends it."""
    query = "fromImage=%s&tag=%s" % (name.replace("/", "%2F"), tag)
    return call(address, "POST", "/v1.41/images/create?" + query, {"X-Registry-Auth": auth},
                timeout=timeout, port=port, source=source)


def raw_exchange(address, data, timeout=20, port=PORT):
    """Send raw bytes, half-close, and read the whole answer (status line, headers, body)."""
    with socket.create_connection((address, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before it has read everything
        return read_until_closed(sock)


def read_until_closed(sock):
    """Everything SOCK receives until the other side closes (or resets) it."""
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except ConnectionResetError:
        pass
    return out


def read_answer(sock):
    """Read one HTTP answer with a Content-Length body from SOCK."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    while m and len(body) < int(m.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def raw_status(answer):
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert m, answer[:300]
    return int(m.group(1))


def raw_body(answer):
    return answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""


def assert_json_refusal(answer, status, *needles):
    """ANSWER has STATUS, a JSON body, and a message holding every needle; return the message."""
    assert answer.status == status, answer
    assert answer.headers.getheader("Content-Type", "").startswith("application/json"), answer
    message = answer.json()["message"]
    for needle in needles:
        assert needle in message, message
    return message


def auth_header(doc):
    """X-Registry-Auth as the docker CLI sends it: base64url JSON."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return base64.urlsafe_b64encode(raw).decode()


def b64(text):
    return base64.b64encode(text.encode()).decode()


# --- the docker CLI and the fleet's hosts -------------------------------------------------------

def docker_user(address, *args, config_dir, timeout=180, port=PORT, tls_args=()):
    """The real docker CLI, as a user pointing at the dogestry server (DOCKER_CONFIG=config_dir)."""
    host = "tcp://%s:%d" % (address, port)
    env = {k: v for k, v in client_env(host).items() if not k.startswith("AWS_")}
    env["DOCKER_CONFIG"] = str(config_dir)
    return subprocess.run([find_docker()] + [str(a) for a in tls_args] + ["-H", host] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env,
                          timeout=timeout)


def login(env, registry, answers):
    return run_dogestry("login", registry, env=env, input=answers, timeout=60)


@contextlib.contextmanager
def started_dockerds(addresses, extra_args=()):
    """A dockerd per address, each a 'host' with a unix socket and tcp://ADDRESS:2375 (or
    whatever port extra_args' TLS flags want); all stopped and removed afterwards."""
    workdir = tempfile.mkdtemp(prefix="dgsv", dir="/tmp")
    handles = []
    try:
        for n, address in enumerate(addresses):
            handles.append(start_dockerd(os.path.join(workdir, "h%d" % n), address, extra_args=extra_args))
        yield handles
    finally:
        stop_all(handles)
        remove_tree(workdir)


def wipe(handle):
    """Remove every image and container from a fleet host (a fresh host for the next test)."""
    ids = docker_cli(handle.host, "ps", "-aq").stdout.split()
    if ids:
        docker_cli(handle.host, "rm", "-f", *ids, check=False)
    ids = docker_cli(handle.host, "images", "-aq").stdout.split()
    if ids:
        docker_cli(handle.host, "rmi", "-f", *sorted(set(ids)), check=False)


def server_env(base_env, handle, endpoint):
    """A fleet host's server: DOCKER_HOST = that host's socket, the S3 endpoint, and no AWS keys."""
    return dict(base_env, DOCKER_HOST=handle.host, AWS_ENDPOINT_URL=endpoint)


# --- the server subprocess ----------------------------------------------------------------------

ACCESS_LINE = re.compile(r'^(\S+) - - \[[^\]]+\] "([A-Z]+) (\S+) HTTP/1\.[01]" (\d{3}) ')


class Server:
    """A `dogestry -server` subprocess; its stdout and stderr go to files."""

    def __init__(self, address, env, workdir, store=None, args=(), port=PORT, tls=None, preexec=None):
        self.address, self.port, self.tls = address, port, tls
        self.url = "%s://%s:%d" % ("https" if tls else "http", address, port)
        self.out_path = workdir / ("server-%s-%d.out" % (address, port))
        self.err_path = workdir / ("server-%s-%d.err" % (address, port))
        argv = [sys.executable, str(DOGESTRY), "-server", "-address", address, "-port", str(port)]
        argv += [str(a) for a in args] + ([str(store)] if store else [])

        def preexec_fn():
            _die_with_parent()
            if preexec:
                preexec()

        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                         start_new_session=True, preexec_fn=preexec_fn)

    def wait_ready(self):
        deadline = time.monotonic() + SERVER_READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited with %s:\n%s\n%s" % (self.proc.returncode, self.stdout, self.stderr))
            if status_check(self.url, self.tls):
                return self
            time.sleep(0.05)
        raise AssertionError("server not ready:\n%s\n%s" % (self.stdout, self.stderr))

    @property
    def stdout(self):
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def access_log(self):
        """(client, method, target, status) of every access log line so far."""
        found = []
        for line in self.stdout.splitlines():
            m = ACCESS_LINE.match(line)
            if m:
                found.append((m.group(1), m.group(2), m.group(3), int(m.group(4))))
        return found

    def posts_to_create(self):
        return [e for e in self.access_log() if e[1] == "POST" and "/images/create" in e[2]]

    def delegated_posts(self):
        return [e for e in self.access_log() if e[1] == "POST" and e[2] == dogestry.DELEGATION_ROUTE]

    def threads(self):
        """How many threads the server process runs now."""
        with open("/proc/%d/status" % self.proc.pid) as f:
            return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))

    def thread_states(self):
        """What each of the server's threads is doing now: (state, kernel wait channel, CPU clock
        ticks used), for messages of failed checks."""
        states = []
        for task in sorted(os.listdir("/proc/%d/task" % self.proc.pid)):
            base = "/proc/%d/task/%s/" % (self.proc.pid, task)
            with contextlib.suppress(OSError):
                with open(base + "stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(base + "wchan") as f:
                    states.append((fields[0], f.read().strip(), int(fields[11]) + int(fields[12])))
        return states

    def cpu_seconds(self):
        """User + system CPU time the server process has used so far."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Signal the server; return (exit status, seconds it took)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None, time.monotonic() - start
        return self.proc.returncode, time.monotonic() - start

    def assert_no_traceback(self):
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            assert "Traceback" not in text, "server %s has a traceback:\n%s" % (name, text)


def status_check(url, tls=None, timeout=1.0):
    """True if GET URL/status/check answers 200 OK (over TLS with context TLS for https URLs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", "/status/check")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read(64) == b"OK"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def tls_client_context(ca, cert=None, key=None):
    """An SSL context that trusts CA (and shows a client certificate, if given)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx
