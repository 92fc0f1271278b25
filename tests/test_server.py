"""The accelerator server (-server), `dogestry login` and -pullhosts delegation, with real parts.

Real dockerds (a module-scoped two-host "fleet" on random loopback addresses, plus the session
dockerd that builds and pushes), a real radosgw, the real docker CLI as the server's client,
and tests/faultproxy.py in front of radosgw wherever S3 requests have to be counted.

The seed README's "Server Mode (Accelerator)" walkthrough is test_seed_walkthrough: push to
s3://ops-goodies/docker-repo/, `dogestry login opsgoodies.com`, then
`docker -H tcp://host:22375 pull opsgoodies.com/docker-repo/hipache`.
"""

import collections
import fcntl
import http.client
import io
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket
from faultproxy import FaultProxy, Overlap, Reply, started_servers
from realdocker import (DOGESTRY, build_image, docker_cli, image_id, loopback_addresses, random_bytes, run_dogestry,
                        text_bytes)
from serverkit import (PORT, assert_json_refusal, auth_header, b64, call, docker_user, login,
                       pull_request, raw_body, raw_exchange, raw_status, read_answer, server_env, status_check,
                       wipe)

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(2)     # two "hosts", each a dockerd on HOST:2375 and maybe a server on HOST:PORT
REGISTRY = "opsgoodies.com"
IMAGE = REGISTRY + "/docker-repo/hipache"


# --- module fixtures: the fleet, the bucket and the images pushed into it -----------------------

@pytest.fixture(scope="module")
def aws_env(rgw, base_env):
    """base_env plus the radosgw keys and endpoint (what a dogestry user on a workstation has)."""
    return dict(base_env, AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
                AWS_ENDPOINT_URL=rgw.endpoint)


def s3_client(rgw, bucket, endpoint=None):
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, "", "us-east-1", endpoint or rgw.endpoint)
    return dogestry.S3Client(location, dogestry.CredentialChain(config), config)


@pytest.fixture(scope="module")
def seed_bucket(rgw):
    """The seed's bucket name, ops-goodies, unless another test already put something in it."""
    name = make_bucket(rgw, "ops-goodies")
    if any(True for _ in s3_client(rgw, name).list("")):
        name = make_bucket(rgw, "ops-goodies-" + uuid.uuid4().hex[:8])
    return name


class Pushed:
    """What the module pushed: image IDs by name, the bucket, the S3 URL of the repo prefix."""

    def __init__(self, bucket, ids, layers):
        self.bucket, self.ids, self.layers = bucket, ids, layers
        self.store = "s3://%s/docker-repo/" % bucket


@pytest.fixture(scope="module")
def pushed(docker_host, rgw, aws_env, seed_bucket, tmp_path_factory):
    """`dogestry push s3://BUCKET/docker-repo/ hipache` (2 layers) plus three one-layer images."""
    work = tmp_path_factory.mktemp("build")
    ids = {"hipache": build_image(docker_host, "hipache", [
        {"app/hipache.bin": random_bytes(300 << 10, 11)},
        {"etc/hipache.conf": text_bytes(20 << 10, 12)}], workdir=work)}
    for n in (1, 2, 3):
        ids["dgbound%d" % n] = build_image(docker_host, "dgbound%d" % n,
                                           [{"data/%d.bin" % n: random_bytes(100 << 10, 100 + n)}], workdir=work)
    names = sorted(ids)
    for batch in (["hipache"], [n for n in names if n != "hipache"]):  # the seed's push, then the rest
        proc = run_dogestry("push", "s3://%s/docker-repo/" % seed_bucket, *batch, env=aws_env)
        assert proc.returncode == 0, proc.stderr
    layers = {}
    store = s3_client(rgw, seed_bucket)
    for name in names:
        manifest = json.loads(store.call("GET", "docker-repo/images/%s/manifest.json"
                                         % ids[name].split(":")[1])[1])
        layers[name] = manifest
    yield Pushed(seed_bucket, ids, layers)
    docker_cli(docker_host, "rmi", *names, check=False)


def blob_keys(pushed, name):
    """The store keys (under docker-repo/) of an image's layer blobs."""
    keys = ["docker-repo/blobs/sha256/" + entry["digest"].split(":")[1] for entry in pushed.layers[name]["layers"]]
    assert keys, pushed.layers[name]
    return keys


# --- helpers ------------------------------------------------------------------------------------

def user_auth(rgw, bucket, secret=None):
    """What `dogestry login REGISTRY` with S3_URL s3://BUCKET makes the docker CLI send."""
    store = "s3://%s" % bucket
    return auth_header({"username": rgw.access_key, "password": secret or rgw.secret_key,
                        "email": store, "serveraddress": REGISTRY})


def blob_gets(proxy, bucket):
    """Counter of GET requests per blob key (docker-repo/blobs/...) in BUCKET seen by PROXY."""
    return collections.Counter(e["key"] for e in proxy.log
                               if e["method"] == "GET" and e["path"].startswith("/%s/" % bucket)
                               and "/blobs/" in e["key"])


# --- the seed README walkthrough ----------------------------------------------------------------

def test_seed_walkthrough(fleet, pushed, rgw, base_env, servers, tmp_path):
    """login opsgoodies.com (keys and S3 URL through a pipe), then the real
    `docker -H tcp://host-1:22375 pull opsgoodies.com/docker-repo/hipache` works."""
    host = fleet[0]
    wipe(host)
    config_dir = tmp_path / "dockercfg"
    config_dir.mkdir()
    config = config_dir / "config.json"
    other = {"auth": b64("someone:secret"), "email": "x@example.com"}
    config.write_text(json.dumps({"psFormat": "table {{.ID}}", "auths": {"other.example": other}}))

    proc = login(dict(base_env, DOCKER_CONFIG=str(config_dir)), REGISTRY,
                 "%s\n%s\ns3://%s\n" % (rgw.access_key, rgw.secret_key, pushed.bucket))
    assert proc.returncode == 0, proc.stderr
    assert str(config) in proc.stdout + proc.stderr
    assert "Updating docker file %s" % config in proc.stderr
    assert "Login saved for %s in %s" % (REGISTRY, config) in proc.stdout
    doc = json.loads(config.read_text())
    assert doc["psFormat"] == "table {{.ID}}"
    assert doc["auths"]["other.example"] == other
    assert doc["auths"][REGISTRY] == {"auth": b64("%s:%s" % (rgw.access_key, rgw.secret_key)),
                                      "email": "s3://%s" % pushed.bucket}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert sorted(p.name for p in config_dir.iterdir()) == ["config.json"]  # no temp file left

    server = servers(HOSTS[0], server_env(base_env, host, rgw.endpoint))
    assert "listening on %s:%d" % (HOSTS[0], PORT) in server.stdout

    pulled = docker_user(HOSTS[0], "pull", IMAGE, config_dir=config_dir)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "Status: Downloaded newer image for %s:latest" % IMAGE in pulled.stdout

    assert image_id(host.host, IMAGE + ":latest") == pushed.ids["hipache"]
    tags = docker_cli(host.host, "image", "inspect", "-f", "{{json .RepoTags}}", IMAGE).stdout
    assert json.loads(tags) == [IMAGE + ":latest"]  # tagged exactly as asked, nothing else
    posts = server.posts_to_create()
    assert [p[2] for p in posts] == ["/v1.41/images/create?fromImage=%s&tag=latest"
                                     % IMAGE.replace("/", "%2F")], server.stdout
    assert posts[0][3] == 200

    # pulling again is quick and still fine (the image is already there)
    again = docker_user(HOSTS[0], "pull", IMAGE, config_dir=config_dir)
    assert again.returncode == 0, again.stderr
    assert "Status: Image is up to date for %s:latest" % IMAGE in again.stdout


