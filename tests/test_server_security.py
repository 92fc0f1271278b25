"""The server and fleet delegation as an attacker sees them (issue 8), with real parts.

Real dockerds as the fleet's hosts (random loopback addresses), a real radosgw with a second
user, "the attacker", who owns a bucket of their own, the real docker CLI, and the server as
a subprocess.  Each test names the attack it stops; every one failed on the code before it.

  1. the server's identity and tags: SSRF, planted images, anonymous reach, TLS
  2. fleet delegation: no keys handed out, impostors caught, namespaced names, TLS
  3. denial of service: connections, slow clients, file descriptors, huge documents
  4. HTTP framing (RFC 9112)
  5. logs and login
"""

import http.server
import io
import json
import os
import re
import resource
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import uuid

import pytest

import dogestry
from conftest import make_bucket, skip_or_fail
from realdocker import (DOGESTRY, DockerdError, build_image, docker_cli, image_id, loopback_addresses,
                        one_error_line, random_bytes, run_dogestry)
from serverkit import (PORT, assert_json_refusal, auth_header, b64, call, docker_user, login,
                       pull_request, raw_exchange, raw_status, read_answer, read_until_closed, server_env,
                       started_dockerds, status_check, tls_client_context, wipe)
from testcerts import CLIENT_EXT, ca_dir, make_ca, make_leaf, server_ext

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(2, ports=(2375, 2376, PORT))
REGISTRY = "corp.example"
PROD = "payments/api:prod"      # the tag production pulls, in the victim's bucket and the attacker's
NAMESPACED = ("app:1", "team/app:1", "a/b/app:1")


# --- module fixtures -----------------------------------------------------------------------------

def keys_env(base_env, endpoint, access_key, secret_key):
    return dict(base_env, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, AWS_ENDPOINT_URL=endpoint)


@pytest.fixture(scope="module")
def attacker(rgw):
    """A second radosgw user: valid keys on the same endpoint, and nothing else."""
    suffix = uuid.uuid4().hex[:10]
    user = types.SimpleNamespace(access_key="ATTACKER" + suffix.upper(), secret_key="attacker-secret-" + suffix)
    rgw.radosgw_admin("user", "create", "--uid=attacker-" + suffix, "--display-name=Attacker",
                      "--access-key=" + user.access_key, "--secret-key=" + user.secret_key)
    return user


class Stores:
    """The victim's bucket (the test user's) and the attacker's, and what was pushed to them."""

    def __init__(self, victim, evil, ids):
        self.victim, self.evil, self.ids = victim, evil, ids


@pytest.fixture(scope="module")
def stores(docker_host, rgw, attacker, base_env, tmp_path_factory):
    """PROD and the NAMESPACED names (one image) in the victim's bucket; the attacker's own image as
    PROD in the attacker's bucket."""
    work = tmp_path_factory.mktemp("build")
    victim_id = build_image(docker_host, "dgsec-victim", [{"app/payments.bin": random_bytes(200 << 10, 81)}],
                            workdir=work)
    evil_id = build_image(docker_host, "dgsec-evil", [{"app/payments.bin": random_bytes(200 << 10, 666)}],
                          workdir=work)
    victim = make_bucket(rgw, "dgsec-victim-" + uuid.uuid4().hex[:8])
    evil = "dgsec-evil-" + uuid.uuid4().hex[:8]
    attacker_config = dogestry.AwsConfig({"AWS_ACCESS_KEY_ID": attacker.access_key,
                                          "AWS_SECRET_ACCESS_KEY": attacker.secret_key}, "/nonexistent")
    dogestry.S3Client(dogestry.S3Location(evil, "", "us-east-1", rgw.endpoint),
                      dogestry.CredentialChain(attacker_config), attacker_config).request("PUT").read()
    victim_env = keys_env(dict(base_env, DOCKER_HOST=docker_host), rgw.endpoint, rgw.access_key, rgw.secret_key)
    evil_env = keys_env(dict(base_env, DOCKER_HOST=docker_host), rgw.endpoint, attacker.access_key,
                        attacker.secret_key)
    names = (PROD,) + NAMESPACED
    try:
        for name in names:
            docker_cli(docker_host, "tag", "dgsec-victim", name)
        proc = run_dogestry("push", "s3://%s/" % victim, *names, env=victim_env)
        assert proc.returncode == 0, proc.stderr
        docker_cli(docker_host, "tag", "dgsec-evil", PROD)
        proc = run_dogestry("push", "s3://%s/" % evil, PROD, env=evil_env)
        assert proc.returncode == 0, proc.stderr
    finally:
        docker_cli(docker_host, "rmi", *names, check=False)
    return Stores(victim, evil, {"victim": victim_id, "evil": evil_id})


def user_store(rgw, bucket):
    """The S3 store of BUCKET as the test user (the victim) reads it."""
    config = dogestry.AwsConfig({"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}, "/x")
    location = dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint)
    return dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))


def docker_config(tmp_path, entries):
    """A DOCKER_CONFIG dir whose auths hold ENTRIES: {registry: (access key, secret, s3 url)}."""
    path = tmp_path / ("cfg-" + uuid.uuid4().hex[:6])
    path.mkdir()
    auths = {r: {"auth": b64("%s:%s" % (ak, sk)), "email": url} for r, (ak, sk, url) in entries.items()}
    (path / "config.json").write_text(json.dumps({"auths": auths}))
    return path


