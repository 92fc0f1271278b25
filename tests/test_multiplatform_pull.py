"""Multi-platform tags pulled where each engine runs them: `-pullhosts` fleets of mixed hosts
(directly, and through the hosts' dogestry servers), and `docker pull` through `dogestry -server`.

A host of another architecture cannot run here, so a host of the other platform is, as the issue
allows, a real dockerd behind an engine relay: tests/faultproxy.py's FaultProxy with the rule
ReportedArch, which answers GET /version (and GET /info) with that dockerd's own answer, its Arch
(and Architecture) changed, and passes every other request through unchanged.  The dockerd keeps
a foreign image as it is, so which image a host got is read from `docker image inspect`.

The tag plat/app:1 is a two-platform buildah manifest list (this machine's platform and the other
one of amd64/arm64, each image one layer of its own), pushed by buildah into a radosgw bucket
through `dogestry -server s3://BUCKET/ -anonymous-push`; the other platform comes first in it, so
taking an index's first image is never mistaken for taking the engine's.  S3 reads are counted
with the fault_proxy fixture in front of radosgw.
"""

import collections
import http.client
import io
import json
import re
import urllib.parse
import uuid

import pytest

import dogestry
from conftest import make_bucket, skip_or_fail
from faultproxy import FaultProxy, Reply, started_servers
from multiplatform import Buildah, image_platform, platform_context
from realdocker import docker_cli, image_id, loopback_addresses, ok, run_dogestry
from serverkit import PORT, Server, assert_json_refusal, call, docker_user, wipe

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(3)   # the module's fleet (conftest `fleet`): a dockerd on each HOST:2375
TAG = "plat/app:1"
OTHER_ARCH = {"amd64": "arm64", "arm64": "amd64"}


# --- the engine relay --------------------------------------------------------------------------

class ReportedArch:
    """A FaultProxy rule: GET /version and GET /info get the upstream dockerd's own answers with
    Arch (GET /info: Architecture, uname's name) changed; everything else passes unchanged."""

    UNAME = {"amd64": "x86_64", "arm64": "aarch64"}
    ROUTE = re.compile(r"^(?:/v[0-9.]+)?/(version|info)$")

    def __init__(self, upstream, arch):
        self.upstream, self.arch = urllib.parse.urlsplit(upstream), arch

    def __call__(self, req):
        route = self.ROUTE.match(req.path)
        if req.method != "GET" or not route:
            return None
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.request("GET", req.target)
            resp = conn.getresponse()
            doc, api = json.loads(resp.read()), resp.getheader("Api-Version")
        finally:
            conn.close()
        if route.group(1) == "version":
            doc["Arch"] = self.arch
        else:
            doc["Architecture"] = self.UNAME.get(self.arch, self.arch)
        return Reply(resp.status, json.dumps(doc).encode(), dict({"Content-Type": "application/json"},
                                                                 **({"Api-Version": api} if api else {})))


@pytest.fixture
def engine_relay():
    """Factory: start(handle, arch) -> the DOCKER_HOST (tcp://ADDRESS:PORT, an address of its
    own) of the fleet host's dockerd as an engine of that architecture; all stopped after the test."""
    def make(handle, arch):
        upstream = handle.tcp.replace("tcp://", "http://")
        return FaultProxy(upstream, ReportedArch(upstream, arch), name="engine-relay",
                          address=loopback_addresses(1)[0])

    with started_servers(make) as start:
        yield lambda handle, arch: start(handle, arch).url.replace("http://", "tcp://")


def address_of(docker_host):
    return urllib.parse.urlsplit(docker_host).hostname


# --- the module's two-platform tag --------------------------------------------------------------

class Pushed:
    """The two-platform tag in the bucket: its store URL, and per platform the image ID and the
    store keys of its layer blobs."""

    def __init__(self, bucket, ids, blobs):
        self.bucket, self.ids, self.blobs = bucket, ids, blobs
        self.store = "s3://%s/" % bucket


def keys_env(base_env, rgw, endpoint=None):
    return dict(base_env, AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
                AWS_ENDPOINT_URL=endpoint or rgw.endpoint)


def s3_store(rgw, bucket):
    """The bucket as a dogestry S3Store, read with the radosgw keys."""
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint)
    return dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))


def s3_get(rgw, bucket, key):
    return s3_store(rgw, bucket).get_bytes(key)


def delegated_post(address, doc):
    return call(address, "POST", dogestry.DELEGATION_ROUTE, {"Content-Type": "application/json"},
                json.dumps(doc).encode())


@pytest.fixture(scope="module")
def arches(fleet):
    """(this machine's architecture, the other one)."""
    real = docker_cli(fleet[0].host, "version", "-f", "{{.Server.Arch}}").stdout.strip()
    if real not in OTHER_ARCH:
        skip_or_fail("these tests know amd64 and arm64 machines, not %s" % real)
    return real, OTHER_ARCH[real]