def test_missing_image_and_bad_keys_fail_the_docker_cli(fleet, pushed, rgw, base_env, servers, tmp_path):
    host = fleet[0]
    servers(HOSTS[0], server_env(base_env, host, rgw.endpoint))
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    entry = {"auth": b64("%s:%s" % (rgw.access_key, rgw.secret_key)), "email": "s3://%s" % pushed.bucket}
    (config_dir / "config.json").write_text(json.dumps({"auths": {REGISTRY: entry}}))

    missing = docker_user(HOSTS[0], "pull", REGISTRY + "/docker-repo/nosuchimage", config_dir=config_dir)
    assert missing.returncode == 1, missing
    assert "nosuchimage" in missing.stderr and "not found" in missing.stderr, missing.stderr

    entry["auth"] = b64("%s:%s" % (rgw.access_key, "wrong-secret"))
    (config_dir / "config.json").write_text(json.dumps({"auths": {REGISTRY: entry}}))
    wipe(host)
    denied = docker_user(HOSTS[0], "pull", IMAGE, config_dir=config_dir)
    assert denied.returncode == 1, denied
    assert "dogestry:" in denied.stderr and "SignatureDoesNotMatch" in denied.stderr, denied.stderr
    assert image_id(host.host, IMAGE) is None

    # no login at all: {} auth and a server without a store of its own
    empty = tmp_path / "empty"
    empty.mkdir()
    anonymous = docker_user(HOSTS[0], "pull", IMAGE, config_dir=empty)
    assert anonymous.returncode == 1, anonymous
    assert "dogestry login" in anonymous.stderr, anonymous.stderr


# --- what the server refuses ---------------------------------------------------------------------

def test_refuses_everything_but_pulls(fleet, pushed, rgw, base_env, servers, tmp_path):
    host = fleet[0]
    wipe(host)
    server = servers(HOSTS[0], server_env(base_env, host, rgw.endpoint))
    empty = tmp_path / "cfg"
    empty.mkdir()
    images_before = docker_cli(host.host, "images", "-aq").stdout

    for args in (["ps"], ["ps", "-a"], ["images"], ["info"], ["run", "--rm", "hipache", "true"],
                 ["create", "hipache"], ["exec", "somecontainer", "ls"], ["rm", "-f", "somecontainer"],
                 ["rmi", "hipache"], ["network", "ls"], ["volume", "create", "v"], ["system", "prune", "-f"]):
        proc = docker_user(HOSTS[0], *args, config_dir=empty, timeout=60)
        assert proc.returncode != 0, (args, proc.stdout, proc.stderr)
        assert "not served" in proc.stderr, (args, proc.stderr)

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY Dockerfile /\n")
    build = docker_user(HOSTS[0], "build", "-t", "evil", str(ctx), config_dir=empty, timeout=60)
    assert build.returncode != 0 and "/build is not served" in build.stderr, build

    raw = [("GET", "/containers/json", None), ("GET", "/v1.41/containers/json?all=1", None),
           ("POST", "/v1.41/containers/create", b'{"Image":"hipache","Cmd":["true"]}'),
           ("POST", "/containers/abc/exec", b'{"Cmd":["id"]}'), ("POST", "/v1.41/exec/abc/start", b"{}"),
           ("GET", "/images/json", None), ("POST", "/build", b"not a tar"),
           ("POST", "/v1.41/images/load", b"x" * 1000), ("GET", "/v1.41/images/get?names=hipache", None),
           ("DELETE", "/v1.41/images/hipache", None), ("PUT", "/containers/abc/archive?path=/", b"x"),
           ("PATCH", "/v1.41/images/create", b""), ("GET", "/v1.41/info", None),
           ("POST", "/v1.41/images/create/../../containers/create", b"{}"),
           ("GET", "/v1.41/../containers/json", None), ("POST", "//containers/create", b"{}"),
           ("POST", "/v1.41/images/hipache/push", b""), ("POST", "/v1.41/images/hipache/tag?repo=x", b""),
           ("POST", "/session", b""), ("GET", "/v1.41/events", None), ("POST", "/v1.41/auth", b"{}")]
    for method, path, body in raw:
        answer = call(HOSTS[0], method, path, {"Content-Type": "application/json"}, body)
        assert answer.status == 403, (method, path, answer)
        assert_json_refusal(answer, 403, "not served")
    assert call(HOSTS[0], "HEAD", "/containers/json").status == 403
    assert_json_refusal(call(HOSTS[0], "POST", "/v1.41/images/create?fromSrc=-&repo=evil"), 400, "import")
    # http.server collapses a leading '//' (CVE-2021-28861 fix), so this one is a pull request
    assert_json_refusal(call(HOSTS[0], "POST", "//images/create?fromImage=x"), 400, "dogestry login")

    assert docker_cli(host.host, "ps", "-aq").stdout.strip() == ""
    assert docker_cli(host.host, "images", "-aq").stdout == images_before
    assert docker_cli(host.host, "volume", "ls", "-q").stdout.strip() == ""
    assert not server.posts_to_create() or all(p[3] != 200 for p in server.posts_to_create())


def test_ping_version_and_status_check(fleet, rgw, base_env, servers):
    host = fleet[0]
    servers(HOSTS[0], server_env(base_env, host, rgw.endpoint))
    dockerd_api = http.client.HTTPConnection(HOSTS[0], 2375, timeout=10)
    dockerd_api.request("GET", "/_ping")
    expected_api = dockerd_api.getresponse().getheader("Api-Version")
    dockerd_api.close()
    assert expected_api

    for path in ("/_ping", "/v1.41/_ping", "/v1.24/_ping"):
        head = call(HOSTS[0], "HEAD", path)
        assert head.status == 200 and head.body == b""
        assert head.headers.getheader("Api-Version") == expected_api
        get = call(HOSTS[0], "GET", path)
        assert get.status == 200 and get.body == b"OK"
        assert get.headers.getheader("Api-Version") == expected_api

    version = call(HOSTS[0], "GET", "/version")
    assert version.status == 200
    doc = version.json()
    assert doc["ApiVersion"] == expected_api and doc["Version"] and doc["Os"] == "linux"
    assert call(HOSTS[0], "GET", "/v1.41/version").json()["ApiVersion"] == expected_api

    check = call(HOSTS[0], "GET", "/status/check")
    assert (check.status, check.body) == (200, b"OK")
    assert call(HOSTS[0], "HEAD", "/status/check").status == 200
    assert call(HOSTS[0], "GET", "/").status == 404

    empty = Path(tempfile.mkdtemp(prefix="dgcfg"))
    try:
        proc = docker_user(HOSTS[0], "version", "--format", "{{.Server.APIVersion}}", config_dir=empty)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected_api
    finally:
        shutil.rmtree(str(empty), ignore_errors=True)


# --- concurrency ------------------------------------------------------------------------------------