def empty_config(tmp_path):
    return docker_config(tmp_path, {})


def tags_on(handle, ref):
    """The RepoTags of REF on a host, or None if it has no such image."""
    proc = docker_cli(handle.host, "image", "inspect", "-f", "{{json .RepoTags}}", ref, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


class Listener:
    """A TCP listener nobody should ever connect to: .url, .connected()."""

    def __init__(self, address="127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.url = "http://%s:%d" % (address, self.sock.getsockname()[1])

    def connected(self):
        try:
            conn, _ = self.sock.accept()
        except socket.timeout:
            return False
        conn.close()
        return True

    def close(self):
        self.sock.close()


# === 1. the server's identity and tags =========================================================

def test_a_client_cannot_point_the_servers_keys_at_another_endpoint(fleet, stores, rgw, base_env, servers):
    """SSRF: a store URL that starts with the server's own, plus ?endpoint=, ?region= or ?profile=
    (one of the server's own AWS profiles), is refused; the server never signs a request for a
    host or with keys a client chose."""
    server_keys = keys_env(dict(base_env, DOCKER_HOST=fleet[0].host), rgw.endpoint, rgw.access_key, rgw.secret_key)
    servers(HOSTS[0], server_keys, store="s3://%s/" % stores.victim)
    evil = Listener()
    try:
        for auth in ({}, {"username": rgw.access_key, "password": rgw.secret_key}):
            for query in ("endpoint=" + evil.url, "region=us-west-2", "endpoint=%s&region=eu-west-1" % evil.url,
                          "profile=default"):
                named = "s3://%s/x?%s" % (stores.victim, query)
                answer = pull_request(HOSTS[0], REGISTRY + "/" + PROD.split(":")[0], auth_header(dict(auth, email=named)),
                                      tag="prod")
                assert_json_refusal(answer, 403, "endpoints, regions or profiles")
        assert not evil.connected()
    finally:
        evil.close()
    good = pull_request(HOSTS[0], REGISTRY + "/payments/api", auth_header({}), tag="prod")
    assert good.status == 200 and not good.errors(), good  # the server's own store, its own keys


def test_a_server_with_a_store_refuses_client_named_stores_unless_allowed(fleet, stores, rgw, attacker, base_env,
                                                                         servers, tmp_path):
    """Planted images: any valid key on the endpoint could make the host's PROD tag point at the
    attacker's image.  A server with a store serves client-named stores only from its -allow list."""
    host = fleet[0]
    wipe(host)
    server_keys = keys_env(dict(base_env, DOCKER_HOST=host.host), rgw.endpoint, rgw.access_key, rgw.secret_key)
    evil_login = docker_config(tmp_path, {REGISTRY: (attacker.access_key, attacker.secret_key, "s3://%s" % stores.evil)})
    server = servers(HOSTS[0], server_keys, store="s3://%s/" % stores.victim)
    planted = docker_user(HOSTS[0], "pull", REGISTRY + "/" + PROD, config_dir=evil_login)
    assert planted.returncode == 1, planted
    assert "not a store this server serves" in planted.stderr, planted.stderr
    assert tags_on(host, REGISTRY + "/" + PROD) is None
    server.stop()

    servers(HOSTS[0], server_keys, store="s3://%s/" % stores.victim, args=["-allow", "s3://%s/other/" % stores.evil])
    again = docker_user(HOSTS[0], "pull", REGISTRY + "/" + PROD, config_dir=evil_login)
    assert again.returncode == 1 and "not a store this server serves" in again.stderr, again
    assert tags_on(host, REGISTRY + "/" + PROD) is None

    servers(HOSTS[1], dict(server_keys, DOCKER_HOST=fleet[1].host), store="s3://%s/" % stores.victim,
            args=["-allow", "s3://%s/" % stores.evil])
    wipe(fleet[1])
    allowed = docker_user(HOSTS[1], "pull", REGISTRY + "/" + PROD, config_dir=evil_login)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert image_id(fleet[1].host, REGISTRY + "/" + PROD) == stores.ids["evil"]  # allowed, with its own keys


def test_an_open_server_says_so_once_at_start(fleet, base_env, rgw, servers, tmp_path):
    open_server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    assert open_server.stderr.splitlines() == [dogestry.OPEN_SERVER_WARNING], open_server.stderr
    for args in (["-allow", "s3://somebucket/"], ["-registry", REGISTRY, "-allow", "s3://somebucket/p/"]):
        restricted = servers(HOSTS[1], server_env(base_env, fleet[1], rgw.endpoint), args=args)
        assert restricted.stderr == "", restricted.stderr
        restricted.stop()


def test_registry_restricts_the_names_clients_may_pull_under(fleet, stores, rgw, base_env, servers, tmp_path):
    """-registry corp.example: the registry host is not dropped blindly any more."""
    host = fleet[0]
    wipe(host)
    server_keys = keys_env(dict(base_env, DOCKER_HOST=host.host), rgw.endpoint, rgw.access_key, rgw.secret_key)
    servers(HOSTS[0], server_keys, store="s3://%s/" % stores.victim, args=["-registry", REGISTRY])
    cfg = empty_config(tmp_path)
    for name in ("other.example/" + PROD, PROD, "docker.io/" + PROD, "localhost:5000/" + PROD):
        refused = docker_user(HOSTS[0], "pull", name, config_dir=cfg)
        assert refused.returncode == 1, refused
        assert "does not serve images of" in refused.stderr and REGISTRY in refused.stderr, refused.stderr
    assert docker_cli(host.host, "images", "-q").stdout.strip() == ""
    pulled = docker_user(HOSTS[0], "pull", REGISTRY + "/" + PROD, config_dir=cfg)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert tags_on(host, REGISTRY + "/" + PROD) == [REGISTRY + "/" + PROD]


def test_the_server_pulls_by_tag_only(fleet, stores, rgw, base_env, servers, docker_host):
    """Anonymous reach: no image-ID prefixes, so untagged images stay out of reach and the answers
    do not tell which IDs exist."""
    host = fleet[0]
    wipe(host)
    env = keys_env(dict(base_env, DOCKER_HOST=docker_host), rgw.endpoint, rgw.access_key, rgw.secret_key)
    hidden = "s3://%s/hidden/" % stores.victim
    proc = run_dogestry("push", hidden, stores.ids["victim"], env=env)  # stored by ID: no tag at all
    assert proc.returncode == 0, proc.stderr
    servers(HOSTS[0], dict(env, DOCKER_HOST=host.host), store="s3://%s/" % stores.victim)
    hexid = stores.ids["victim"].split(":")[1]
    messages = []
    for prefix in (hexid[:4], "ffff" if not hexid.startswith("ffff") else "eeee"):
        for name, tag in (("hidden/sha256", prefix), (REGISTRY + "/hidden/" + prefix, "latest"), ("sha256", prefix)):
            answer = pull_request(HOSTS[0], name, auth_header({}), tag=tag)
            assert answer.status == 200 and answer.errors(), (name, tag, answer)
            messages.append(answer.errors()[0]["error"].replace(prefix, "PREFIX"))
    assert messages[:3] == messages[3:]  # a real prefix and a made-up one get the same answers
    whole = pull_request(HOSTS[0], REGISTRY + "/hidden/" + hexid, auth_header({}))
    assert whole.status == 200 and "not found" in whole.errors()[0]["error"], whole
    assert image_id(host.host, stores.ids["victim"]) is None


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA; server certificates for HOSTS[0] and for a wrong name; client certificates of the CA
    and of another CA."""
    d = ca_dir(tmp_path_factory, "srvtls")
    make_leaf(d, "ca", "server", "/CN=%s" % HOSTS[0], server_ext("IP:%s" % HOSTS[0]))
    make_leaf(d, "ca", "wrongname", "/CN=elsewhere.example", server_ext("DNS:elsewhere.example"))
    make_leaf(d, "ca", "client", "/CN=client", CLIENT_EXT)
    make_ca(d, "other-ca")
    make_leaf(d, "other-ca", "stranger", "/CN=stranger", CLIENT_EXT)
    client_dir = d / "client-dir"
    client_dir.mkdir()
    for src, dst in (("ca.pem", "ca.pem"), ("client-cert.pem", "cert.pem"), ("client-key.pem", "key.pem")):
        shutil.copyfile(str(d / src), str(client_dir / dst))
    return d


def tls_server_args(d, cert="server"):
    return ["-tlsverify", "-tlscacert", d / "ca.pem", "-tlscert", d / ("%s-cert.pem" % cert),
            "-tlskey", d / ("%s-key.pem" % cert)]


def test_tls_with_client_certificates_decides_who_may_pull(fleet, stores, rgw, base_env, servers, certs, tmp_path):
    host = fleet[0]
    wipe(host)
    env = keys_env(dict(base_env, DOCKER_HOST=host.host), rgw.endpoint, rgw.access_key, rgw.secret_key)
    server = servers(HOSTS[0], env, store="s3://%s/" % stores.victim, args=tls_server_args(certs),
                     tls=tls_client_context(certs / "ca.pem", certs / "client-cert.pem", certs / "client-key.pem"))
    assert "with TLS, client certificates required" in server.stdout
    cfg = empty_config(tmp_path)
    client = ["--tlsverify", "--tlscacert", certs / "ca.pem"]
    pulled = docker_user(HOSTS[0], "pull", REGISTRY + "/" + PROD, config_dir=cfg,
                         tls_args=client + ["--tlscert", certs / "client-cert.pem", "--tlskey", certs / "client-key.pem"])
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert image_id(host.host, REGISTRY + "/" + PROD) == stores.ids["victim"]
    wipe(host)
    stranger = docker_user(HOSTS[0], "pull", REGISTRY + "/" + PROD, config_dir=cfg,
                           tls_args=client + ["--tlscert", certs / "stranger-cert.pem",
                                              "--tlskey", certs / "stranger-key.pem"])
    assert stranger.returncode != 0, stranger
    no_cert = docker_user(HOSTS[0], "pull", REGISTRY + "/" + PROD, config_dir=cfg, tls_args=client)
    assert no_cert.returncode != 0, no_cert
    plain = raw_exchange(HOSTS[0], b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"OK" not in plain
    assert image_id(host.host, REGISTRY + "/" + PROD) is None
    assert server.stdout.count("TLS handshake failed") >= 3, server.stdout
    ctx = tls_client_context(certs / "ca.pem", certs / "client-cert.pem", certs / "client-key.pem")
    assert status_check(server.url, ctx)  # still serving


@pytest.mark.parametrize("args,needle", [
    (["-tlscacert", "CA"], "-tlscacert needs -tlsverify"),
    (["-tls", "-tlscert", "/nonexistent/cert.pem", "-tlskey", "/nonexistent/key.pem"], "/nonexistent/cert.pem"),
    (["-tlsverify", "-tlscert", "CERT", "-tlskey", "KEY", "-tlscacert", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
    (["-allow", "s3://bucket/?endpoint=http://x"], "-allow takes"),
    (["-registry", "not a host"], "invalid -registry"),
    (["-port", "99999"], "99999"),
    (["-read-timeout", "0"], "-read-timeout"),
], ids=["cacert-without-verify", "missing-cert", "missing-ca", "allow-endpoint", "bad-registry", "bad-port",
        "zero-timeout"])
def test_bad_server_settings_are_one_clear_error(args, needle, certs, base_env):
    subst = {"CA": certs / "ca.pem", "CERT": certs / "server-cert.pem", "KEY": certs / "server-key.pem"}
    proc = run_dogestry("-server", "-address", "127.0.0.1", "-port", "0",
                        *[subst.get(a, a) for a in args], env=base_env, timeout=30)
    assert proc.returncode == 2, proc
    one_error_line(proc, needle)


# === 2. fleet delegation ========================================================================

class Impostor(http.server.ThreadingHTTPServer):
    """Whatever a local user could bind on a fleet host's server port: it answers /status/check
    like a dogestry server (with or without the delegation header), says every pull went fine,
    sends terminal escape sequences as progress, and records every byte it receives."""

    daemon_threads = True

    def __init__(self, address, delegation=True):
        self.received, self.bodies, self.delegation = [], [], delegation

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(handler):
                self.received.append(handler.requestline.encode() + b"\n" + bytes(handler.headers))
                extra = {dogestry.DELEGATION_HEADER: dogestry.DELEGATION_PROTOCOL} if self.delegation else {}
                handler.send_response(200)
                for k, v in dict({"Content-Length": "2"}, **extra).items():
                    handler.send_header(k, v)
                handler.end_headers()
                handler.wfile.write(b"OK")

            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                self.received.append(handler.requestline.encode() + b"\n" + bytes(handler.headers) + body)
                self.bodies.append(body)
                lines = [{"status": "\x1b[2J\x1b]0;pwned\x07all good \x1b[31mreally"}, [1, 2], "text", None, 5,
                         {"status": "Status: Downloaded newer image"}]
                data = b"".join(json.dumps(line).encode() + b"\r\n" for line in lines) + b"[" * 5000 + b"\r\n"
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)

        super().__init__((address, 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self):
        self.shutdown()
        self.server_close()


def pull_past_an_impostor(host, stores, rgw, base_env, delegation):
    """`dogestry -pullhosts HOST` of PROD while an Impostor holds the server port on HOST's address."""
    wipe(host)
    impostor = Impostor(HOSTS[0], delegation)
    try:
        env = keys_env(base_env, rgw.endpoint, rgw.access_key, rgw.secret_key)
        proc = run_dogestry("-port", impostor.port, "-pullhosts", "tcp://%s:2375" % HOSTS[0],
                            "s3://%s/" % stores.victim, PROD, env=env, timeout=120)
    finally:
        impostor.stop()
    assert proc.returncode == 0, proc.stderr
    return impostor, proc


def test_delegation_hands_out_no_keys_and_a_lying_server_is_caught(fleet, stores, rgw, base_env):
    """An impostor on the server port gets presigned URLs for exactly this image's objects, never
    the keys; its 'ok' is checked against the host's engine (which it cannot fool), so the host
    gets a regular pull; its escape sequences never reach the terminal."""
    host = fleet[0]
    impostor, proc = pull_past_an_impostor(host, stores, rgw, base_env, delegation=True)
    (status,) = json.loads(proc.stdout)
    assert status["Status"] == "ok" and "Server" not in status, status
    assert "reported success, but the host has no %s" % PROD in status["ServerError"], status
    assert image_id(host.host, PROD) == stores.ids["victim"]  # pulled directly after all
    received = b"".join(impostor.received)
    assert rgw.secret_key.encode() not in received and b"X-Registry-Auth" not in received
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr, proc.stderr
    assert "all good" in proc.stderr  # relayed, defanged

    (body,) = impostor.bodies
    doc = json.loads(body)
    hexid = stores.ids["victim"].split(":")[1]
    assert doc["store"] == "s3://%s/" % stores.victim and doc["image"] == stores.ids["victim"] and doc["tag"] == PROD
    keys = sorted(doc["objects"])
    assert keys[-2:] == ["images/%s/config.json" % hexid, "images/%s/manifest.json" % hexid], keys
    assert all(k.startswith("blobs/sha256/") for k in keys[:-2]) and len(keys) == 3, keys
    for entry in doc["objects"].values():
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(entry["url"]).query))
        assert int(query["X-Amz-Expires"]) <= 900 and query["X-Amz-Credential"].startswith(rgw.access_key + "/")
        assert rgw.secret_key not in entry["url"]