@pytest.fixture(scope="module")
def pushed(arches, rgw, base_env, tmp_path_factory):
    work = tmp_path_factory.mktemp("multiplatform-pull")
    buildah = Buildah(work / "buildah")
    token = uuid.uuid4().hex
    buildah.run("manifest", "create", "mp-pull")
    for arch in reversed(arches):  # the other platform first in the index
        context = platform_context(work / arch, "built for linux/%s, run %s\n" % (arch, token))
        buildah.build(context, "linux/" + arch, manifest="mp-pull")
    bucket = make_bucket(rgw, "dgmp-" + uuid.uuid4().hex[:12])
    address = loopback_addresses(1)[0]
    pusher = Server(address, keys_env(base_env, rgw), work, "s3://%s/" % bucket, args=["-anonymous-push"])
    try:
        pusher.wait_ready()
        buildah.push_list("mp-pull", "docker://%s:%d/%s" % (address, PORT, TAG), "--tls-verify=false")
    finally:
        pusher.stop()
    index_hex = s3_get(rgw, bucket, "repositories/plat/app/1").decode().strip()[len("@sha256:"):]
    ids, blobs = {}, {}
    for entry in json.loads(s3_get(rgw, bucket, "manifests/sha256/" + index_hex))["manifests"]:
        platform = "%s/%s" % (entry["platform"]["os"], entry["platform"]["architecture"])
        child = json.loads(s3_get(rgw, bucket, "manifests/sha256/" + entry["digest"][7:]))
        ids[platform] = child["config"]["digest"]
        blobs[platform] = ["blobs/sha256/" + layer["digest"][7:] for layer in child["layers"]]
    assert sorted(ids) == sorted("linux/" + a for a in arches)
    return Pushed(bucket, ids, blobs)


@pytest.fixture
def clean(fleet):
    """Every fleet host starts without images."""
    for handle in fleet:
        wipe(handle)


def statuses(proc):
    """The one line of stdout: the JSON status of every host."""
    assert proc.stdout.count("\n") == 1, proc.stdout
    return json.loads(proc.stdout)


def blob_gets(proxy, presigned=None):
    """Counter of blob GETs by store key (presigned: only those made with presigned URLs, or only
    those with signed headers)."""
    return collections.Counter(
        e["key"] for e in proxy.log if e["method"] == "GET" and e["key"].startswith("blobs/")
        and (presigned is None or ("X-Amz-Signature" in dict(e["query"])) == presigned))


def host_has(docker_host, pushed, platform, ref=TAG):
    """The host has `ref` as the tag's image of that platform (by ID, and by the config's architecture)."""
    assert image_id(docker_host, ref) == pushed.ids[platform], (docker_host, platform)
    assert image_platform(docker_host, ref) == platform


# --- -pullhosts, directly from the store --------------------------------------------------------

def test_a_mixed_fleet_gets_each_host_its_own_platform_reading_each_platforms_layers_once(
        fleet, arches, pushed, clean, engine_relay, fault_proxy, base_env, rgw):
    """One amd64-engine host and two hosts whose engines report the other architecture: every host
    gets its platform's image; each platform's layers are read from the store once for the fleet."""
    real, other = ("linux/" + a for a in arches)
    proxy = fault_proxy()
    hosts = [fleet[0].tcp, engine_relay(fleet[1], arches[1]), engine_relay(fleet[2], arches[1])]

    proc = ok(run_dogestry("-pullhosts", ",".join(hosts), "pull", pushed.store, TAG,
                           env=keys_env(base_env, rgw, proxy.url), timeout=240))

    assert statuses(proc) == [{"Host": hosts[0], "Status": "ok", "Platform": real},
                              {"Host": hosts[1], "Status": "ok", "Platform": other},
                              {"Host": hosts[2], "Status": "ok", "Platform": other}]
    host_has(fleet[0].host, pushed, real)
    host_has(fleet[1].host, pushed, other)
    host_has(fleet[2].host, pushed, other)
    assert blob_gets(proxy) == collections.Counter({k: 1 for k in pushed.blobs[real] + pushed.blobs[other]})
    for host, platform in zip(hosts, (real, other, other)):
        assert "%s: pulled %s for %s" % (host, TAG, platform) in proc.stderr


def test_platform_chooses_the_image_for_every_host_of_a_fleet(fleet, arches, pushed, clean, engine_relay, base_env,
                                                              rgw):
    other = "linux/" + arches[1]
    hosts = [fleet[0].tcp, engine_relay(fleet[1], arches[0])]

    proc = ok(run_dogestry("-pullhosts", ",".join(hosts), "pull", "--platform", other, pushed.store, TAG,
                           env=keys_env(base_env, rgw), timeout=240))

    assert statuses(proc) == [{"Host": h, "Status": "ok", "Platform": other} for h in hosts]
    host_has(fleet[0].host, pushed, other)
    host_has(fleet[1].host, pushed, other)


