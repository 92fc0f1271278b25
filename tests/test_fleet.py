"""Fleet pulls: -pullhosts to several real dockerds, -lockfile, -tempdir and -config.

One module-wide fleet of three real dockerds, each its own "host" on a loopback address of its
own (FLEET_ADDRESSES, port 2375; their unix sockets serve the unix:// tests).  Two images with
content found nowhere else (a 3-layer "app" and a "base" of its lower two layers) are built once
on the session docker_host (docker build costs seconds) and pushed to a directory store, and
"app" to a radosgw bucket for the S3 tests; every test starts and ends with a fleet that lacks
them (fixture fleet_clean).  S3 traffic that must be counted or held goes through
tests/faultproxy.py.
"""

import collections
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket, skip_or_fail
from realdocker import (DOGESTRY, client_env, DockerdError, DockerdHandle, build_image, docker_cli, find_dockerd,
                        image_id, ok, one_error_line, image_layers, loopback_addresses, random_bytes, remove_tree,
                        run_dogestry, stop_all, text_bytes)

pytestmark = pytest.mark.integration

# Random loopback addresses nothing listens on, so concurrent runs of the suite cannot collide.
FLEET_ADDRESSES = tuple("%s:2375" % a for a in loopback_addresses(3))
DEAD_ADDRESS = loopback_addresses(1)[0]
DEAD_HOST = "tcp://%s:2375" % DEAD_ADDRESS   # nothing listens there
WAIT = 30.0                          # upper bound for anything a test polls for


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(docker_host):
    """Three dockerds for the whole module, booting side by side; stopped (and removed) after.

    Launched from this (main) thread: realdocker sets PR_SET_PDEATHSIG, which fires when the
    launching *thread* ends, so a dockerd started from a worker thread would die with it.
    """
    dockerd = find_dockerd()
    if not dockerd:
        skip_or_fail("dockerd not found on PATH (install docker.io)")
    for address in FLEET_ADDRESSES:   # a dogestry server there would take the S3 pulls (delegation)
        host = address.rpartition(":")[0]
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, dogestry.SERVER_PORT)) == 0:
                pytest.fail("something listens on %s:%d; fleet pulls would be delegated to it"
                            % (host, dogestry.SERVER_PORT))
    workdirs = [Path(tempfile.mkdtemp(prefix="dgfl", dir="/tmp")) for _ in FLEET_ADDRESSES]
    handles = []
    try:
        try:
            for workdir, address in zip(workdirs, FLEET_ADDRESSES):
                handle = DockerdHandle(workdir, workdir, False, "tcp://" + address)
                handles.append(handle)
                handle.launch(dockerd)
            for handle in handles:
                handle.wait_ready()
        except (DockerdError, OSError) as e:
            skip_or_fail("cannot start the fleet's dockerds: %s" % e)
        yield handles
    finally:
        stop_all(handles)
        for workdir in workdirs:
            remove_tree(workdir)


class Image:
    """An image built once for the module: ref, id, diffIDs, and a directory store holding it."""

    def __init__(self, ref, image_id, diff_ids, store):
        self.ref, self.id, self.diff_ids, self.store = ref, image_id, diff_ids, store


def build_and_store(docker_host, store, name, layers, token):
    ref = "dgfleet/%s:t%s" % (name, token)
    image = build_image(docker_host, ref, layers, extra_lines=["LABEL token=" + token])
    push(client_env(docker_host), store, ref)
    return Image(ref, image, image_layers(docker_host, ref), store)


@pytest.fixture(scope="module")
def images(docker_host, tmp_path_factory):
    """(app, base): a 3-layer image and one made of its lower two layers, both in a directory
    store.  Their content exists nowhere else; docker build costs seconds here, so each is built
    once and the `fleet_clean` fixture removes them from the fleet after every test."""
    store = tmp_path_factory.mktemp("fleetstore") / "store"
    token = uuid.uuid4().hex[:10]
    seed = int(token, 16)
    layers = [{"data/random.bin": random_bytes(400 << 10, seed)},
              {"data/words.txt": text_bytes(700 << 10, seed + 1)},
              {"etc/token": token.encode()}]
    app = build_and_store(docker_host, store, "app", layers, token)
    base = build_and_store(docker_host, store, "base", layers[:2], token)
    assert base.diff_ids == app.diff_ids[:2]          # the lower two layers are shared
    return app, base