class BlobGate:
    """A proxy rule that holds every blob GET until opened; .reached is set by the first."""

    def __init__(self):
        self.reached, self.opened = threading.Event(), threading.Event()

    def __call__(self, req):
        if req.method == "GET" and "/blobs/" in req.path:
            self.reached.set()
            self.opened.wait(60)
        return None


class StreamingPull:
    """A docker-style pull whose JSON progress lines are read as they come."""

    def __init__(self, address, name, auth):
        self.conn = http.client.HTTPConnection(address, PORT, timeout=60)
        self.conn.request("POST", "/v1.41/images/create?fromImage=%s&tag=latest" % name.replace("/", "%2F"),
                          headers={"X-Registry-Auth": auth})
        self.resp = self.conn.getresponse()
        self.lines = []

    def until(self, predicate):
        """Read lines until one satisfies PREDICATE (a dict -> bool); fail if the answer ends first."""
        for line in iter(self.resp.readline, b""):
            if line.strip():
                self.lines.append(json.loads(line))
                if predicate(self.lines[-1]):
                    return self.lines[-1]
        raise AssertionError("the answer ended without the line asked for: %s" % self.lines)

    def rest(self):
        """Every line, once the answer has ended."""
        self.lines += [json.loads(line) for line in iter(self.resp.readline, b"") if line.strip()]
        self.conn.close()
        return self.lines

    def errors(self):
        return [d for d in self.lines if d.get("errorDetail") or d.get("error")]

    def hang_up(self):
        self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def waiting_for_the_leader(doc):
    return "already under way" in doc.get("status", "")


def test_identical_concurrent_pulls_share_one_download(fleet, pushed, rgw, base_env, servers, fault_proxy):
    """While one pull's blob read is held, 4 more of the same image wait for it (and a 6th with a
    wrong secret does not ride along): each blob is read once, the valid pulls all succeed."""
    host = fleet[0]
    wipe(host)
    gate = BlobGate()
    proxy = fault_proxy(gate)
    server = servers(HOSTS[0], server_env(base_env, host, proxy.url))
    good, bad = user_auth(rgw, pushed.bucket), user_auth(rgw, pushed.bucket, secret="wrong-secret")
    try:
        leader = StreamingPull(HOSTS[0], IMAGE, good)
        assert gate.reached.wait(60)
        followers = [StreamingPull(HOSTS[0], IMAGE, good) for _ in range(4)]
        for follower in followers:
            follower.until(waiting_for_the_leader)
        stranger = StreamingPull(HOSTS[0], IMAGE, bad)
        assert stranger.rest() and stranger.errors(), stranger.lines  # fails on its own, at once
        assert not any(waiting_for_the_leader(d) for d in stranger.lines)
    finally:
        gate.opened.set()
    for pull in [leader] + followers:
        pull.rest()
        assert not pull.errors(), pull.lines
    counts = blob_gets(proxy, pushed.bucket)
    assert sorted(counts) == sorted(blob_keys(pushed, "hipache")), counts
    assert set(counts.values()) == {1}, counts
    assert image_id(host.host, IMAGE) == pushed.ids["hipache"]
    assert len(server.posts_to_create()) == 6


def test_a_leader_hanging_up_does_not_fail_the_followers(fleet, pushed, rgw, base_env, servers, fault_proxy):
    host = fleet[0]
    wipe(host)
    gate = BlobGate()
    proxy = fault_proxy(gate)
    servers(HOSTS[0], server_env(base_env, host, proxy.url))
    auth = user_auth(rgw, pushed.bucket)
    try:
        leader = StreamingPull(HOSTS[0], IMAGE, auth)
        first = leader.until(lambda doc: True)
        assert first["status"].startswith("Pulling hipache:latest"), first
        assert gate.reached.wait(60)  # the leader's blob read is in flight
        followers = [StreamingPull(HOSTS[0], IMAGE, auth) for _ in range(2)]
        for follower in followers:
            follower.until(waiting_for_the_leader)
        leader.hang_up()
    finally:
        gate.opened.set()
    for follower in followers:
        follower.rest()
        assert not follower.errors(), follower.lines
    assert image_id(host.host, IMAGE) == pushed.ids["hipache"]