@pytest.mark.parametrize("checks", [[], ["-disable-checks"]], ids=["checked-hosts", "disable-checks"])
def test_a_host_whose_platform_the_tag_lacks_fails_alone_naming_the_platforms(checks, fleet, arches, pushed, clean,
                                                                              engine_relay, base_env, rgw):
    """The s390x host's status says why in one line; the other host gets its image.  Without the
    host check, each host's platform is read from its engine all the same."""
    real = "linux/" + arches[0]
    hosts = [fleet[0].tcp, engine_relay(fleet[1], "s390x")]

    proc = run_dogestry(*checks, "-pullhosts", ",".join(hosts), "pull", pushed.store, TAG,
                        env=keys_env(base_env, rgw), timeout=240)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    store_url = "s3://%s/" % pushed.bucket
    assert statuses(proc) == [
        {"Host": hosts[0], "Status": "ok", "Platform": real},
        {"Host": hosts[1], "Status": "failed",
         "Error": "%s in %s has no image for linux/s390x; it has linux/amd64, linux/arm64 (choose one with --platform)"
                  % (TAG, store_url)}]
    host_has(fleet[0].host, pushed, real)
    assert docker_cli(fleet[1].host, "images", "-aq").stdout.split() == []


# --- -pullhosts through the hosts' dogestry servers -------------------------------------------------

def test_servers_of_a_fleet_pull_their_own_engines_platform_or_the_one_asked(fleet, arches, pushed, clean,
                                                                              engine_relay, fault_proxy, servers,
                                                                              base_env, rgw):
    """Each server picks its engine's platform (one of them reports the other architecture) and
    reads that platform's layers itself through presigned URLs; the client reads no layer and
    reports what each host got.  --platform reaches the servers in the request."""
    real, other = ("linux/" + a for a in arches)
    proxy = fault_proxy()
    relay = engine_relay(fleet[1], arches[1])
    running = [servers(HOSTS[0], dict(base_env, DOCKER_HOST=fleet[0].host, AWS_ENDPOINT_URL=proxy.url)),
               servers(address_of(relay), dict(base_env, DOCKER_HOST=relay, AWS_ENDPOINT_URL=proxy.url))]
    hosts = [fleet[0].tcp, relay]
    env = keys_env(base_env, rgw, proxy.url)

    proc = ok(run_dogestry("-pullhosts", ",".join(hosts), "pull", pushed.store, TAG, env=env, timeout=240))

    assert statuses(proc) == [{"Host": host, "Status": "ok", "Server": server.url, "Platform": platform}
                              for host, server, platform in zip(hosts, running, (real, other))]
    assert [len(server.delegated_posts()) for server in running] == [1, 1]
    host_has(fleet[0].host, pushed, real)
    host_has(fleet[1].host, pushed, other)
    assert blob_gets(proxy, presigned=False) == collections.Counter()  # the client read no layer
    assert blob_gets(proxy, presigned=True) == collections.Counter(
        {k: 1 for k in pushed.blobs[real] + pushed.blobs[other]})

    asked = ok(run_dogestry("-pullhosts", hosts[0], "pull", "--platform", other, pushed.store, TAG, env=env,
                            timeout=240))

    assert statuses(asked) == [{"Host": hosts[0], "Status": "ok", "Server": running[0].url, "Platform": other}]
    assert len(running[0].delegated_posts()) == 2
    host_has(fleet[0].host, pushed, other)


def test_a_server_too_old_for_multi_platform_tags_gets_its_host_a_direct_pull(fleet, arches, pushed, clean, servers,
                                                                               base_env, rgw):
    """A real server of today behind a relay that answers GET /status/check as servers before
    multi-platform tags did (Dogestry-Delegation: presigned-v1 and nothing more): the client sends
    it no request it cannot take, and pulls the host's platform itself."""
    real = "linux/" + arches[0]
    server = servers(HOSTS[0], dict(base_env, DOCKER_HOST=fleet[0].host, AWS_ENDPOINT_URL=rgw.endpoint))

    def older(req):
        if req.path == "/status/check":
            return Reply(200, b"OK", {"Content-Type": "text/plain; charset=utf-8",
                                      dogestry.DELEGATION_HEADER: dogestry.DELEGATION_PROTOCOL})
        return None

    with started_servers(lambda: FaultProxy(server.url, older, address=HOSTS[0])) as start:
        relay = start()
        proc = ok(run_dogestry("-port", relay.port, "-pullhosts", fleet[0].tcp, "pull", pushed.store, TAG,
                               env=keys_env(base_env, rgw), timeout=240))
        assert [e["path"] for e in relay.log] == ["/status/check"]

    assert statuses(proc) == [{"Host": fleet[0].tcp, "Status": "ok", "Platform": real}]
    assert "too old for multi-platform tags" in proc.stderr
    assert server.delegated_posts() == []
    host_has(fleet[0].host, pushed, real)


