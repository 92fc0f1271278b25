"""Throw-away one-node Ceph cluster + radosgw, for tests that need a real,
signature-checking S3.  Standard library only (Python 3.8+), Linux only.

    gw = start_radosgw(None)          # or start_radosgw("/tmp/rgwXYZ")
    try:
        gw.endpoint, gw.access_key, gw.secret_key, gw.region
    finally:
        gw.stop()                     # or: with start_radosgw(None) as gw: ...

Layout: 1 monitor (msgr v1 only, loopback, free port), 1 bluestore OSD on a
sparse 16 GiB file, no mgr, ``auth none`` between Ceph daemons, radosgw with
the beast frontend on a free loopback port, and one S3 user ("tester") with
random keys.  Every daemon runs in its own session/process group and is
killed by ``stop()`` (rgw, osd, mon, in that order), which then removes the
work dir.  Startup takes ~6 s here.

Needs the Debian packages radosgw ceph-mon ceph-osd (pulling ceph-common);
no systemd, nothing in /etc/ceph or /var/lib/ceph is used.
"""

import atexit
import ctypes
import ctypes.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

__all__ = ["RadosGW", "RadosGWError", "start_radosgw"]

# radosgw accepts any region string in the SigV4 credential scope (it only
# uses it to recompute the signature), so 'us-east-1' is the conventional
# choice.  NB: GetBucketLocation answers "default" (the zonegroup name), and
# CreateBucket with a <LocationConstraint> other than "default" is refused
# with 400 InvalidLocationConstraint -- send no CreateBucketConfiguration.
DEFAULT_REGION = "us-east-1"

# A sun_path holds 107 bytes + NUL; leave room for "ceph-client.rgw.a.asok".
_MAX_RUN_DIR = 70

STEP_TIMEOUT = 90.0  # seconds for any single step / wait

_CLI_ATTEMPTS = 5
_FSID_RACE_MARKERS = ("problem getting command descriptions", "wrong fsid")


class RadosGWError(RuntimeError):
    """A step of building/starting the cluster failed or timed out."""


class _PortClash(RadosGWError):
    """A daemon could not bind a port we picked (raced); worth a retry."""


# ---------------------------------------------------------------------------
# Ports.  We pick ports *below* the kernel's ephemeral range (so outgoing
# connections never get them) and hold a "reservation" socket on each until
# the daemon listens: bound, not listening, SO_REUSEADDR set after bind.  That
# blocks any plain bind() probe (e.g. another start_radosgw picking ports) but
# lets the daemon's own SO_REUSEADDR listener bind it.
# ---------------------------------------------------------------------------
def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _reserve_port(host, port=None):
    """Return a reservation socket bound to (host, port); port None -> pick."""
    def try_bind(p):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, p))
        except OSError:
            s.close()
            return None
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s

    if port is not None:
        s = try_bind(int(port))
        if s is None:
            raise RadosGWError("port %s:%s is already in use" % (host, port))
        return s
    hi = _ephemeral_low() - 1
    lo = 20000 if hi - 20000 >= 2000 else 1024
    rnd = random.SystemRandom()
    for _ in range(200):
        p = rnd.randint(lo, hi)
        if 6789 <= p <= 7300:  # ceph's own default mon / OSD ports
            continue
        s = try_bind(p)
        if s is not None:
            return s
    s = try_bind(0)  # fall back to a kernel-chosen (ephemeral) port
    if s is None:
        raise RadosGWError("no free TCP port on %s" % host)
    return s