def test_a_server_without_presigned_delegation_is_never_sent_anything(fleet, stores, rgw, base_env):
    """An old-style server (or an impostor speaking the original protocol) gets no keys: no delegation."""
    host = fleet[0]
    impostor, proc = pull_past_an_impostor(host, stores, rgw, base_env, delegation=False)
    assert json.loads(proc.stdout) == [{"Host": "tcp://%s:2375" % HOSTS[0], "Status": "ok"}]
    assert [r.split(b"\n")[0] for r in impostor.received] == [b"GET /status/check HTTP/1.1"]
    assert image_id(host.host, PROD) == stores.ids["victim"]


def test_namespaced_names_through_servers(fleet, stores, rgw, base_env, servers, tmp_path):
    """1-, 2- and 3-component names, delegated with -pullhosts and pulled with the docker CLI:
    the name rule tries the longest prefix first, then names at the top of the store."""
    for handle in fleet:
        wipe(handle)
    env = keys_env(base_env, rgw.endpoint, rgw.access_key, rgw.secret_key)
    for i in (0, 1):  # with keys: docker CLI pulls read the server's own store with them
        servers(HOSTS[i], dict(env, DOCKER_HOST=fleet[i].host), store="s3://%s/" % stores.victim)
    pullhosts = ",".join("tcp://%s:2375" % a for a in HOSTS)
    proc = run_dogestry("-pullhosts", pullhosts, "s3://%s/" % stores.victim, *NAMESPACED, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert [s.get("Server") for s in json.loads(proc.stdout)] == ["http://%s:%d" % (a, PORT) for a in HOSTS], proc.stdout
    for handle in fleet:
        assert sorted(tags_on(handle, "app:1")) == sorted(NAMESPACED)
    wipe(fleet[0])
    cfg = empty_config(tmp_path)
    for name in NAMESPACED:
        pulled = docker_user(HOSTS[0], "pull", REGISTRY + "/" + name, config_dir=cfg)
        assert pulled.returncode == 0, (name, pulled.stdout + pulled.stderr)
        assert image_id(fleet[0].host, REGISTRY + "/" + name) == stores.ids["victim"]


def test_names_from_a_store_reach_the_terminal_defanged(tmp_path):
    """A tag key may hold any byte but '/': list shows control characters as \\xNN."""
    store = tmp_path / "store"
    (store / "repositories" / "evil\x1b]0;owned\x07").mkdir(parents=True)
    (store / "repositories" / "evil\x1b]0;owned\x07" / "latest\x1b[2J").write_text("ab" * 32)
    proc = run_dogestry("list", store, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout, repr(proc.stdout)
    assert "evil\\x1b]0;owned\\x07   latest\\x1b[2J   abababababab" in proc.stdout, proc.stdout


def delegated_post(address, doc, port=PORT):
    return call(address, "POST", dogestry.DELEGATION_ROUTE, {"Content-Type": "application/json"},
                json.dumps(doc).encode(), port=port)


def test_the_server_reads_presigned_urls_of_its_own_endpoint_only(fleet, stores, rgw, base_env, servers):
    """A delegated pull names objects by URL: each must be exactly that object of an allowed
    store on the server's own S3 endpoint, or the server never makes the request."""
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint),  # no keys: delegated pulls only
                     args=["-allow", "s3://%s/" % stores.victim])
    store = user_store(rgw, stores.victim)
    plan = json.loads(dogestry.plan_delegation(store, PROD, dogestry.Progress(io.StringIO(), quiet=True)).body)
    hexid = stores.ids["victim"].split(":")[1]
    manifest_key = "images/%s/manifest.json" % hexid
    evil = Listener()
    try:
        real = plan["objects"][manifest_key]["url"]
        elsewhere = real.replace(rgw.endpoint, evil.url)
        other_bucket = real.replace("/%s/" % stores.victim, "/%s/" % stores.evil)
        for objects, needle in (
                ({manifest_key: {"url": elsewhere, "size": 10}}, "does not point"),
                ({manifest_key: {"url": other_bucket, "size": 10}}, "does not point"),
                ({manifest_key: {"url": real + "&extra=1", "size": 10}}, "bad presigned URL"),
                ({"repositories/payments/api/prod": {"url": real, "size": 10}}, "may only read"),
                ({"images/%s/../../x" % hexid: {"url": real, "size": 10}}, "may only read")):
            answer = delegated_post(HOSTS[0], dict(plan, objects=objects))
            assert_json_refusal(answer, 403, needle)
        answer = delegated_post(HOSTS[0], dict(plan, store="s3://%s/" % stores.evil))
        assert_json_refusal(answer, 403, "not a store this server serves")
        for bad in (b"[]", b"{", b"[" * 40000, json.dumps(dict(plan, image="sha256:xyz")).encode()):
            answer = call(HOSTS[0], "POST", dogestry.DELEGATION_ROUTE, {}, bad)
            assert answer.status == 400, answer
        assert not evil.connected()
    finally:
        evil.close()
    server.assert_no_traceback()