def test_parallel_pulls_are_bounded(fleet, pushed, rgw, base_env, servers, fault_proxy):
    """Three different images at once: from one client, one download at a time (a client holds at
    most one slot); from three clients, at most SERVER_MAX_PULLS (2).  Every pull still succeeds."""
    host = fleet[0]
    blob_reads = Overlap(lambda req: req.method == "GET" and "/blobs/" in req.path, delay=1.0)
    proxy = fault_proxy(blob_reads)
    servers(HOSTS[0], server_env(base_env, host, proxy.url))
    auth = user_auth(rgw, pushed.bucket)
    names = ["dgbound1", "dgbound2", "dgbound3"]

    def pull_all(sources):
        wipe(host)
        blob_reads.most = 0
        barrier = threading.Barrier(len(names))
        answers = {}

        def pull(name, source):
            barrier.wait()
            answers[name] = pull_request(HOSTS[0], REGISTRY + "/docker-repo/" + name, auth, source=source)

        threads = [threading.Thread(target=pull, args=(n, src)) for n, src in zip(names, sources)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for name in names:
            assert answers[name].status == 200 and not answers[name].errors(), answers[name]
            assert image_id(host.host, REGISTRY + "/docker-repo/" + name) == pushed.ids[name]
        return answers

    one_client = pull_all(["127.0.0.1"] * 3)
    assert blob_reads.most == 1
    assert sum(any("Waiting for a free pull slot" in d.get("status", "") for d in a.lines())
               for a in one_client.values()) == 2, one_client
    pull_all(["127.0.0.1"] + list(loopback_addresses(2, ports=())))
    assert blob_reads.most == dogestry.SERVER_MAX_PULLS == 2
    assert sum(blob_gets(proxy, pushed.bucket).values()) == 6


def test_a_pull_of_an_image_the_host_has_takes_no_slot(fleet, pushed, rgw, base_env, servers, fault_proxy):
    """While two slow pulls hold both slots, a pull of an image the engine already has is only tagged."""
    host = fleet[0]
    wipe(host)
    holding, release, held = threading.Event(), threading.Event(), []

    def hold(req):
        if holding.is_set() and req.method == "GET" and "/blobs/" in req.path:
            held.append(req.path)
            release.wait(60)
        return None

    proxy = fault_proxy(hold)
    server = servers(HOSTS[0], server_env(base_env, host, proxy.url))
    auth = user_auth(rgw, pushed.bucket)
    first = pull_request(HOSTS[0], IMAGE, auth)
    assert first.status == 200 and not first.errors(), first
    holding.set()
    sources = loopback_addresses(2, ports=())
    slow = [threading.Thread(target=pull_request, args=(HOSTS[0], REGISTRY + "/docker-repo/" + n, auth),
                             kwargs={"source": src}) for n, src in zip(["dgbound1", "dgbound2"], sources)]
    for t in slow:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(held) < 2 and time.monotonic() < deadline:  # both slots taken, their blob reads held
            time.sleep(0.05)
        assert len(held) == 2, held
        again = pull_request(HOSTS[0], IMAGE, auth, timeout=20)
        assert again.status == 200 and not again.errors(), again
        statuses = [d.get("status", "") for d in again.lines()]
        assert any("already on the Docker host" in st for st in statuses), statuses
        assert not any("Waiting for a free pull slot" in st for st in statuses), statuses
    finally:
        release.set()
        for t in slow:
            t.join(60)
    assert image_id(host.host, IMAGE) == pushed.ids["hipache"]
    assert len(server.posts_to_create()) == 4


# --- hostile and broken requests ---------------------------------------------------------------------

def test_hostile_requests_get_4xx_and_the_server_keeps_serving(fleet, pushed, rgw, base_env, servers):
    host = fleet[0]
    wipe(host)
    server = servers(HOSTS[0], server_env(base_env, host, rgw.endpoint))
    name = REGISTRY + "/docker-repo/hipache"

    # slow clients hold connections open while everything else goes on
    slow = []
    for _ in range(20):
        sock = socket.create_connection((HOSTS[0], PORT), timeout=5)
        slow.append(sock)
    half = socket.create_connection((HOSTS[0], PORT), timeout=5)
    half.sendall(b"POST /v1.41/images/create?fromImage=x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
    slow.append(half)
    partial = socket.create_connection((HOSTS[0], PORT), timeout=5)
    partial.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    slow.append(partial)
    try:
        # X-Registry-Auth that is not what the docker CLI sends
        for header, needle in (("!!!not-base64$$$", "X-Registry-Auth"), (auth_header(b"[1, 2]"), "X-Registry-Auth"),
                               (auth_header(b"null"), "X-Registry-Auth"), (auth_header(b'"text"'), "X-Registry-Auth"),
                               (auth_header(b'{"username": 5}'), "X-Registry-Auth"),
                               (auth_header(b'{"username": "a"'), "X-Registry-Auth"),
                               (auth_header(b"\xff\xfe\x00garbage"), "X-Registry-Auth"),
                               (auth_header({"username": rgw.access_key, "email": pushed.store}), "both"),
                               ("e30=", "dogestry login"), ("", "dogestry login")):
            assert_json_refusal(pull_request(HOSTS[0], name, header), 400, needle)
        latin = raw_exchange(HOSTS[0], b"POST /v1.41/images/create?fromImage=hipache&tag=latest HTTP/1.1\r\n"
                                       b"Host: x\r\nX-Registry-Auth: \xff\xfe\xfd\r\nContent-Length: 0\r\n"
                                       b"Connection: close\r\n\r\n")
        assert raw_status(latin) == 400, latin

        # traversal and junk in names and tags
        auth = user_auth(rgw, pushed.bucket)
        for bad_name, tag in (("../../etc", "latest"), (REGISTRY + "/../../etc/passwd", "latest"),
                              ("%2e%2e%2f%2e%2e%2fetc", "latest"), (REGISTRY + "/docker-repo/hipache", "../../x"),
                              (REGISTRY + "/docker-repo/hipache", "latest%2F..%2F..%2Fx"),
                              (REGISTRY + "/docker-repo/HIPACHE", "latest"), ("", "latest"),
                              (REGISTRY + "/docker-repo/hipache@sha256:" + "0" * 64, ""),
                              ("a" * 300, "latest"), (REGISTRY + "//hipache", "latest")):
            answer = pull_request(HOSTS[0], bad_name, auth, tag=tag)
            assert answer.status == 400, (bad_name, tag, answer)
            assert answer.json()["message"]

        # stores a client may not name: anything but s3://, traversal, and its own S3 endpoint
        evil = socket.socket()
        evil.bind(("127.0.0.1", 0))
        evil.listen(8)
        evil.settimeout(0.5)
        evil_url = "http://127.0.0.1:%d" % evil.getsockname()[1]
        try:
            for store, status, needle in (
                    ("/etc", 400, "s3://"), ("file:///etc", 400, "s3://"), ("../../etc", 400, "s3://"),
                    ("http://169.254.169.254/latest", 400, "s3://"), ("s3://%s/../../x" % pushed.bucket, 400, "unsafe"),
                    ("s3://%s?endpoint=%s" % (pushed.bucket, evil_url), 403, "endpoint"),
                    ("s3://%s/docker-repo/?endpoint=%s" % (pushed.bucket, evil_url), 403, "endpoint"),
                    ("s3://%s?bogus=1" % pushed.bucket, 400, "bogus"), ("s3://", 400, "S3 URL")):
                header = auth_header({"username": rgw.access_key, "password": rgw.secret_key, "email": store})
                assert_json_refusal(pull_request(HOSTS[0], name, header), status, needle)
            with pytest.raises(socket.timeout):
                evil.accept()  # nobody ever connected to the client-named endpoint
        finally:
            evil.close()

        # bodies: too large (declared or sent), malformed lengths (RFC 9112: 400)
        for length, status in (("10485760", 413), ("-1", 400), ("abc", 400), ("1e3", 400)):
            answer = raw_exchange(HOSTS[0], b"POST /v1.41/images/create?fromImage=hipache HTTP/1.1\r\nHost: x\r\n"
                                            b"Content-Length: " + length.encode() + b"\r\n\r\n")
            assert raw_status(answer) == status, (length, answer)
            assert json.loads(raw_body(answer))["message"]
        with socket.create_connection((HOSTS[0], PORT), timeout=20) as sock:  # a body really sent
            sock.sendall(b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (2 << 20) + b" " * (64 << 10))
            answer = read_answer(sock)
        assert raw_status(answer) == 413 and b"too large" in answer, answer

        # HTTP-level abuse, which http.server itself answers
        huge_line = raw_exchange(HOSTS[0], b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 << 10) + b"\r\n\r\n")
        assert raw_status(huge_line) == 431, huge_line[:200]
        huge_auth = raw_exchange(HOSTS[0], b"POST /v1.41/images/create?fromImage=hipache HTTP/1.1\r\nHost: x\r\n"
                                           b"X-Registry-Auth: " + b"e" * (100 << 10) + b"\r\n\r\n")
        assert raw_status(huge_auth) == 431, huge_auth[:200]
        many = raw_exchange(HOSTS[0], b"GET /_ping HTTP/1.1\r\nHost: x\r\n" +
                            b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n")
        assert raw_status(many) == 431, many[:200]
        long_target = raw_exchange(HOSTS[0], b"GET /" + b"a" * (100 << 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw_status(long_target) == 414, long_target[:200]
        for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
                     b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /_ping HTTP/1.1 extra\r\n\r\n",
                     b"POST /v1.41/images/create HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"):
            answer = raw_exchange(HOSTS[0], junk)
            assert 400 <= raw_status(answer) < 500 or raw_status(answer) == 505, (junk, answer[:200])
        assert raw_exchange(HOSTS[0], b"\r\n\r\n\r\n") == b""  # no request line at all: just closed
        unknown = raw_exchange(HOSTS[0], b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw_status(unknown) in (403, 405, 501), unknown[:200]

        # meanwhile (slow connections still open) the server still serves
        assert call(HOSTS[0], "GET", "/_ping", timeout=5).body == b"OK"
        good = pull_request(HOSTS[0], name, auth)
        assert good.status == 200 and not good.errors(), good
        assert server.proc.poll() is None
        assert status_check(server.url)
        server.assert_no_traceback()
        # stop the server before the slow clients hang up: a client that goes away before its
        # answer is written makes a traceback (test_client_hanging_up_makes_no_traceback)
        assert server.stop() == (0, pytest.approx(0, abs=3.0))
    finally:
        for sock in slow:
            sock.close()
    assert image_id(host.host, name) == pushed.ids["hipache"]
    assert docker_cli(host.host, "ps", "-aq").stdout.strip() == ""
    server.assert_no_traceback()


def test_client_hanging_up_makes_no_traceback(fleet, rgw, base_env, servers):
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    for data in (b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # headers cut short, then gone
                 b"POST /v1.41/images/create?fromImage=x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc"):
        for reset in (False, True) * 5:
            sock = socket.create_connection((HOSTS[0], PORT), timeout=5)
            sock.sendall(data)
            if reset:  # hang up hard (RST), as a killed client's kernel may
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    # A request answered on a new connection: the kernel queues connections in the order made and
    # the server accepts them in turn, so by now each hung-up one has been accepted (has had its thread).
    assert status_check(server.url)
    deadline = time.monotonic() + 30
    while server.threads() > 1 and time.monotonic() < deadline:  # every connection's thread has ended
        time.sleep(0.05)
    assert server.threads() == 1, (server.thread_states(), open("/proc/loadavg").read(), server.stdout)
    assert status_check(server.url)
    assert "Traceback" not in server.stderr, server.stderr


def test_http_level_errors_are_json_too(fleet, rgw, base_env, servers):
    servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    for data in (b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 << 10) + b"\r\n\r\n",
                 b"GET /_ping HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n",
                 b"GARBAGE\r\n\r\n"):
        answer = raw_exchange(HOSTS[0], data)
        assert 400 <= raw_status(answer) < 500
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert b"content-type: application/json" in head, answer[:300]
        assert json.loads(raw_body(answer))["message"]


def test_a_client_without_keys_cannot_borrow_the_servers_credentials(fleet, pushed, rgw, base_env, servers):
    host = fleet[1]
    wipe(host)
    env = dict(server_env(base_env, host, rgw.endpoint), AWS_ACCESS_KEY_ID=rgw.access_key,
               AWS_SECRET_ACCESS_KEY=rgw.secret_key)  # as an EC2 instance role would provide
    servers(HOSTS[1], env)  # and no store of its own
    answer = pull_request(HOSTS[1], IMAGE, auth_header({"email": "s3://%s" % pushed.bucket}))
    assert image_id(host.host, IMAGE) is None
    assert_json_refusal(answer, 403, "needs its AWS keys")


# --- signals and the access log --------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_cleanly(fleet, rgw, base_env, servers, sig):
    server = servers(HOSTS[1], server_env(base_env, fleet[1], rgw.endpoint))
    call(HOSTS[1], "GET", "/_ping")
    call(HOSTS[1], "HEAD", "/v1.41/_ping")
    call(HOSTS[1], "GET", "/version")
    call(HOSTS[1], "POST", "/v1.41/containers/create", {}, b"{}")
    idle = socket.create_connection((HOSTS[1], PORT), timeout=5)  # an open keep-alive connection
    idle.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
    idle.recv(1024)
    try:
        status, took = server.stop(sig)
    finally:
        idle.close()
    assert status == 0, server.stderr
    assert took < 3.0
    lines = server.stdout.splitlines()
    assert lines[-1] == "dogestry server stopped", server.stdout
    log = server.access_log()
    assert [(m, t, s) for _, m, t, s in log][-5:] == [
        ("GET", "/_ping", 200), ("HEAD", "/v1.41/_ping", 200), ("GET", "/version", 200),
        ("POST", "/v1.41/containers/create", 403), ("GET", "/_ping", 200)], server.stdout
    assert all(client == "127.0.0.1" or client.startswith("127.") for client, _, _, _ in log)
    assert "Traceback" not in server.stderr and "KeyboardInterrupt" not in server.stderr


# --- a server with its own store ---------------------------------------------------------------------

def test_server_with_its_own_store_serves_logins_free_pulls(fleet, pushed, docker_host, base_env, servers, tmp_path):
    """`dogestry -server ... STORE` (a directory): docker pulls with `{}` auth, no login anywhere."""
    host = fleet[1]
    wipe(host)
    store = tmp_path / "store"
    docker_cli(docker_host, "tag", "hipache", "hipache:v1")
    try:
        for target in (store, store / "docker-repo"):
            proc = run_dogestry("push", target, "hipache", "hipache:v1", env=dict(base_env, DOCKER_HOST=docker_host))
            assert proc.returncode == 0, proc.stderr
    finally:
        docker_cli(docker_host, "rmi", "hipache:v1", check=False)
    env = dict(base_env, DOCKER_HOST=host.host)  # no AWS settings at all
    server = servers(HOSTS[1], env, store=store)
    empty = tmp_path / "cfg"
    empty.mkdir()

    proc = docker_user(HOSTS[1], "pull", IMAGE, config_dir=empty)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert image_id(host.host, IMAGE + ":latest") == pushed.ids["hipache"]
    assert str(store) not in proc.stdout + proc.stderr  # the server's paths stay on the server

    proc = docker_user(HOSTS[1], "pull", "hipache", config_dir=empty)  # docker.io/library/hipache
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert image_id(host.host, "hipache:latest") == pushed.ids["hipache"]

    proc = docker_user(HOSTS[1], "pull", IMAGE + ":v1", config_dir=empty)  # tagged as asked, and only so
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tags = json.loads(docker_cli(host.host, "image", "inspect", "-f", "{{json .RepoTags}}", IMAGE + ":v1").stdout)
    assert sorted(tags) == sorted(["hipache:latest", IMAGE + ":latest", IMAGE + ":v1"])

    proc = docker_user(HOSTS[1], "pull", REGISTRY + "/elsewhere/hipache", config_dir=empty)
    assert proc.returncode == 1 and ("not found" in proc.stderr or "does not exist" in proc.stderr), proc.stderr
    assert str(store) not in proc.stderr and "<server store>/elsewhere" in proc.stderr  # no server paths
    proc = docker_user(HOSTS[1], "pull", IMAGE + ":v2", config_dir=empty)
    assert proc.returncode == 1 and "not found" in proc.stderr, proc.stderr
    assert len(server.posts_to_create()) == 5

    # a registry host with a port is dropped too
    answer = pull_request(HOSTS[1], "registry.example:5000/docker-repo/hipache", auth_header({}))
    assert answer.status == 200 and not answer.errors(), answer
    assert image_id(host.host, "registry.example:5000/docker-repo/hipache:latest") == pushed.ids["hipache"]
    # a client may name the server's own store, but no other directory
    for email, ok in ((str(store), True), (str(tmp_path), False), (str(store) + "/../store", False)):
        answer = pull_request(HOSTS[1], "hipache", auth_header({"email": email}))
        assert (answer.status == 200 and not answer.errors()) if ok else answer.status == 400, (email, answer)


# --- delegation from the dogestry client ---------------------------------------------------------------

PULLHOSTS = ",".join("tcp://%s:2375" % a for a in HOSTS)


def fleet_pull(aws_env, proxy, *extra):
    env = dict(aws_env, AWS_ENDPOINT_URL=proxy.url)
    proc = run_dogestry(*extra, "-pullhosts", PULLHOSTS, "s3://%s/docker-repo/" % proxy.bucket, "hipache",
                        env=env, timeout=180)
    return proc


def presigned(entry):
    """Was this request made with a presigned URL (X-Amz-Signature in the query, no Authorization)?"""
    return "X-Amz-Signature" in dict(entry["query"]) and "authorization" not in entry["headers"]


def blob_reads(proxy, bucket, by_presigned_url):
    """Counter of blob GETs in BUCKET seen by PROXY, made with presigned URLs or with signed headers."""
    return collections.Counter(e["key"] for e in proxy.log
                               if e["method"] == "GET" and e["path"].startswith("/%s/" % bucket)
                               and "/blobs/" in e["key"] and presigned(e) == by_presigned_url)


@pytest.fixture
def delegation(fleet, pushed, rgw, base_env, servers, fault_proxy):
    """Both hosts wiped; one recording proxy in front of radosgw for the client and the servers
    (which have no AWS keys at all)."""
    for handle in fleet:
        wipe(handle)
    proxy = fault_proxy()
    proxy.bucket = pushed.bucket

    def start(addresses):
        return [servers(HOSTS[i], server_env(base_env, fleet[i], proxy.url)) for i in addresses]

    return proxy, start


def assert_on_every_host(fleet, pushed):
    for handle in fleet:
        assert image_id(handle.host, "hipache:latest") == pushed.ids["hipache"], handle


def test_pullhosts_delegate_to_dogestry_servers(fleet, pushed, aws_env, delegation):
    """Each server fetches the layers itself, through URLs the client presigned: the client reads
    no layer, the servers hold no keys, and the client checks each host's engine afterwards."""
    proxy, start = delegation
    running = start([0, 1])
    proc = fleet_pull(aws_env, proxy)
    assert proc.returncode == 0, proc.stderr
    statuses = json.loads(proc.stdout)
    assert statuses == [{"Host": "tcp://%s:2375" % a, "Status": "ok", "Server": "http://%s:%d" % (a, PORT)}
                        for a in HOSTS]
    for server in running:
        assert [(m, t, st) for _, m, t, st in server.delegated_posts()] == [("POST", dogestry.DELEGATION_ROUTE, 200)]
        assert not server.posts_to_create()
    assert_on_every_host(fleet, pushed)
    assert not blob_reads(proxy, pushed.bucket, by_presigned_url=False)  # the client downloaded no layer
    blobs = blob_keys(pushed, "hipache")
    assert blob_reads(proxy, pushed.bucket, by_presigned_url=True) == collections.Counter({k: 2 for k in blobs})
    assert all(HOSTS[i] in proc.stderr for i in (0, 1))  # the servers' progress was relayed

    env = dict(aws_env, AWS_ENDPOINT_URL=proxy.url)
    missing = run_dogestry("-pullhosts", PULLHOSTS, pushed.store, "nosuchimage", env=env, timeout=120)
    assert missing.returncode == 1, missing
    assert "nosuchimage not found" in missing.stderr and len(missing.stderr.splitlines()) == 1, missing.stderr
    assert json.loads(missing.stdout) == [{"Host": "tcp://%s:2375" % a, "Status": "failed",
                                           "Error": missing.stderr.strip()[len("dogestry: error: "):]} for a in HOSTS]
    assert all(len(server.delegated_posts()) == 1 for server in running)  # the client found out itself


def test_force_local_does_not_delegate(fleet, pushed, aws_env, delegation):
    proxy, start = delegation
    running = start([0, 1])
    proc = fleet_pull(aws_env, proxy, "-force-local")
    assert proc.returncode == 0, proc.stderr
    statuses = json.loads(proc.stdout)
    assert statuses == [{"Host": "tcp://%s:2375" % a, "Status": "ok"} for a in HOSTS]
    for server in running:
        assert not server.posts_to_create() and not server.delegated_posts(), server.stdout
    assert_on_every_host(fleet, pushed)
    assert set(blob_reads(proxy, pushed.bucket, by_presigned_url=False)) == set(blob_keys(pushed, "hipache"))
    assert not blob_reads(proxy, pushed.bucket, by_presigned_url=True)


def test_pullhosts_pull_directly_to_a_host_without_a_server(fleet, pushed, aws_env, delegation):
    """One host runs a server (it fetches for itself), the other does not (the client loads it)."""
    proxy, start = delegation
    (running,) = start([0])  # HOSTS[1] has no dogestry server
    proc = fleet_pull(aws_env, proxy)
    assert proc.returncode == 0, proc.stderr
    statuses = json.loads(proc.stdout)
    assert statuses == [{"Host": "tcp://%s:2375" % HOSTS[0], "Status": "ok", "Server": running.url},
                        {"Host": "tcp://%s:2375" % HOSTS[1], "Status": "ok"}]
    assert len(running.delegated_posts()) == 1 and not running.posts_to_create(), running.stdout
    assert_on_every_host(fleet, pushed)
    blobs = collections.Counter({k: 1 for k in blob_keys(pushed, "hipache")})
    assert blob_reads(proxy, pushed.bucket, by_presigned_url=True) == blobs    # the server's reads
    assert blob_reads(proxy, pushed.bucket, by_presigned_url=False) == blobs   # the client's, for HOSTS[1]


# --- delegation of images with chunked layers -----------------------------------------------------

CHUNKED = "dgchunkfleet"  # an image whose first layer (18 MiB of files) is stored as chunks


class ChunkedImage:
    """The chunked image in the module's bucket: its ID, and the store keys (under docker-repo/)
    of its chunks and of its chunked layer's recipe."""

    def __init__(self, image, chunks, recipe):
        self.image, self.chunks, self.recipe = image, chunks, recipe


def bucket_store(rgw, bucket, prefix="docker-repo/"):
    """The bucket's store as a dogestry S3Store, read with the radosgw keys."""
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, prefix, "us-east-1", rgw.endpoint)
    return dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))


