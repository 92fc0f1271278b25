"""Helpers for tests that drive a real dockerd: start/stop daemons, build images, make data."""

import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
DOGESTRY = REPO_ROOT / "dogestry.py"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
MAX_RUNDIR_LEN = 40  # leaves room for exec-root/containerd/containerd.sock.ttrpc < 108 bytes
FIXED_MTIME = 1577836800  # 2020-01-01T00:00:00Z, so identical layers get identical diffIDs
CLIENT_ENV_DROP = ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_TLS")


class DockerdError(RuntimeError):
    """dockerd could not be found or did not become ready."""


class DockerCliError(subprocess.CalledProcessError):
    """A docker CLI call failed; str() includes its output."""

    def __str__(self):
        return "%s\nstdout:\n%s\nstderr:\n%s" % (
            super().__str__(), self.stdout or "", self.stderr or "")


def is_ci():
    """True when running in CI, where skips count as failures."""
    return os.environ.get("CI", "").lower() == "true"


def find_dockerd():
    """Path of the dockerd binary ($DOCKERD_BIN overrides), or None."""
    if os.environ.get("DOCKERD_BIN"):
        return shutil.which(os.environ["DOCKERD_BIN"])
    return shutil.which("dockerd") or next(
        (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if os.access(p, os.X_OK)), None)


def find_docker():
    """Path of the docker CLI, or None."""
    return shutil.which("docker")


def _ping_unix(path, timeout=1.0):
    """True if a Docker API on unix socket PATH answers GET /_ping with 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            return _ping_over(sock)
    except OSError:
        return False


def _ping_tcp(host, port, timeout=1.0):
    """True if a Docker API on HOST:PORT answers GET /_ping with 200."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return _ping_over(sock)
    except OSError:
        return False


def _tcp_open(docker_host, timeout=1.0):
    """True if something accepts TCP connections at tcp://HOST:PORT (no HTTP: it may be TLS)."""
    host, _, port = docker_host[len("tcp://"):].rstrip("/").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _ping_over(sock):
    """Send GET /_ping on a connected socket and check for a 200 status."""
    sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    return sock.recv(64).split(b" ")[1:2] == [b"200"]


def ping(docker_host, timeout=1.0):
    """True if the daemon at DOCKER_HOST URL (unix:// or tcp://) answers /_ping."""
    if docker_host.startswith("unix://"):
        return _ping_unix(docker_host[len("unix://"):], timeout)
    if docker_host.startswith("tcp://"):
        host, _, port = docker_host[len("tcp://"):].rstrip("/").rpartition(":")
        return _ping_tcp(host, int(port), timeout)
    raise ValueError("unsupported DOCKER_HOST: %r" % docker_host)


def _die_with_parent():
    """In the child: get SIGTERM if pytest dies, so a killed session leaks no dockerd."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path, lines=40):
    """Last LINES lines of a text file, or a note if it is unreadable."""
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return "(no log: %s)" % e


def _pid_alive(pid):
    """True if process PID exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid):
    """Command line of process PID as one string, or ''."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _mounts_under(path):
    """Mount points at or below PATH, deepest first."""
    prefix = str(path).rstrip("/")
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                point = line.split()[1].replace("\\040", " ")
                if point == prefix or point.startswith(prefix + "/"):
                    found.append(point)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def unmount_under(path):
    """Lazily unmount anything left mounted at or below PATH (busy vfs/netns mounts)."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


def remove_tree(path):
    """Remove PATH after unmounting leftovers; never raises."""
    if path and os.path.lexists(str(path)):
        unmount_under(path)
        shutil.rmtree(str(path), ignore_errors=True)