def test_a_delegated_pull_of_a_multi_platform_tag_may_read_only_manifests_image_records_and_blobs(
        fleet, pushed, clean, servers, base_env, rgw):
    """The request names the index, and presigned URLs of the index, each platform's manifest,
    image record and layers; a URL of anything else (the tag itself), a bad index digest or a
    malformed platform is refused before the server reads anything."""
    servers(HOSTS[2], dict(base_env, DOCKER_HOST=fleet[2].host, AWS_ENDPOINT_URL=rgw.endpoint))
    store = s3_store(rgw, pushed.bucket)
    plan = json.loads(dogestry.plan_delegation(store, TAG, dogestry.Progress(io.StringIO(), quiet=True)).body)
    assert plan["index"].startswith("sha256:") and "image" not in plan and "platform" not in plan
    assert {k.split("/")[0] for k in plan["objects"]} == {"manifests", "images", "blobs"}
    tag_key = "repositories/plat/app/1"
    with_tag = dict(plan["objects"], **{tag_key: {"url": store.client.presign(tag_key, 900), "size": 72}})

    assert_json_refusal(delegated_post(HOSTS[2], dict(plan, objects=with_tag)), 403, "may only read", tag_key)
    assert_json_refusal(delegated_post(HOSTS[2], dict(plan, index="sha256:xyz")), 400, "bad index digest")
    assert_json_refusal(delegated_post(HOSTS[2], dict(plan, platform="linux//x")), 400, "invalid platform")
    assert docker_cli(fleet[2].host, "images", "-aq").stdout.split() == []


# --- docker pull through `dogestry -server` -----------------------------------------------------

NAME = "registry.example/" + TAG  # docker pull NAME: the store's tag plat/app:1


def test_docker_pull_through_the_server_gets_the_engines_platform_or_the_one_asked(fleet, arches, pushed, clean,
                                                                                   servers, base_env, rgw, tmp_path):
    real, other = ("linux/" + a for a in arches)
    servers(HOSTS[0], dict(keys_env(base_env, rgw), DOCKER_HOST=fleet[0].host), store=pushed.store)
    config = tmp_path / "docker-config"
    config.mkdir()

    default = docker_user(HOSTS[0], "pull", NAME, config_dir=config)
    assert default.returncode == 0, default.stderr
    host_has(fleet[0].host, pushed, real, NAME)

    asked = docker_user(HOSTS[0], "pull", "--platform", other, NAME, config_dir=config)
    assert asked.returncode == 0, asked.stderr
    host_has(fleet[0].host, pushed, other, NAME)

    missing = docker_user(HOSTS[0], "pull", "--platform", "linux/s390x", NAME, config_dir=config)
    assert missing.returncode != 0
    assert "has no image for linux/s390x; it has linux/amd64, linux/arm64" in missing.stderr, missing.stderr
    host_has(fleet[0].host, pushed, other, NAME)


def test_docker_pull_through_a_server_takes_its_engines_platform(fleet, arches, pushed, clean, engine_relay, servers,
                                                                base_env, rgw, tmp_path):
    """The server's engine reports the other architecture: a docker pull without --platform gets that
    image, and the server's own GET /version names that platform (what a -pullhosts client reads)."""
    relay = engine_relay(fleet[1], arches[1])
    servers(address_of(relay), dict(keys_env(base_env, rgw), DOCKER_HOST=relay), store=pushed.store)
    config = tmp_path / "docker-config"
    config.mkdir()
    version = json.loads(call(address_of(relay), "GET", "/version").body)
    assert (version["Os"], version["Arch"]) == ("linux", arches[1])

    pulled = docker_user(address_of(relay), "pull", NAME, config_dir=config)

    assert pulled.returncode == 0, pulled.stderr
    host_has(fleet[1].host, pushed, "linux/" + arches[1], NAME)


def test_a_bad_platform_in_a_docker_pull_is_a_400_with_one_message(fleet, pushed, clean, servers, base_env, rgw):
    servers(HOSTS[2], dict(keys_env(base_env, rgw), DOCKER_HOST=fleet[2].host), store=pushed.store)

    answer = call(HOSTS[2], "POST", "/v1.41/images/create?fromImage=registry.example%2Fplat%2Fapp&tag=1"
                                    "&platform=linux%2F%2Fx")

    assert_json_refusal(answer, 400, "invalid platform 'linux//x': expected os/arch[/variant]")
    assert docker_cli(fleet[2].host, "images", "-aq").stdout.split() == []