@pytest.fixture(scope="module")
def chunked(docker_host, rgw, aws_env, pushed, tmp_path_factory):
    """dgchunkfleet pushed into the module's bucket: a layer of 18 MiB of text and random files
    (stored chunked), and a small one."""
    image = build_image(docker_host, CHUNKED, [
        {"big/notes.txt": text_bytes(10 << 20, 41), "big/data.bin": random_bytes(8 << 20, 42)},
        {"etc/chunked.conf": b"fleet\n"}], workdir=tmp_path_factory.mktemp("chunked"))
    proc = run_dogestry("push", pushed.store, CHUNKED, env=aws_env)
    assert proc.returncode == 0, proc.stderr
    store = bucket_store(rgw, pushed.bucket)
    record = dogestry.load_stored_image(store, image[7:]).layers[0]
    assert record.chunked
    recipe = dogestry.read_recipe(store, record)
    yield ChunkedImage(image, sorted({"docker-repo/chunks/sha256/" + h for h, _ in recipe.chunks}),
                       "docker-repo/" + dogestry.blob_key(record.digest))
    docker_cli(docker_host, "rmi", CHUNKED, check=False)


def chunk_reads(proxy, bucket, by_presigned_url):
    """Counter of chunk GETs in BUCKET seen by PROXY, made with presigned URLs or with signed headers."""
    return collections.Counter(e["key"] for e in proxy.log
                               if e["method"] == "GET" and e["path"].startswith("/%s/" % bucket)
                               and "/chunks/" in e["key"] and presigned(e) == by_presigned_url)