@pytest.fixture(scope="module")
def tls_host(docker_host, certs):
    """A dockerd with --tlsverify on HOSTS[0]:2376 (the CA of `certs`)."""
    args = ["--tlsverify", "--tlscacert", certs / "ca.pem", "--tlscert", certs / "server-cert.pem",
            "--tlskey", certs / "server-key.pem"]
    try:
        with started_dockerds(["%s:2376" % HOSTS[0]], extra_args=args) as (handle,):
            yield handle
    except DockerdError as e:
        skip_or_fail("cannot start a TLS dockerd: %s" % e)


def test_delegation_over_tls_verifies_the_servers_certificate(tls_host, stores, rgw, base_env, servers, certs):
    """With DOCKER_TLS_VERIFY the client talks to the server as to the engine: TLS, the server's
    certificate checked.  A server whose certificate names another host gets no delegation."""
    wipe(tls_host)
    server_base = server_env(base_env, tls_host, rgw.endpoint)
    client_ctx = tls_client_context(certs / "ca.pem", certs / "client-cert.pem", certs / "client-key.pem")
    env = dict(keys_env(base_env, rgw.endpoint, rgw.access_key, rgw.secret_key), DOCKER_TLS_VERIFY="1",
               DOCKER_CERT_PATH=str(certs / "client-dir"))
    host = "tcp://%s:2376" % HOSTS[0]

    allow = ["-allow", "s3://%s/" % stores.victim]
    server = servers(HOSTS[0], server_base, args=tls_server_args(certs) + allow, tls=client_ctx)
    proc = run_dogestry("-pullhosts", host, "s3://%s/" % stores.victim, PROD, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"Host": host, "Status": "ok", "Server": "https://%s:%d" % (HOSTS[0], PORT)}]
    assert image_id(tls_host.host, PROD) == stores.ids["victim"]
    server.stop()

    wipe(tls_host)
    impostor_ctx = tls_client_context(certs / "ca.pem", certs / "client-cert.pem", certs / "client-key.pem")
    impostor_ctx.check_hostname = False
    wrong = servers(HOSTS[0], server_base, args=tls_server_args(certs, cert="wrongname") + allow, tls=impostor_ctx)
    proc = run_dogestry("-pullhosts", host, "s3://%s/" % stores.victim, PROD, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"Host": host, "Status": "ok"}]  # pulled directly
    assert not wrong.delegated_posts() and "TLS handshake failed" in wrong.stdout
    assert image_id(tls_host.host, PROD) == stores.ids["victim"]