@pytest.fixture
def app(images, fleet_clean):
    return images[0]


@pytest.fixture
def base(images, fleet_clean):
    return images[1]


@pytest.fixture
def fleet_clean(fleet, images):
    """Every fleet host lacks the module's images (and so their layers) before and after a test."""
    for h in fleet:
        for image in images:
            assert image_id(h.host, image.id) is None, "%s already has %s" % (h.host, image.ref)
    yield
    for h in fleet:
        ids = [image.id for image in images if image_id(h.host, image.id)]
        if ids:
            docker_cli(h.host, "rmi", "-f", *ids)


@pytest.fixture(scope="module")
def s3_app(rgw, images, docker_host):
    """The S3 store URL (a bucket of its own on radosgw) holding the app image."""
    bucket = make_bucket(rgw, "dgfleet-" + uuid.uuid4().hex[:12])
    store = "s3://%s/fleet/" % bucket
    env = {k: v for k, v in client_env(docker_host).items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
               AWS_ENDPOINT_URL=rgw.endpoint, AWS_EC2_METADATA_DISABLED="true")
    push(env, store, images[0].ref)
    return store


@pytest.fixture
def procs():
    """Popen objects a test started; any still running at teardown is killed (by its pid)."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)




# --- helpers -------------------------------------------------------------------------------------




def statuses(proc):
    """stdout must be exactly one line: the JSON status list."""
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1, repr(proc.stdout)
    doc = json.loads(proc.stdout)
    assert isinstance(doc, list)
    return doc


def all_ok(hosts):
    return [{"Host": h, "Status": "ok"} for h in hosts]


def push(env, store, ref):
    ok(run_dogestry("push", store, ref, env=env))


def short(diff_id):
    """How progress lines name a layer: 12 hex digits of its diffID."""
    return diff_id[7:19]


def loaded_by_host(stderr):
    """{host URL: [layer label, ...]} from the per-host 'HOST LAYER: loaded ...' lines."""
    found = collections.defaultdict(list)
    for line in stderr.splitlines():
        m = re.match(r"^(\S+://\S+) ([0-9a-f]{12}): loaded\b", line)
        if m:
            found[m.group(1)].append(m.group(2))
    return dict(found)


def downloaded(stderr):
    """Layer labels of the 'LAYER: downloaded ...' lines (the one download of the union)."""
    return [m.group(1) for m in (re.match(r"^([0-9a-f]{12}): downloaded\b", l) for l in stderr.splitlines()) if m]


def start_dogestry(procs, tmp_path, name, args, env):
    """Popen dogestry with stdout/stderr in files (polled by wait_for_text)."""
    out, err = tmp_path / (name + ".out"), tmp_path / (name + ".err")
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, str(DOGESTRY)] + [str(a) for a in args], env=env,
                                stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
    proc.out_path, proc.err_path = out, err
    procs.append(proc)
    return proc


def finish(proc, timeout=WAIT):
    """Wait for a started dogestry; return a CompletedProcess-like result."""
    proc.wait(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.out_path.read_text(),
                                       proc.err_path.read_text())


def wait_for(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % what)


def wait_for_text(proc, text, timeout=WAIT):
    wait_for(lambda: text in proc.err_path.read_text() or proc.poll() is not None,
             "%r on dogestry's stderr" % text, timeout)
    assert text in proc.err_path.read_text(), "dogestry exited (%s) without %r:\n%s" % (
        proc.returncode, text, proc.err_path.read_text())


def blocked_on_a_lock(pid):
    """Is process PID waiting for a file lock (a '->' line of /proc/locks)?"""
    with open("/proc/locks") as f:
        return any(" -> " in line and " %d " % pid in line for line in f)


class BlobGate:
    """A proxy rule that holds every blob GET until opened (so a run stops mid-download)."""

    def __init__(self):
        self.reached, self.opened = threading.Event(), threading.Event()

    def rule(self, req):
        if req.method == "GET" and "/blobs/sha256/" in req.path:
            self.reached.set()
            self.opened.wait(WAIT)
        return None


# --- 1. fan-out ----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["verb", "readme"])
def test_fan_out_to_three_hosts(form, fleet, app, docker_env):
    hosts = [h.tcp for h in fleet]
    verb = ["pull"] if form == "verb" else []   # README: dogestry -pullhosts HOSTS REMOTE IMAGE

    proc = ok(run_dogestry("-pullhosts", ",".join(hosts), *verb, app.store, app.ref, env=docker_env))

    assert statuses(proc) == all_ok(hosts)
    for h in fleet:
        assert image_id(h.host, app.ref) == app.id          # ID and tag on every host
    assert set(loaded_by_host(proc.stderr)) == set(hosts)


@pytest.mark.parametrize("argv", [
    ["-pullhosts", "tcp://h:1", "/s", "img", "-q"],
    ["-pullhosts", "tcp://h:1", "-tempdir", "/t", "/s", "img"],
])
def test_readme_form_with_an_option_after_the_store(argv):
    options = dogestry.parse_command_line(dogestry.build_parser(), argv)
    assert (options.command, options.store, options.images) == ("pull", "/s", ["img"])


# --- 2. per-host missing layers ------------------------------------------------------------------

def test_each_host_gets_only_the_layers_it_lacks(fleet, app, base, docker_env):
    ok(run_dogestry("pull", base.store, base.ref, env=dict(docker_env, DOCKER_HOST=fleet[1].host)))
    assert image_id(fleet[1].host, base.ref) == base.id
    hosts = [h.tcp for h in fleet]

    proc = ok(run_dogestry("-pullhosts", ",".join(hosts), "pull", app.store, app.ref, env=docker_env))

    assert statuses(proc) == all_ok(hosts)
    loaded = loaded_by_host(proc.stderr)
    everything = sorted(short(d) for d in app.diff_ids)
    assert sorted(loaded.get(hosts[0], [])) == everything, proc.stderr
    assert loaded.get(hosts[1]) == [short(app.diff_ids[2])], proc.stderr    # only the top layer
    assert sorted(loaded.get(hosts[2], [])) == everything, proc.stderr
    assert "%s: 2 of 3 layers already on the Docker host" % hosts[1] in proc.stderr
    assert sorted(downloaded(proc.stderr)) == everything, proc.stderr         # the union, once each
    for h in fleet:
        assert image_id(h.host, app.ref) == app.id
        assert image_layers(h.host, app.ref) == app.diff_ids


# --- 3. download once ----------------------------------------------------------------------------

def test_s3_blobs_are_downloaded_once_for_the_whole_fleet(fleet, app, s3_app, s3_env, fault_proxy):
    proxy = fault_proxy()
    hosts = [h.tcp for h in fleet]

    proc = ok(run_dogestry("-pullhosts", ",".join(hosts), "pull", s3_app, app.ref,
                           env=dict(s3_env, AWS_ENDPOINT_URL=proxy.url)))

    assert statuses(proc) == all_ok(hosts)
    for h in fleet:
        assert image_id(h.host, app.ref) == app.id
    blob_gets = [e for e in proxy.log if e["method"] == "GET" and "/blobs/sha256/" in e["path"]]
    assert all(e["range"] is None for e in blob_gets)          # small blobs: one plain GET each
    per_blob = collections.Counter(e["key"].rpartition("/")[2] for e in blob_gets)
    assert len(per_blob) == 3, per_blob                        # every layer of the image...
    assert set(per_blob.values()) == {1}, per_blob             # ...fetched exactly once, not per host
    assert all(e["status"] == 200 and e["body_sent"] == e["body_length"] for e in blob_gets)


# --- 4. a dead host ------------------------------------------------------------------------------

def test_dead_host_fails_up_front(fleet, app, docker_env):
    hosts = [fleet[0].tcp, DEAD_HOST, fleet[2].tcp]

    started = time.monotonic()
    proc = run_dogestry("-pullhosts", ",".join(hosts), "pull", app.store, app.ref, env=docker_env)

    line = one_error_line(proc, DEAD_ADDRESS)
    assert "-disable-checks" in line
    doc = statuses(proc)  # every host failed, each with the reason: nothing was pulled anywhere
    assert [(s["Host"], s["Status"]) for s in doc] == [(h, "failed") for h in hosts]
    assert all(DEAD_ADDRESS in s["Error"] for s in doc), doc
    assert time.monotonic() - started < 10
    for h in fleet:
        assert image_id(h.host, app.ref) is None                # nothing loaded anywhere


def test_disable_checks_loads_the_live_hosts_and_reports_the_dead_one(fleet, app, docker_env):
    hosts = [fleet[0].tcp, DEAD_HOST, fleet[2].tcp]

    proc = run_dogestry("-disable-checks", "-pullhosts", ",".join(hosts), "pull", app.store, app.ref,
                        env=docker_env)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = statuses(proc)
    assert [s["Host"] for s in doc] == hosts
    assert [s["Status"] for s in doc] == ["ok", "failed", "ok"]
    assert DEAD_ADDRESS in doc[1]["Error"] and "Error" not in doc[0] and "Error" not in doc[2]
    for h in (fleet[0], fleet[2]):
        assert image_id(h.host, app.ref) == app.id


# --- 5. unix:// hosts ----------------------------------------------------------------------------

def test_unix_socket_hosts(fleet, app, docker_env):
    hosts = [fleet[0].host, fleet[1].tcp, fleet[2].host]          # unix, tcp, unix

    proc = ok(run_dogestry("-pullhosts", ",".join(hosts), app.store, app.ref, env=docker_env))

    assert statuses(proc) == all_ok(hosts)
    for h in fleet:
        assert image_id(h.host, app.ref) == app.id
    assert set(loaded_by_host(proc.stderr)) == set(hosts)


# --- 6. -lockfile --------------------------------------------------------------------------------

def test_lockfile_waits_for_a_holder_and_runs_after_release(fleet, app, docker_env, tmp_path, procs):
    lock = tmp_path / "dogestry.lock"
    host = fleet[0]

    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = start_dogestry(procs, tmp_path, "waiter",
                              ["-lockfile", lock, "-pullhosts", host.tcp, "pull", app.store, app.ref], docker_env)
        wait_for_text(proc, "waiting for the lock")
        wait_for(lambda: blocked_on_a_lock(proc.pid), "the waiter to block on the lock")
        assert proc.poll() is None                           # still waiting...
        assert image_id(host.host, app.ref) is None          # ...and has done nothing
    # the test's lock is released here

    result = finish(proc)
    assert result.returncode == 0, result.stderr
    assert statuses(result) == all_ok([host.tcp])
    assert image_id(host.host, app.ref) == app.id
    with open(lock) as f:                                    # dogestry let go of it on exit
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("holder_ends", ["exits", "is_killed"])
def test_lockfile_serialises_two_dogestry_runs(holder_ends, fleet, app, s3_app, s3_env, docker_env, fault_proxy,
                                               tmp_path, procs):
    """Run A (S3 to fleet[0], held mid-download by the proxy) owns the lock; run B (directory
    store to fleet[1]) waits until A has exited, or been killed."""
    lock = tmp_path / "dogestry.lock"
    gate = BlobGate()
    proxy = fault_proxy(gate.rule)
    try:
        a = start_dogestry(procs, tmp_path, "a", ["-lockfile", lock, "-pullhosts", fleet[0].tcp, "pull",
                                                  s3_app, app.ref], dict(s3_env, AWS_ENDPOINT_URL=proxy.url))
        assert gate.reached.wait(WAIT), a.err_path.read_text()          # A holds the lock, mid-pull
        b = start_dogestry(procs, tmp_path, "b", ["-lockfile", lock, "pull", app.store, app.ref],
                           dict(docker_env, DOCKER_HOST=fleet[1].host))
        wait_for_text(b, "waiting for the lock")
        wait_for(lambda: blocked_on_a_lock(b.pid), "B to block on the lock")
        assert a.poll() is None and b.poll() is None
        assert image_id(fleet[1].host, app.ref) is None                # B has not started its work

        if holder_ends == "exits":
            gate.opened.set()
            result_a = finish(a)
            assert result_a.returncode == 0, result_a.stderr
            assert image_id(fleet[0].host, app.ref) == app.id
        else:
            a.send_signal(signal.SIGKILL)
            a.wait(WAIT)
            assert a.returncode == -signal.SIGKILL
            gate.opened.set()
            assert image_id(fleet[0].host, app.ref) is None
        a_ended = time.monotonic()
    finally:
        gate.opened.set()

    result_b = finish(b)
    assert result_b.returncode == 0, result_b.stderr
    assert time.monotonic() >= a_ended
    assert image_id(fleet[1].host, app.ref) == app.id
    assert result_b.stderr.index("waiting for the lock") < result_b.stderr.index("pulled")


def test_lockfile_that_cannot_be_opened_is_one_clear_error(fleet, app, docker_env, tmp_path):
    lock = tmp_path / "no" / "such" / "dir" / "dogestry.lock"
    proc = run_dogestry("-lockfile", lock, "-pullhosts", fleet[0].tcp, "pull", app.store, app.ref, env=docker_env)
    one_error_line(proc, str(lock))
    assert proc.stdout == ""
    assert image_id(fleet[0].host, app.ref) is None


# --- 7. -tempdir ---------------------------------------------------------------------------------

def test_tempdir_holds_the_spool_and_is_left_empty(fleet, app, s3_app, s3_env, fault_proxy, tmp_path, procs):
    mine, system = tmp_path / "mine", tmp_path / "system"
    mine.mkdir()
    system.mkdir()
    gate = BlobGate()
    proxy = fault_proxy(gate.rule)
    env = dict(s3_env, AWS_ENDPOINT_URL=proxy.url, TMPDIR=str(system))
    hosts = [h.tcp for h in fleet[:2]]
    try:
        proc = start_dogestry(procs, tmp_path, "pull", ["-tempdir", mine, "-pullhosts", ",".join(hosts),
                                                        "pull", s3_app, app.ref], env)
        assert gate.reached.wait(WAIT), proc.err_path.read_text()
        spools = list(mine.iterdir())
        assert len(spools) == 1 and spools[0].name.startswith(".tmp-dogestry-"), spools
        inside = [str(p.relative_to(spools[0])) for p in spools[0].rglob("*") if p.is_file()]
        assert any(p.endswith("config.json") for p in inside), inside   # the spool is really there
        assert list(system.iterdir()) == []                              # and not in $TMPDIR
    finally:
        gate.opened.set()
    result = finish(proc)
    assert result.returncode == 0, result.stderr
    assert statuses(result) == all_ok(hosts)
    assert list(mine.iterdir()) == []                                    # removed afterwards
    assert list(system.iterdir()) == []
    for h in fleet[:2]:
        assert image_id(h.host, app.ref) == app.id


def test_missing_tempdir_is_one_clear_error(fleet, app, docker_env, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"

    proc = run_dogestry("-tempdir", missing, "-pullhosts", fleet[0].tcp, "pull", app.store, app.ref,
                        env=docker_env)

    one_error_line(proc, str(missing))
    assert statuses(proc) == [{"Host": fleet[0].tcp, "Status": "failed", "Error": one_error_line(proc)[17:]}]
    assert image_id(fleet[0].host, app.ref) is None


# --- 8. -config ----------------------------------------------------------------------------------

def no_aws_env(docker_env, tmp_path):
    """docker_env without DOCKER_HOST or any AWS_* variable, and an empty HOME."""
    env = {k: v for k, v in docker_env.items() if not k.startswith("AWS_") and k != "DOCKER_HOST"}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    return env


def test_config_file_names_the_remote_keys_and_docker_host(fleet, app, s3_app, rgw, docker_env, tmp_path):
    config = tmp_path / "dogestry.cfg"
    # git-config style, as the original's gcfg read it: tab-indented keys, quoted section names
    config.write_text('; dogestry config\n'
                      '[remote "s3"]\n\turl = %s?endpoint=%s\n'
                      '[s3]\n\taccess-key-id = %s\n\tsecret-key = %s\n'
                      '[docker]\n\tconnection = %s\n'
                      % (s3_app, rgw.endpoint, rgw.access_key, rgw.secret_key, fleet[2].host))
    env = no_aws_env(docker_env, tmp_path)

    ok(run_dogestry("-config", config, "pull", "s3", app.ref, env=env, timeout=60))
    assert image_id(fleet[2].host, app.ref) == app.id

    # the remote name works with -pullhosts too (README form, no verb)
    proc = ok(run_dogestry("-config", config, "-pullhosts", fleet[0].tcp, "s3", app.ref, env=env, timeout=60))
    assert statuses(proc) == all_ok([fleet[0].tcp])
    assert image_id(fleet[0].host, app.ref) == app.id


@pytest.mark.parametrize("text", [
    "url = s3://bucket/repo/\n",                   # no section header
    '[remote "s3"\nurl = s3://bucket/repo/\n',    # unterminated header
    "[s3]\naccess-key-id\n",                       # a key without a value
])
def test_malformed_config_is_one_clear_error(text, docker_env, tmp_path):
    config = tmp_path / "bad.cfg"
    config.write_text(text)
    proc = run_dogestry("-config", config, "pull", "s3", "x", env=no_aws_env(docker_env, tmp_path))
    one_error_line(proc, str(config))
    assert proc.stdout == ""


# --- 9. faults a fleet meets ---------------------------------------------------------------------

def frozen(handle):
    """SIGSTOP a host's dockerd (a hung daemon, a silent partition); SIGCONT it afterwards."""
    class Freezer:
        def __enter__(self):
            os.kill(handle.pid, signal.SIGSTOP)
            return self

        def __exit__(self, *exc):
            os.kill(handle.pid, signal.SIGCONT)

    return Freezer()