def test_pullhosts_delegate_a_chunked_image_and_the_servers_read_its_chunks_through_presigned_urls(
        fleet, pushed, chunked, aws_env, delegation):
    """The client reads the chunked layer's recipe and presigns every chunk it names: each server
    reads the recipe and every chunk itself (once each), the client reads none, and every host
    gets the image through its server, with no server error."""
    proxy, start = delegation
    running = start([0, 1])
    env = dict(aws_env, AWS_ENDPOINT_URL=proxy.url)

    proc = run_dogestry("-pullhosts", PULLHOSTS, pushed.store, CHUNKED, env=env, timeout=240)

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"Host": "tcp://%s:2375" % a, "Status": "ok", "Server": "http://%s:%d"
                                        % (a, PORT)} for a in HOSTS]
    assert all(len(server.delegated_posts()) == 1 for server in running)
    for handle in fleet:
        assert image_id(handle.host, CHUNKED) == chunked.image
    assert not chunk_reads(proxy, pushed.bucket, by_presigned_url=False)  # the client downloaded no chunk
    assert chunk_reads(proxy, pushed.bucket, by_presigned_url=True) == collections.Counter(
        {k: 2 for k in chunked.chunks})
    assert blob_reads(proxy, pushed.bucket, by_presigned_url=True)[chunked.recipe] == 2