# === 3. denial of service ========================================================================

def hold_connections(address, n, data=b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Slow: "):
    """N connections that each sent a partial request and then go quiet."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection((address, PORT), timeout=10)
        sock.sendall(data)
        socks.append(sock)
    return socks


def timed_ping(address):
    start = time.monotonic()
    answer = call(address, "GET", "/_ping", timeout=5)
    assert answer.status == 200 and answer.body == b"OK", answer
    return time.monotonic() - start


def test_slow_connections_cannot_starve_the_server(fleet, rgw, base_env, servers):
    """400 half-sent requests: /_ping still answers within a second; with -max-connections 50 the
    longest-waiting idle connections make room, and the threads stay bounded."""
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    held = hold_connections(HOSTS[0], 400)
    try:
        assert timed_ping(HOSTS[0]) < 1.0
    finally:
        for sock in held:
            sock.close()
    small = servers(HOSTS[1], server_env(base_env, fleet[1], rgw.endpoint), args=["-max-connections", "50"])
    held = hold_connections(HOSTS[1], 120)
    try:
        assert timed_ping(HOSTS[1]) < 1.0
        deadline = time.monotonic() + 5
        while small.threads() > 50 + 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # evicted connections' threads are ending
        assert small.threads() <= 50 + 5, small.threads()
        closed = 0
        for sock in held[:70]:  # the oldest were closed to make room
            sock.settimeout(5)
            closed += read_until_closed(sock) == b""
        assert closed == 70
    finally:
        for sock in held:
            sock.close()
    assert server.proc.poll() is None and small.proc.poll() is None


def open_files_limit(soft, hard):
    """A preexec function: the child's RLIMIT_NOFILE (as `ulimit -n` sets it)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_default_connection_bound_fits_the_open_files_limit(fleet, rgw, base_env, servers):
    """Under `ulimit -n 256` 400 slow clients made every /_ping fail for 30 s: the default of 512
    connections ignored the limit.  The server now raises its soft limit to the hard one, serves
    what that leaves after its own files, and says so when it starts."""
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint), preexec=open_files_limit(64, 256))
    chosen = dogestry.server_max_connections(None, 256)
    assert 1 < chosen < 256 // 2
    assert "%d connections at most, for an open-files limit of 256" % chosen in server.stdout, server.stdout
    held = hold_connections(HOSTS[0], 400)
    try:
        for _ in range(5):
            assert timed_ping(HOSTS[0]) < 1.0
    finally:
        for sock in held:
            sock.close()
    assert "out of file descriptors" not in server.stdout