class DockerdHandle:
    """A dockerd started by start_dockerd(); .host, .tcp, .stop()."""

    def __init__(self, workdir, rundir, own_rundir, tcp, extra_args=()):
        self.proc = None
        self.pid = None
        self.workdir = Path(workdir)
        self.rundir = Path(rundir)
        self.own_rundir = own_rundir
        self.data_root = self.workdir / "data"
        self.exec_root = self.rundir / "e"
        self.socket = self.rundir / "docker.sock"
        self.log_path = self.workdir / "dockerd.log"
        self.host = "unix://%s" % self.socket
        self.tcp = tcp
        self.extra_args = [str(a) for a in extra_args]
        self.containerd_pid = None

    @property
    def tls(self):
        """True if extra_args set any --tls* flag (then the TCP listener is not plain HTTP)."""
        return any(a.startswith("--tls") for a in self.extra_args)

    def __repr__(self):
        return "<DockerdHandle pid=%s host=%s tcp=%s>" % (self.pid, self.host, self.tcp)

    def launch(self, dockerd):
        """Start the dockerd process, logging to log_path (does not wait)."""
        (self.workdir / "daemon.json").write_text("{}\n")  # ignore any /etc/docker/daemon.json
        with open(str(self.log_path), "ab") as log:
            self.proc = subprocess.Popen(self.command(dockerd), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self.pid = self.proc.pid

    def command(self, dockerd):
        """Command line for this isolated dockerd."""
        args = [dockerd, "--config-file", str(self.workdir / "daemon.json"),
                "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
                "--bridge=none", "--data-root", str(self.data_root),
                "--exec-root", str(self.exec_root), "--host", self.host,
                "--pidfile", str(self.workdir / "dockerd.pid")]
        if self.tcp:
            args += ["--host", self.tcp]
            if not self.tls:
                # explicit --tls=false: newer dockerd sleeps 15 s or refuses plain TCP otherwise
                args.append("--tls=false")
        return args + self.extra_args

    def env(self, base=None):
        """Environment for subprocesses talking to this daemon."""
        return client_env(self.host, base)

    def log_tail(self, lines=40):
        """Last lines of this daemon's log."""
        return _tail(self.log_path, lines)

    def is_ready(self):
        """True if every listener of this daemon answers /_ping."""
        if not ping(self.host):
            return False
        if self.tcp is None:
            return True
        # a TLS listener cannot answer a plain /_ping; it is served with the unix socket
        return _tcp_open(self.tcp) if self.tls else ping(self.tcp)

    def wait_ready(self, timeout=START_TIMEOUT):
        """Poll /_ping until ready; raise DockerdError with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DockerdError("dockerd exited with status %s before it was ready; log tail:\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            if self.is_ready():
                self.containerd_pid = self._read_containerd_pid()
                return self
            time.sleep(0.05)
        raise DockerdError("dockerd not ready after %.0f s; log tail:\n%s" % (timeout, self.log_tail()))

    def _read_containerd_pid(self):
        """PID of the containerd this dockerd started, or None."""
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def terminate(self):
        """Send SIGTERM without waiting (lets a fleet shut down in parallel)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, remove_data=True):
        """Stop dockerd (TERM, then KILL), kill its containerd, and remove its dirs."""
        self.terminate()
        if self.proc is not None:
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_containerd()
        unmount_under(self.data_root)
        unmount_under(self.rundir)
        if remove_data:
            remove_tree(self.data_root)
        if self.own_rundir:
            remove_tree(self.rundir)

    def _kill_containerd(self):
        """Kill our containerd child if it outlived dockerd (checked by its cmdline)."""
        pid = self.containerd_pid or self._read_containerd_pid()
        if not pid or str(self.exec_root) not in _cmdline(pid):
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _pid_alive(pid):
                return


def _tcp_url(tcp_address):
    """Normalise "127.0.0.2:2375" or "tcp://127.0.0.2:2375" to the tcp:// form."""
    if not tcp_address:
        return None
    return tcp_address if tcp_address.startswith("tcp://") else "tcp://" + tcp_address


def start_dockerd(workdir, tcp_address=None, timeout=START_TIMEOUT, extra_args=()):
    """Start an isolated dockerd keeping its state in WORKDIR; return a ready DockerdHandle.

    tcp_address: e.g. "127.0.0.2:2375" or "tcp://127.0.0.2:2375" for an extra TCP listener.
    extra_args: more dockerd flags, e.g. ["--tlsverify", "--tlscacert", CA, ...]; any --tls*
    flag drops the default --tls=false and makes readiness check the TCP port by connecting.
    The socket and exec-root go in a short directory under /tmp if WORKDIR's path is long.
    """
    dockerd = find_dockerd()
    if not dockerd:
        raise DockerdError("dockerd not found on PATH (install docker.io)")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    own_rundir = len(str(workdir)) > MAX_RUNDIR_LEN
    rundir = tempfile.mkdtemp(prefix="dgst", dir="/tmp") if own_rundir else str(workdir)
    handle = DockerdHandle(workdir, rundir, own_rundir, _tcp_url(tcp_address), extra_args)
    try:
        handle.launch(dockerd)
        return handle.wait_ready(timeout)
    except OSError as e:
        handle.stop()
        raise DockerdError("cannot run %s: %s" % (dockerd, e))
    except BaseException:
        handle.stop()
        raise


def stop_all(handles):
    """Stop several dockerds, signalling all first so they shut down in parallel."""
    for h in handles:
        h.terminate()
    for h in handles:
        h.stop()


def client_env(docker_host, base=None):
    """Copy of BASE (default os.environ) for docker clients: DOCKER_HOST set, BuildKit off."""
    env = dict(os.environ if base is None else base)
    for name in CLIENT_ENV_DROP:
        env.pop(name, None)
    env["DOCKER_HOST"] = docker_host
    env["DOCKER_BUILDKIT"] = "0"
    return env


def docker_cli(docker_host, *args, check=True, input=None, text=True, timeout=600):
    """Run `docker -H HOST ARGS` (BuildKit off); return CompletedProcess, raise DockerCliError if check."""
    docker = find_docker()
    if not docker:
        raise DockerdError("docker CLI not found on PATH (install docker.io)")
    cmd = [docker, "-H", docker_host] + [str(a) for a in args]
    proc = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=text, env=client_env(docker_host), timeout=timeout)
    if check and proc.returncode != 0:
        raise DockerCliError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def inspect_image(docker_host, ref):
    """`docker image inspect REF` as a dict."""
    return json.loads(docker_cli(docker_host, "image", "inspect", ref).stdout)[0]