def test_pullhosts_delegate_a_multi_platform_tag_of_a_chunked_image_with_its_chunks(fleet, pushed, chunked, aws_env,
                                                                                  docker_host, delegation):
    """A tag holding an index (push --multi-platform) of the chunked image: the request presigns
    the chunks of the index's images too, and the server pulls its engine's platform with them."""
    proxy, start = delegation
    (running,) = start([0])
    docker_cli(docker_host, "tag", CHUNKED, CHUNKED + "-multi")
    assert run_dogestry("push", "--multi-platform", pushed.store, CHUNKED + "-multi", env=aws_env).returncode == 0
    env = dict(aws_env, AWS_ENDPOINT_URL=proxy.url)

    proc = run_dogestry("-pullhosts", "tcp://%s:2375" % HOSTS[0], pushed.store, CHUNKED + "-multi", env=env,
                        timeout=240)

    assert proc.returncode == 0, proc.stderr
    [status] = json.loads(proc.stdout)
    assert (status["Status"], status.get("Server"), "ServerError" in status) == ("ok", running.url, False), status
    assert image_id(fleet[0].host, CHUNKED + "-multi") == chunked.image
    assert not chunk_reads(proxy, pushed.bucket, by_presigned_url=False)
    assert set(chunk_reads(proxy, pushed.bucket, by_presigned_url=True)) == set(chunked.chunks)


def test_a_server_too_old_for_chunked_layers_gets_its_host_a_direct_pull(fleet, pushed, chunked, aws_env, base_env,
                                                                         rgw, servers):
    """A real server of today behind a relay that answers GET /status/check as servers before
    chunked layers did (the delegation and index protocols, no chunks): the client sends it no
    request it cannot serve, says why, and pulls the host itself, without a server error."""
    wipe(fleet[0])
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))

    def older(req):
        if req.path == "/status/check":
            return Reply(200, b"OK", {"Content-Type": "text/plain; charset=utf-8",
                                      dogestry.DELEGATION_HEADER: dogestry.DELEGATION_PROTOCOL,
                                      dogestry.DELEGATION_INDEX_HEADER: dogestry.DELEGATION_INDEX_PROTOCOL})
        return None

    with started_servers(lambda: FaultProxy(server.url, older, address=HOSTS[0])) as start_relay:
        relay = start_relay()
        proc = run_dogestry("-port", relay.port, "-pullhosts", "tcp://%s:2375" % HOSTS[0], pushed.store, CHUNKED,
                            env=aws_env, timeout=240)
        assert [e["path"] for e in relay.log] == ["/status/check"]

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"Host": "tcp://%s:2375" % HOSTS[0], "Status": "ok"}]
    assert "too old for chunked layers: pulling directly" in proc.stderr
    assert server.delegated_posts() == []
    assert image_id(fleet[0].host, CHUNKED) == chunked.image


def test_an_image_with_more_chunks_than_a_delegated_pull_carries_is_planned_as_a_direct_pull(pushed, chunked, rgw):
    """The planner presigns at most chunk_limit chunks (DELEGATION_CHUNKS_MAX by default): an image
    with more is planned as one to pull directly, and says why; up to the limit, the request names
    the query the chunks' URLs share and each chunk's signature."""
    store = bucket_store(rgw, pushed.bucket)
    progress = dogestry.Progress(io.StringIO(), quiet=True)
    count = len(chunked.chunks)

    over = dogestry.plan_delegation(store, CHUNKED, progress, chunk_limit=count - 1)
    within = dogestry.plan_delegation(store, CHUNKED, progress, chunk_limit=count)

    assert over.body == b"" and over.direct == "%s:latest has %d chunks, more than the %d a delegated pull carries" % (
        CHUNKED, count, count - 1)
    doc = json.loads(within.body)
    assert within.direct == "" and within.chunks == count
    assert sorted("docker-repo/chunks/sha256/" + h for h in doc["chunks"]["signatures"]) == chunked.chunks
    assert "X-Amz-Credential=" in doc["chunks"]["query"] and "X-Amz-Signature" not in doc["chunks"]["query"]


@pytest.mark.parametrize("change,status,needle", [
    ("too many", 400, "at most"), ("not hex", 400, "sha256 hex digests"),
    ("no credential", 403, "bad presigned URL for the chunks"), ("not a dict", 400, "need a query and signatures")])
def test_a_delegated_pull_with_bad_chunks_is_refused_before_anything_is_read(change, status, needle, fleet, pushed,
                                                                            chunked, rgw, base_env, servers):
    """More chunks than a request may carry, a chunk or signature that is not 64 hex digits, a
    query without a credential, chunks of the wrong shape: refused, nothing pulled."""
    wipe(fleet[0])
    servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    plan = json.loads(dogestry.plan_delegation(bucket_store(rgw, pushed.bucket), CHUNKED,
                                               dogestry.Progress(io.StringIO(), quiet=True)).body)
    chunks = plan["chunks"]
    some_hex, some_signature = next(iter(chunks["signatures"].items()))
    changed = {
        "too many": dict(chunks, signatures={"%064x" % i: some_signature
                                             for i in range(dogestry.DELEGATION_CHUNKS_MAX + 1)}),
        "not hex": dict(chunks, signatures={some_hex: "xyz"}),
        "no credential": dict(chunks, query="X-Amz-Algorithm=AWS4-HMAC-SHA256"),
        "not a dict": [chunks["query"]],
    }[change]

    answer = call(HOSTS[0], "POST", dogestry.DELEGATION_ROUTE, {"Content-Type": "application/json"},
                  json.dumps(dict(plan, chunks=changed)).encode())

    assert_json_refusal(answer, status, needle)
    assert image_id(fleet[0].host, CHUNKED) is None


# --- login ----------------------------------------------------------------------------------------------

@pytest.fixture
def login_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "DOCKER_CONFIG"}
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    return env