def test_max_connections_above_the_open_files_limit_is_refused_at_start(base_env):
    proc = subprocess.run([sys.executable, str(DOGESTRY), "-server", "-address", "127.0.0.1", "-port", "0",
                           "-max-connections", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=base_env, timeout=30,
                          preexec_fn=open_files_limit(256, 256))
    assert proc.returncode == 2
    one_error_line(proc, "-max-connections 300", "open-files limit of 256")


def trickle(address, head, body=b"", interval=0.5):
    """Send HEAD at once, then BODY one byte every INTERVAL seconds; return the seconds until the
    server closed the connection, or None if it never did."""
    with socket.create_connection((address, PORT), timeout=10) as sock:
        start = time.monotonic()
        try:
            sock.sendall(head)
            for byte in body:
                sock.sendall(bytes([byte]))
                if select.select([sock], [], [], interval)[0] and sock.recv(65536) == b"":
                    return time.monotonic() - start
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
    return None


def test_a_request_must_arrive_within_the_read_timeout(fleet, rgw, base_env, servers):
    """One byte every half second used to hold a connection forever (the timeout was per read)."""
    servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint), args=["-read-timeout", "2"])
    slow_head = trickle(HOSTS[0], b"", b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40)
    slow_body = trickle(HOSTS[0], b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n", b"b" * 40)
    for took in (slow_head, slow_body):
        assert took is not None and 1.5 <= took <= 5.0, (slow_head, slow_body)
    assert timed_ping(HOSTS[0]) < 1.0


def test_out_of_file_descriptors_sheds_connections_without_spinning(fleet, rgw, base_env, servers):
    """At the open-file limit accept() fails with EMFILE; the loop used to spin at 100% CPU."""
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint), args=["-max-connections", "64"],
                     preexec=open_files_limit(64, 64))  # as many connections as files: some must be shed
    held = []
    try:
        for _ in range(100):
            held.append(socket.create_connection((HOSTS[0], PORT), timeout=10))
        before, start = server.cpu_seconds(), time.monotonic()
        time.sleep(2.0)  # a spinning loop would burn these two seconds of CPU
        burnt = server.cpu_seconds() - before
        assert burnt < 0.5 * (time.monotonic() - start), burnt
        assert "out of file descriptors" in server.stdout
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not status_check(server.url):
        time.sleep(0.1)
    assert timed_ping(HOSTS[0]) < 1.0