def _listen_inodes(port):
    """Socket inodes of TCP sockets in LISTEN state on local port `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except (OSError, StopIteration):
            continue
    return inodes


def _pid_listens_on(pid, port):
    """True if process `pid` itself holds a listening socket on `port`
    (a stranger listening on the port does not count)."""
    inodes = _listen_inodes(port)
    if not inodes:
        return False
    fd_dir = "/proc/%d/fd" % pid
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return "<no log %s: %s>" % (path, e)
    return "\n".join(data.splitlines()[-lines:])


# --- die-with-parent (Linux): daemons get SIGKILL if the starter dies -------
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # pragma: no cover
    _libc = None
_PR_SET_PDEATHSIG = 1


def _make_preexec(die_with_parent):
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only use
    # it from the main thread (whose end is the end of the process).
    if not (die_with_parent and _libc is not None
            and threading.current_thread() is threading.main_thread()):
        return None
    prctl = _libc.prctl

    def preexec():  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


class _Daemon:
    def __init__(self, name, proc, log, out):
        self.name = name
        self.proc = proc
        self.log = log  # the daemon's own ceph log file
        self.out = out  # its stdout/stderr

    def alive(self):
        return self.proc.poll() is None

    def kill(self, grace=5.0):
        p = self.proc
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of the group (the daemon itself or strays)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


class RadosGW:
    """A running throw-away radosgw.

    endpoint ('http://127.0.0.1:PORT'), access_key, secret_key, region
    ('us-east-1'), host, port, mon_port, workdir, conf (ceph.conf path),
    startup_seconds, timings (step -> seconds since start).
    """

    def __init__(self, workdir, run_dir, conf, host, port, mon_port, access_key,
                 secret_key, region=DEFAULT_REGION):
        self.workdir = workdir
        self.run_dir = run_dir
        self.conf = conf
        self.host = host
        self.port = port
        self.mon_port = mon_port
        self.endpoint = "http://%s:%d" % (host, port)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.startup_seconds = None
        self.timings = {}
        self.cli_retries = 0  # ceph CLI calls retried after the fsid-0 race
        self._daemons = {}  # name -> _Daemon
        self._reservations = []
        self._stopped = False
        self._keep = False  # keep the work dir (debugging: RGW_KEEP=1)

    # -- helpers usable by tests ---------------------------------------------
    def log_path(self, name):
        """Path of the ceph log of 'mon.a', 'osd.0' or 'client.rgw.a'."""
        return os.path.join(self.workdir, "log", "%s.log" % name)

    def ceph(self, *args, timeout=60):
        """Run the ceph CLI against this cluster; returns stdout (str).

        With auth none, a client's first mon request can go out before its
        MonClient has the monmap, with fsid 0; the mon then refuses it
        (EPERM 'wrong fsid', shown by the CLI as "problem getting command
        descriptions from mon").  That first request is the CLI's
        get_command_descriptions, so the command itself was not sent and a
        retry is safe."""
        cmd = ["ceph", "-c", self.conf, "--connect-timeout", "30"] + list(args)
        for attempt in range(_CLI_ATTEMPTS):
            try:
                return _run(cmd, timeout=timeout, what="ceph " + " ".join(args))
            except RadosGWError as e:
                if attempt == _CLI_ATTEMPTS - 1 or not any(
                        m in str(e) for m in _FSID_RACE_MARKERS):
                    raise
                self.cli_retries += 1
                time.sleep(0.2)

    def radosgw_admin(self, *args, timeout=60):
        """Run radosgw-admin against this cluster; returns stdout (str)."""
        return _run(["radosgw-admin", "-c", self.conf] + list(args),
                    timeout=timeout, what="radosgw-admin " + " ".join(args))

    def pids(self):
        """{'mon.a': pid, 'osd.0': pid, 'client.rgw.a': pid} of live daemons."""
        return {n: d.proc.pid for n, d in self._daemons.items() if d.alive()}

    # -- lifecycle -------------------------------------------------------------
    def stop(self, keep_workdir=False):
        """Kill rgw, osd, mon (that order, SIGTERM then SIGKILL to each process
        group), then remove the work dir unless keep_workdir.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._keep = self._keep or keep_workdir
        for name in ("client.rgw.a", "osd.0", "mon.a"):
            d = self._daemons.get(name)
            if d is not None:
                d.kill()
        for d in self._daemons.values():  # anything else, just in case
            d.kill()
        _close_all(self._reservations)
        if not self._keep:
            if self.run_dir != os.path.join(self.workdir, "run"):
                shutil.rmtree(self.run_dir, ignore_errors=True)
            shutil.rmtree(self.workdir, ignore_errors=True)
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover
            pass

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<RadosGW %s workdir=%s>" % (self.endpoint, self.workdir)


def _close_all(socks):
    while socks:
        try:
            socks.pop().close()
        except OSError:  # pragma: no cover
            pass


def _run(cmd, timeout=60, what=None, log=None):
    what = what or " ".join(cmd)
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        msg = "%s: timed out after %ss" % (what, timeout)
        if e.stderr:
            msg += "\nstderr:\n" + e.stderr.decode("utf-8", "replace")[-4000:]
        if log:
            msg += "\n--- tail of %s ---\n%s" % (log, _tail(log))
        raise RadosGWError(msg) from None
    except OSError as e:
        raise RadosGWError("%s: cannot run: %s" % (what, e)) from None
    if r.returncode != 0:
        msg = "%s: exit status %d\nstdout:\n%s\nstderr:\n%s" % (
            what, r.returncode, r.stdout.decode("utf-8", "replace")[-4000:],
            r.stderr.decode("utf-8", "replace")[-4000:])
        if log:
            msg += "\n--- tail of %s ---\n%s" % (log, _tail(log))
        raise RadosGWError(msg)
    return r.stdout.decode("utf-8", "replace")


_CONF = """\
[global]
fsid = {fsid}
mon_host = v1:{host}:{mon_port}
mon_initial_members = a
public_addr = {host}
cluster_addr = {host}
ms_bind_msgr2 = false
ms_bind_ipv6 = false
# a daemon that cannot bind its port exits at once instead of retrying 3x5 s
ms_bind_retry_count = 1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = {run}
pid_file = {run}/$name.pid
log_file = {w}/log/$name.log
log_to_stderr = false
err_to_stderr = true
crash_dir = {w}/crash
keyring = {w}/keyring
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
# do not refuse to start on a fullish disk (the OSD file is sparse)
mon_data_avail_warn = 1
mon_data_avail_crit = 0
# Every osdmap change (osd new, crush add, osd boot, each of rgw's pool
# creations) otherwise waits up to 1 s for the next paxos round: ~17 s -> ~6 s.
paxos_propose_interval = 0.1

[mon]
admin_socket = {run}/$cluster-$name.asok

[mon.a]
mon_data = {w}/mon

[osd]
admin_socket = {run}/$cluster-$name.asok

[osd.0]
osd_data = {w}/osd
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 17179869184
osd_memory_target = 1073741824
# With auth none, OSD::init may send its first mon command before its
# MonClient has the monmap; it then carries fsid 0, the mon answers EPERM
# 'wrong fsid' and the OSD exits ("unable to update_crush_device_class",
# ~1 start in 3 here).  So the OSD leaves CRUSH alone; start_radosgw places
# it with `ceph osd crush add osd.0 1.0 root=default` instead.
osd_class_update_on_start = false
osd_crush_update_on_start = false

[client.rgw.a]
admin_socket = {run}/$cluster-$name.asok
rgw_data = {w}/rgw
rgw_frontends = beast endpoint={host}:{rgw_port}
"""


def _random_key(n, alphabet):
    return "".join(secrets.choice(alphabet) for _ in range(n))


def start_radosgw(workdir=None, port=None, *, host="127.0.0.1",
                  timeout=STEP_TIMEOUT, die_with_parent=True, retries=3,
                  _mon_port=None):
    """Build and start a one-node Ceph cluster plus radosgw in ``workdir``.

    workdir: directory for everything (created; must be empty or absent).
             None -> a fresh ``/tmp/rgwXXXXXXXX``.  Removed by ``stop()``.
             Admin sockets live in it unless its path is too long for a unix
             socket, in which case they go to a separate short /tmp dir.
    port:    rgw HTTP port; None -> a free port (the mon port is always
             picked free).
    timeout: limit for each step / wait, in seconds.
    die_with_parent: when called from the main thread, daemons get SIGKILL
             if this process dies without calling stop() (PR_SET_PDEATHSIG);
             stop() is also registered with atexit.
    retries: attempts when a picked port turns out to be taken meanwhile.
    Environment: RGW_KEEP=1 keeps the work dir (logs) of a failed start.

    Returns a RadosGW; raises RadosGWError (naming the step, with the tail
    of the relevant log) on failure, after killing whatever it had started.
    """
    for attempt in range(max(1, retries)):
        try:
            return _start_once(workdir, port, host, timeout, die_with_parent, _mon_port)
        except _PortClash:
            if attempt == max(1, retries) - 1:
                raise
            time.sleep(0.2 + random.random())


def _start_once(workdir, port, host, timeout, die_with_parent, mon_port_req):
    t0 = time.monotonic()
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="rgw", dir="/tmp")
    else:
        workdir = os.path.abspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        if os.listdir(workdir):
            raise RadosGWError("workdir %s is not empty" % workdir)
    run_dir = os.path.join(workdir, "run")
    if len(run_dir) > _MAX_RUN_DIR:
        run_dir = tempfile.mkdtemp(prefix="rgwr", dir="/tmp")

    reservations = []
    try:
        mon_sock = _reserve_port(host, mon_port_req)
        reservations.append(mon_sock)
        rgw_sock = _reserve_port(host, port)
        reservations.append(rgw_sock)
    except RadosGWError:
        _close_all(reservations)
        shutil.rmtree(workdir, ignore_errors=True)
        if run_dir != os.path.join(workdir, "run"):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    mon_port = mon_sock.getsockname()[1]
    rgw_port = rgw_sock.getsockname()[1]
    picked = {"mon.a": mon_port_req is None, "client.rgw.a": port is None}

    for sub in ("log", "crash", "osd", "rgw"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    os.makedirs(run_dir, exist_ok=True)
    fsid = str(uuid.uuid4())
    conf = os.path.join(workdir, "ceph.conf")
    with open(conf, "w") as f:
        f.write(_CONF.format(fsid=fsid, host=host, mon_port=mon_port,
                             rgw_port=rgw_port, w=workdir, run=run_dir))

    ak = _random_key(20, string.ascii_uppercase + string.digits)
    sk = _random_key(40, string.ascii_letters + string.digits)
    gw = RadosGW(workdir, run_dir, conf, host, rgw_port, mon_port, ak, sk)
    gw._reservations = reservations
    atexit.register(gw.stop)
    preexec = _make_preexec(die_with_parent)

    def mark(step):
        gw.timings[step] = round(time.monotonic() - t0, 2)

    def spawn(name, cmd):
        outp = os.path.join(workdir, "log", name + ".out")
        with open(outp, "ab") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=preexec, close_fds=True)
        d = _Daemon(name, p, gw.log_path(name), outp)
        gw._daemons[name] = d
        return d

    def fail(msg, d=None):
        cls = RadosGWError
        if d is not None:
            logs = _tail(d.log, 200) + _tail(d.out, 50)
            if "Address already in use" in logs and picked.get(d.name):
                cls = _PortClash
            msg += "\n--- tail of %s ---\n%s" % (d.log, _tail(d.log))
            msg += "\n--- tail of %s ---\n%s" % (d.out, _tail(d.out, 15))
        if os.environ.get("RGW_KEEP"):
            gw._keep = True
            msg += "\n(work dir kept: %s)" % workdir
        gw.stop()
        return cls(msg)

    def wait_for(what, check, d):
        end = time.monotonic() + timeout
        delay = 0.05
        while True:
            if d is not None and not d.alive():
                raise fail("%s: %s exited with status %s" % (what, d.name, d.proc.returncode), d)
            try:
                if check():
                    return
            except RadosGWError:
                pass
            if time.monotonic() > end:
                raise fail("%s: timed out after %.0fs" % (what, timeout), d)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def step(what, func, d=None):
        try:
            return func()
        except RadosGWError as e:
            raise fail("%s failed: %s" % (what, e), d) from None

    try:
        # 1. monitor
        monmap = os.path.join(workdir, "monmap")
        monkey = os.path.join(workdir, "mon.keyring")
        step("monmaptool", lambda: _run(
            ["monmaptool", "--create", "--addv", "a", "[v1:%s:%d]" % (host, mon_port),
             "--fsid", fsid, monmap], what="monmaptool"))
        step("ceph-authtool", lambda: _run(
            ["ceph-authtool", "--create-keyring", monkey, "--gen-key", "-n", "mon.",
             "--cap", "mon", "allow *"], what="ceph-authtool"))
        step("ceph-mon --mkfs", lambda: _run(
            ["ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", monmap,
             "--keyring", monkey], timeout=timeout, what="ceph-mon --mkfs",
            log=gw.log_path("mon.a")))
        mark("mon mkfs")
        mon = spawn("mon.a", ["ceph-mon", "-c", conf, "-i", "a", "-f"])
        wait_for("monitor listening on %s:%d" % (host, mon_port),
                 lambda: _pid_listens_on(mon.proc.pid, mon_port), mon)
        mon_sock.close()
        mark("mon up")

        # 2. OSD
        osd_uuid = str(uuid.uuid4())
        osd_id = step("ceph osd new", lambda: gw.ceph(
            "osd", "new", osd_uuid, timeout=timeout).strip(), mon)
        if osd_id != "0":
            raise fail("ceph osd new returned id %r, expected '0'" % osd_id, mon)
        mark("osd new")
        # `crush add` (a mon round trip) runs while ceph-osd --mkfs works.
        crush_err = []

        def crush_add():
            try:
                gw.ceph("osd", "crush", "add", "osd.0", "1.0", "root=default",
                        timeout=timeout)
            except RadosGWError as e:
                crush_err.append(e)
        crush = threading.Thread(target=crush_add, daemon=True)
        crush.start()
        try:
            step("ceph-osd --mkfs", lambda: _run(
                ["ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid],
                timeout=timeout, what="ceph-osd --mkfs", log=gw.log_path("osd.0")))
        finally:
            crush.join()
        if crush_err:
            raise fail("ceph osd crush add osd.0 failed: %s" % crush_err[0], mon)
        mark("osd mkfs")
        osd = spawn("osd.0", ["ceph-osd", "-c", conf, "-i", "0", "-f"])

        def osd_up():
            st = json.loads(gw.ceph("osd", "stat", "-f", "json", timeout=30))
            return st.get("num_up_osds") == 1 and st.get("num_in_osds") == 1
        wait_for("OSD 0 up", osd_up, osd)
        mark("osd up")

        # 3. radosgw
        rgw = spawn("client.rgw.a", ["radosgw", "-c", conf, "-n", "client.rgw.a", "-f"])
        wait_for("radosgw answering HTTP on %s" % gw.endpoint,
                 lambda: (_pid_listens_on(rgw.proc.pid, rgw_port)
                          and _http_answers(gw.endpoint + "/")), rgw)
        rgw_sock.close()
        mark("rgw up")

        # 4. S3 user
        step("radosgw-admin user create", lambda: gw.radosgw_admin(
            "user", "create", "--uid=tester", "--display-name=Tester",
            "--access-key=" + ak, "--secret-key=" + sk, timeout=timeout), rgw)
        mark("user created")
    except BaseException:
        if not gw._stopped:
            gw.stop()
        raise
    gw.startup_seconds = time.monotonic() - t0
    return gw


def _http_answers(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            r.read()
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the frontend is up
    except (OSError, ValueError):
        return False


if __name__ == "__main__":  # manual check: python3 rgw.py
    t = time.monotonic()
    g = start_radosgw(None)
    print("up in %.1fs: %s ak=%s sk=%s region=%s workdir=%s" % (
        time.monotonic() - t, g.endpoint, g.access_key, g.secret_key, g.region, g.workdir))
    print(g.timings)
    t = time.monotonic()
    g.stop()
    print("stopped in %.1fs" % (time.monotonic() - t))