def image_id(docker_host, ref):
    """The engine's ID for REF, or None when it has no such image."""
    proc = docker_cli(docker_host, "image", "inspect", "-f", "{{.Id}}", ref, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_layers(docker_host, ref):
    """RootFS diffIDs of image REF."""
    return inspect_image(docker_host, ref)["RootFS"].get("Layers") or []


def _write_layer(layer_dir, files):
    """Write {relative_name: bytes|str} under LAYER_DIR with fixed modes and mtimes."""
    layer_dir.mkdir(parents=True)
    for name, content in files.items():
        path = layer_dir / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        os.chmod(str(path), 0o644)
    for path in sorted(layer_dir.rglob("*"), reverse=True) + [layer_dir]:
        os.utime(str(path), (FIXED_MTIME, FIXED_MTIME))


def tar_bytes(files):
    """An uncompressed tar (bytes) of FILES ({name: bytes}, in that order)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def small_save_archive(path):
    """Write at PATH a docker save archive of one tiny image, small/app:1 (one layer holding hello),
    made without an engine; return PATH."""
    layer = tar_bytes({"hello": b"hello\n"})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["small/app:1"], "Layers": ["layer.tar"]}]
    Path(path).write_bytes(tar_bytes({"layer.tar": layer, config_name: config,
                                      "manifest.json": json.dumps(manifest).encode()}))
    return Path(path)


def write_context(ctxdir, layers, extra_lines=()):
    """Write a FROM-scratch build context: one `COPY lN/ /` per layer, then EXTRA_LINES."""
    ctxdir = Path(ctxdir)
    lines = ["FROM scratch"]
    for index, files in enumerate(layers):
        _write_layer(ctxdir / ("l%d" % index), files)
        lines.append("COPY l%d/ /" % index)
    lines.extend(extra_lines)
    (ctxdir / "Dockerfile").write_text("\n".join(lines) + "\n")
    return ctxdir


def build_image(docker_host, tag, layers, workdir=None, extra_lines=()):
    """Build a FROM-scratch image TAG whose layers hold LAYERS' files; return its sha256: ID.

    layers: list of {relative_filename: bytes}; each dict becomes exactly one COPY layer.
    extra_lines: more Dockerfile lines after the COPYs, e.g. ["LABEL x=y", "ENV A=b"].
    """
    ctxdir = Path(tempfile.mkdtemp(prefix="ctx", dir=str(workdir) if workdir else None))
    try:
        write_context(ctxdir, layers, extra_lines)
        docker_cli(docker_host, "build", "-q", "-t", tag, str(ctxdir))
    finally:
        shutil.rmtree(str(ctxdir), ignore_errors=True)
    return docker_cli(docker_host, "inspect", "-f", "{{.Id}}", tag).stdout.strip()


def random_bytes(n, seed):
    """N deterministic pseudo-random (incompressible) bytes from SEED."""
    if n <= 0:
        return b""
    rng = random.Random(seed)
    if hasattr(rng, "randbytes"):
        return rng.randbytes(n)
    return rng.getrandbits(n * 8).to_bytes(n, "little")


_WORDS = ("docker image layer registry push pull store tarball manifest config digest "
          "sha256 gzip bucket object upload download verify repository tag latest alpha "
          "beta gamma delta lorem ipsum dolor sit amet consectetur adipiscing elit").split()


def text_bytes(n, seed):
    """N deterministic bytes of compressible text (word lines) from SEED."""
    if n <= 0:
        return b""
    rng = random.Random(seed)
    pool = [(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) + "\n").encode()
            for _ in range(512)]
    count = n // 40 + 1
    out = b"".join(rng.choices(pool, k=count))
    while len(out) < n:
        out += b"".join(rng.choices(pool, k=count))
    return out[:n]


def ok(proc):
    """Insist a finished dogestry run succeeded, without a traceback; return it."""
    assert proc.returncode == 0, "exit %d\nstdout:\n%s\nstderr:\n%s" % (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_error_line(proc, *needles):
    """A failure is one 'dogestry: error:' line holding every needle, no traceback, non-zero exit."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dogestry: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr
    return lines[0]


def run_dogestry(*args, env=None, input=None, timeout=300, cwd=None):
    """Run `python dogestry.py ARGS`; return CompletedProcess with text stdout/stderr."""
    cmd = [sys.executable, str(DOGESTRY)] + [str(a) for a in args]
    return subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=timeout, cwd=cwd)


def loopback_addresses(n, ports=(2375, 22375)):
    """N random addresses in 127.0.0.0/8 (all of it is loopback) on which nothing listens on PORTS
    (by default the Docker and dogestry server ports): hosts of a test fleet that no concurrent
    run of the suite can collide with."""
    found = []
    rng = random.SystemRandom()
    while len(found) < n:
        address = "127.%d.%d.%d" % (rng.randrange(100, 255), rng.randrange(0, 256), rng.randrange(2, 255))
        if address in found:
            continue
        if all(_free(address, port) for port in ports):
            found.append(address)
    return tuple(found)


def _free(address, port):
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) != 0