def test_huge_and_deep_json_is_refused_without_bloating_the_server(fleet, base_env, servers, tmp_path, docker_host):
    """A 64 MiB manifest.json (RSS went to 440 MB and stayed) and 40,000 nested '[' in
    X-Registry-Auth (a RecursionError) are one clear refusal each."""
    store = tmp_path / "store"
    hexid = "ab" * 32
    (store / "repositories" / "big").mkdir(parents=True)
    (store / "repositories" / "big" / "latest").write_text(hexid)
    (store / "images" / hexid).mkdir(parents=True)
    with open(str(store / "images" / hexid / "manifest.json"), "w") as f:
        f.write('{"layers": [], "padding": "')
        f.write("x" * (64 << 20))
        f.write('"}')
    server = servers(HOSTS[0], dict(base_env, DOCKER_HOST=fleet[0].host), store=store)
    answer = pull_request(HOSTS[0], REGISTRY + "/big", auth_header({}))
    assert answer.status == 200 and "larger than 4.2MB" in answer.errors()[0]["error"], answer
    with open("/proc/%d/status" % server.proc.pid) as f:
        peak_kib = int([line for line in f if line.startswith("VmHWM:")][0].split()[1])
    assert peak_kib < 100 << 10, peak_kib
    deep = pull_request(HOSTS[0], REGISTRY + "/big", auth_header(b"[" * 40000))
    assert_json_refusal(deep, 400, "X-Registry-Auth")
    server.assert_no_traceback()


# === 4. HTTP framing (RFC 9112) ==================================================================