def pulled_note(host, ref):
    return "%s: pulled %s" % (host, ref)


def start_gated_fleet_pull(procs, tmp_path, fleet, s3_app, s3_env, fault_proxy, app, *options):
    """A fleet pull of the S3 app image, held at its first blob GET until the gate opens."""
    gate = BlobGate()
    proxy = fault_proxy(gate.rule)
    hosts = [h.tcp for h in fleet]
    proc = start_dogestry(procs, tmp_path, "pull", list(options) + ["-pullhosts", ",".join(hosts), "pull",
                                                                     s3_app, app.ref],
                          dict(s3_env, AWS_ENDPOINT_URL=proxy.url))
    assert gate.reached.wait(WAIT), proc.err_path.read_text()  # every host has said what it lacks
    return proc, gate, hosts


def test_a_host_that_freezes_fails_alone_after_the_host_timeout(fleet, app, s3_app, s3_env, fault_proxy, tmp_path,
                                                                 procs):
    proc, gate, hosts = start_gated_fleet_pull(procs, tmp_path, fleet, s3_app, s3_env, fault_proxy, app,
                                               "-host-timeout", "3")
    with frozen(fleet[1]):
        gate.opened.set()
        started = time.monotonic()
        result = finish(proc)
        took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    doc = statuses(result)
    assert [s["Status"] for s in doc] == ["ok", "failed", "ok"], doc
    assert "timed out" in doc[1]["Error"] and hosts[1] in doc[1]["Error"], doc
    assert took < 3 * 3 + 10, took  # the timeout, not forever
    for h in (fleet[0], fleet[2]):
        assert image_id(h.host, app.ref) == app.id


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_a_fleet_pull_at_once_with_the_json_of_what_finished(sig, fleet, app, s3_app, s3_env,
                                                                           fault_proxy, tmp_path, procs):
    proc, gate, hosts = start_gated_fleet_pull(procs, tmp_path, fleet, s3_app, s3_env, fault_proxy, app)
    with frozen(fleet[1]):
        gate.opened.set()
        for host in (hosts[0], hosts[2]):
            wait_for_text(proc, pulled_note(host, app.ref))
        started = time.monotonic()
        proc.send_signal(sig)
        result = finish(proc, timeout=10)
        took = time.monotonic() - started
    assert result.returncode == 130, result.stderr
    assert took < 2.0, took
    assert statuses(result) == [{"Host": hosts[0], "Status": "ok"},
                                {"Host": hosts[1], "Status": "failed", "Error": "interrupted"},
                                {"Host": hosts[2], "Status": "ok"}]
    assert result.stderr.rstrip().endswith("dogestry: interrupted") and "Traceback" not in result.stderr


def test_a_corrupt_blob_fails_every_host_with_the_json_still_printed(fleet, app, docker_env, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(str(app.store), str(store))
    blob = max((store / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    hosts = [h.tcp for h in fleet]

    proc = run_dogestry("-pullhosts", ",".join(hosts), "pull", store, app.ref, env=docker_env)

    line = one_error_line(proc, "corrupt", blob.name)
    assert statuses(proc) == [{"Host": h, "Status": "failed", "Error": line[len("dogestry: error: "):]}
                              for h in hosts]
    for h in fleet:
        assert image_id(h.host, app.ref) is None


def test_a_full_disk_during_a_fleet_pull_is_one_clear_error(fleet, app, docker_env, tmpfs):
    full = tmpfs("256k")
    hosts = [h.tcp for h in fleet]

    proc = run_dogestry("-tempdir", full, "-pullhosts", ",".join(hosts), "pull", app.store, app.ref, env=docker_env)

    one_error_line(proc, "No space left on device")
    assert [s["Status"] for s in statuses(proc)] == ["failed"] * 3
    assert list(full.iterdir()) == []  # the spool went, too
    for h in fleet:
        assert image_id(h.host, app.ref) is None