def test_login_writes_the_default_config_when_docker_config_is_unset(login_env):
    proc = login(login_env, REGISTRY, "AKIDEXAMPLE\nsecret/key+1\ns3://ops-goodies/?region=us-west-2\n")
    assert proc.returncode == 0, proc.stderr
    path = Path(login_env["HOME"]) / ".docker" / "config.json"
    assert "Login saved for %s in %s" % (REGISTRY, path) in proc.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"auths": {REGISTRY: {
        "auth": b64("AKIDEXAMPLE:secret/key+1"), "email": "s3://ops-goodies/?region=us-west-2"}}}
    # the prompts are shown, even when answers come from a pipe
    for prompt in ("AWS_ACCESS_KEY:", "AWS_SECRET_KEY:", "S3_URL:"):
        assert prompt in proc.stderr

    # a second login for another registry keeps the first; a re-login replaces its own entry
    assert login(login_env, "other.example", "A2\nS2\ns3://bucket-two\n").returncode == 0
    assert login(login_env, REGISTRY, "A3\nS3\ns3://bucket-three/p/\n").returncode == 0
    auths = json.loads(path.read_text())["auths"]
    assert auths == {REGISTRY: {"auth": b64("A3:S3"), "email": "s3://bucket-three/p/"},
                     "other.example": {"auth": b64("A2:S2"), "email": "s3://bucket-two"}}


def test_login_keeps_other_keys_and_fixes_the_mode(login_env, tmp_path):
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    path = config_dir / "config.json"
    original = {"psFormat": "table {{.Names}}", "detachKeys": "ctrl-x",
                "auths": {"registry.example:5000": {"auth": b64("u:p")}},
                "HttpHeaders": {"User-Agent": "test"}, "plugins": {"x": {"y": "z"}}}
    path.write_text(json.dumps(original))
    os.chmod(str(path), 0o644)
    env = dict(login_env, DOCKER_CONFIG=str(config_dir))
    proc = login(env, REGISTRY, "AK\nSK\ns3://bucket/prefix/\n")
    assert proc.returncode == 0, proc.stderr
    assert str(path) in proc.stdout
    doc = json.loads(path.read_text())
    expected = json.loads(json.dumps(original))
    expected["auths"][REGISTRY] = {"auth": b64("AK:SK"), "email": "s3://bucket/prefix/"}
    assert doc == expected
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in config_dir.iterdir()) == ["config.json"]


@pytest.mark.parametrize("answers,needle", [
    ("AK\n\ns3://bucket\n", "AWS_SECRET_KEY"),
    ("\nSK\ns3://bucket\n", "AWS_ACCESS_KEY"),
    ("AK\nSK\n   \n", "S3_URL"),
    ("AK\nSK\n", "S3_URL"),         # the pipe ends early
    ("", "AWS_ACCESS_KEY"),
], ids=["blank-secret", "blank-access-key", "blank-url", "eof", "empty-input"])
def test_login_refuses_blank_answers(login_env, tmp_path, answers, needle):
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    path = config_dir / "config.json"
    path.write_text('{"psFormat": "x"}\n')
    before = path.read_bytes(), path.stat().st_mtime_ns
    proc = login(dict(login_env, DOCKER_CONFIG=str(config_dir)), REGISTRY, answers)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr and "blank" in proc.stderr, proc.stderr
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in config_dir.iterdir()) == ["config.json"]


@pytest.mark.parametrize("url", ["not-a-url", "s3://", "s3://x", "s3://bucket?bogus=1", "s3://bucket/../x"])
def test_login_refuses_a_malformed_s3_url(login_env, tmp_path, url):
    env = dict(login_env, DOCKER_CONFIG=str(tmp_path / "cfg"))
    proc = login(env, REGISTRY, "AK\nSK\n%s\n" % url)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "dogestry: error:" in proc.stderr and ("S3 URL" in proc.stderr or "unsafe" in proc.stderr), proc.stderr
    assert not (tmp_path / "cfg" / "config.json").exists()


@pytest.mark.parametrize("url", ["http://example.com/bucket", "https://bucket.s3.amazonaws.com/"])
def test_login_refuses_a_url_that_is_not_s3(login_env, tmp_path, url):
    env = dict(login_env, DOCKER_CONFIG=str(tmp_path / "cfg"))
    proc = login(env, REGISTRY, "AK\nSK\n%s\n" % url)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "S3 URL" in proc.stderr, proc.stderr
    assert not (tmp_path / "cfg" / "config.json").exists()


@pytest.mark.parametrize("content,needle", [
    ("{not json", "cannot read"),
    ("[1, 2]", "not a JSON object"),
    ('{"auths": []}', "auths"),
], ids=["invalid-json", "json-array", "auths-not-object"])
def test_login_refuses_to_clobber_a_broken_config(login_env, tmp_path, content, needle):
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    path = config_dir / "config.json"
    path.write_text(content)
    proc = login(dict(login_env, DOCKER_CONFIG=str(config_dir)), REGISTRY, "AK\nSK\ns3://bucket\n")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and needle in proc.stderr, proc.stderr
    assert path.read_text() == content
    assert sorted(p.name for p in config_dir.iterdir()) == ["config.json"]


def test_login_on_a_tty_does_not_echo_the_keys(login_env, tmp_path):
    """On a terminal the two keys are read without echo; the S3 URL is echoed as typed."""
    config_dir = tmp_path / "cfg"
    env = dict(login_env, DOCKER_CONFIG=str(config_dir))
    master, slave = os.openpty()

    def make_controlling_tty():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, str(DOGESTRY), "login", REGISTRY], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, preexec_fn=make_controlling_tty)
    os.close(slave)
    echoed, errors = bytearray(), bytearray()

    def pump(deadline, until):
        while time.monotonic() < deadline and until not in errors:
            ready, _, _ = select.select([master, proc.stderr], [], [], 0.1)
            for fd in ready:
                try:
                    data = os.read(master if fd == master else proc.stderr.fileno(), 4096)
                except OSError:
                    data = b""
                (echoed if fd == master else errors).extend(data)
        return until in errors

    try:
        deadline = time.monotonic() + 20
        for prompt, answer in ((b"AWS_ACCESS_KEY: ", b"AKTTYSECRET1\n"), (b"AWS_SECRET_KEY: ", b"SKTTYSECRET2\n"),
                               (b"S3_URL: ", b"s3://tty-bucket\n")):
            assert pump(deadline, prompt), (bytes(errors), bytes(echoed))
            del errors[:errors.index(prompt) + len(prompt)]
            os.write(master, answer)
        proc.wait(timeout=20)
        while select.select([master], [], [], 0.2)[0]:  # the rest of the terminal's echo
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            echoed.extend(data)
        out, err = proc.communicate(timeout=20)
        err = bytes(errors) + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.returncode == 0, (out, err)
    assert b"AKTTYSECRET1" not in echoed and b"SKTTYSECRET2" not in echoed, bytes(echoed)
    assert b"AKTTYSECRET1" not in err + out and b"SKTTYSECRET2" not in err + out
    assert b"s3://tty-bucket" in echoed, bytes(echoed)
    doc = json.loads((config_dir / "config.json").read_text())
    assert doc["auths"][REGISTRY] == {"auth": b64("AKTTYSECRET1:SKTTYSECRET2"), "email": "s3://tty-bucket"}