def test_a_body_is_never_read_as_the_next_request(fleet, rgw, base_env, servers):
    """A GET with a body that holds a whole POST: the POST used to run as a second request."""
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    smuggled = (b"POST /v1.41/images/create?fromImage=hipache&tag=latest HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 0\r\n\r\n")
    answer = raw_exchange(HOSTS[0], b"GET /_ping HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                          + smuggled)
    assert raw_status(answer) == 200 and answer.count(b"HTTP/1.1 ") == 1, answer
    assert [(m, t) for _, m, t, _ in server.access_log()][-1] == ("GET", "/_ping")
    assert not server.posts_to_create(), server.stdout


@pytest.mark.parametrize("head,status", [
    (b"POST /v1.41/images/create HTTP/1.1\r\nContent-Length: 1_0\r\n", 400),
    (b"POST /v1.41/images/create HTTP/1.1\r\nContent-Length: +10\r\n", 400),
    (b"POST /v1.41/images/create HTTP/1.1\r\nContent-Length: 10\r\nContent-Length: 10\r\n", 400),
    (b"POST /v1.41/images/create HTTP/1.1\r\nContent-Length: 10, 20\r\n", 400),
    (b"POST /v1.41/images/create HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n", 501),
    (b"POST /v1.41/images/create HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n", 501),
    (b"POST /v1.41/images/create HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
    (b"POST /v1.41/images/create HTTP/1.0\r\nTransfer-Encoding: chunked\r\n", 400),
], ids=["underscore", "plus", "duplicate", "list", "xchunked", "gzip-chunked", "te-and-cl", "te-in-1.0"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(head, status, fleet, rgw, base_env, servers):
    servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    follow_up = b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw_exchange(HOSTS[0], head + b"Host: x\r\n\r\n0123456789" + follow_up)
    assert raw_status(answer) == status, answer
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", answer)) == 1, answer  # the rest was never read as a request


@pytest.mark.parametrize("request_bytes,status", [
    (b"PUT /containers/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20) + b"a" * (64 << 10), 413),
    (b"DELETE /images/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
     400),
    (b"PATCH /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX0\r\n\r\n", 400),
], ids=["put-too-large", "chunk-size-0x", "chunk-without-crlf"])
def test_an_unread_body_closes_the_connection(request_bytes, status, fleet, rgw, base_env, servers):
    servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    with socket.create_connection((HOSTS[0], PORT), timeout=20) as sock:
        sock.sendall(request_bytes)
        answer = read_answer(sock)
        assert raw_status(answer) == status, answer
        try:
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError:
            pass
        assert b"HTTP/1.1 200" not in read_until_closed(sock)


def test_a_small_body_is_read_and_the_connection_kept(fleet, rgw, base_env, servers):
    servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    answers = raw_exchange(HOSTS[0], b"PUT /containers/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"5;ext=1\r\nabcde\r\n0\r\nX-Trailer: y\r\n\r\n"
                                     b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]
    assert statuses == [403, 200] and answers.endswith(b"OK"), answers


@pytest.mark.parametrize("line,status", [
    (b"GET /_ping\r\n\r\n", 400), (b"GET /_ping HTTP/1.2\r\n\r\n", 505), (b"GET /_ping HTTP/2.0\r\n\r\n", 505),
    (b"GET /_ping HTTP/1.0\r\n\r\n", 200),
], ids=["http-0.9", "http-1.2", "http-2.0", "http-1.0"])
def test_only_http_1_0_and_1_1_are_served(line, status, fleet, rgw, base_env, servers):
    servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    answer = raw_exchange(HOSTS[0], line)
    assert raw_status(answer) == status, answer  # a status line, never an HTTP/0.9 bare body
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert ("\r\nServer: dogestry/%s\r\n" % dogestry.__version__) in head and "Python" not in head, head


# === 5. logs and login ===========================================================================

def test_the_access_log_escapes_control_characters(fleet, rgw, base_env, servers):
    server = servers(HOSTS[0], server_env(base_env, fleet[0], rgw.endpoint))
    raw_exchange(HOSTS[0], b"GET /\x1b[2J\x1b]0;owned\x07 HTTP/1.1\r\nHost: x\r\n\r\n")
    log = server.stdout
    assert "\x1b" not in log and "\x07" not in log, repr(log)
    assert "\\x1b[2J\\x1b]0;owned\\x07" in log, log


def test_a_handler_bug_is_a_500_and_a_traceback_on_the_servers_stderr(docker_host, tmp_path, monkeypatch):
    """The real server class in this process, with a bug put into one handler on purpose."""
    def buggy(handler):
        raise TypeError("a bug put here by the test")

    monkeypatch.setattr(dogestry.ServerHandler, "_docker_pull", buggy)
    log, errors = io.StringIO(), io.StringIO()
    store = tmp_path / "store"
    store.mkdir()
    policy = dogestry.ServerPolicy(str(store), [], [], None)
    server = dogestry.http_server_class()(
        ("127.0.0.1", 0), dogestry.DockerClient(dogestry.docker_endpoint(docker_host, {}, "/x")), policy,
        lambda choice, creds: dogestry.LocalStore(choice.url), None, log, errors)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        answer = pull_request("127.0.0.1", "x", auth_header({}), port=port)
        assert_json_refusal(answer, 500, "internal error")
        assert call("127.0.0.1", "GET", "/_ping", port=port).body == b"OK"
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" in errors.getvalue() and "TypeError: a bug put here by the test" in errors.getvalue()
    assert "Traceback" not in log.getvalue()


@pytest.fixture
def login_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "DOCKER_CONFIG"}
    env["HOME"] = str(tmp_path / "home")
    return env


def test_login_writes_through_a_symlinked_config(login_env, tmp_path):
    """As the docker CLI does: the link stays, its target gets the entry."""
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "docker-config.json"
    target.write_text('{"psFormat": "x"}\n')
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "config.json").symlink_to(target)
    proc = login(dict(login_env, DOCKER_CONFIG=str(config_dir)), REGISTRY, "AK\nSK\ns3://bucket\n")
    assert proc.returncode == 0, proc.stderr
    assert (config_dir / "config.json").is_symlink()
    doc = json.loads(target.read_text())
    assert doc == {"psFormat": "x", "auths": {REGISTRY: {"auth": b64("AK:SK"), "email": "s3://bucket"}}}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in dotfiles.iterdir()) == ["docker-config.json"]


def test_concurrent_logins_lose_no_entry(login_env, tmp_path):
    config_dir = tmp_path / "cfg"
    env = dict(login_env, DOCKER_CONFIG=str(config_dir))
    procs = [subprocess.Popen([sys.executable, str(dogestry.__file__), "login", "registry-%d.example" % n],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for n in range(10)]
    for n, proc in enumerate(procs):  # all answers first, so all ten read and write at once
        proc.stdin.write(("AK%d\nSK%d\ns3://bucket-%d\n" % (n, n, n)).encode())
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(60) == 0, proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    auths = json.loads((config_dir / "config.json").read_text())["auths"]
    assert auths == {"registry-%d.example" % n: {"auth": b64("AK%d:SK%d" % (n, n)), "email": "s3://bucket-%d" % n}
                     for n in range(10)}
    assert sorted(p.name for p in config_dir.iterdir()) == ["config.json"]
