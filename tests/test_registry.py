"""`dogestry -server STORE` as a read-only OCI registry, pulled from by the real clients.

docker (a dockerd of the module's own, 127.0.0.0/8 is an insecure registry by default), the
containerd that dockerd runs (`ctr images pull --plain-http`), skopeo (which verifies every
digest) and podman, against a directory store and a radosgw bucket (presigned redirects and
streaming), with gzip, uncompressed and precompressed (docker 29 style) layers and a name
three components deep.
"""

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

import dogestry
from conftest import make_bucket, skip_or_fail
from realdocker import (DockerdError, build_image, docker_cli, image_id, loopback_addresses, random_bytes, remove_tree,
                        run_dogestry, start_dockerd, text_bytes)
from serverkit import PORT, call, raw_exchange, raw_status, registry_error_code, server_env, tls_client_context
from testcerts import ca_dir, make_leaf, server_ext

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
NAMES = ("team/app:1", "team/app:2", "a/b/c/app:1")


class Pushed:
    """What the module stored: image IDs, the directory store, the S3 store URL."""

    def __init__(self, ids, store, s3, raw_store):
        self.ids, self.store, self.s3, self.raw_store = ids, store, s3, raw_store


@pytest.fixture(scope="module")
def pushed(docker_host, rgw, tmp_path_factory):
    """team/app:1 (= team/app:2) and a/b/c/app:1: random data (stored raw) and text (gzip), in a
    directory store, an uncompressed one and a bucket; other:1 precompressed, docker 29 style."""
    work = tmp_path_factory.mktemp("regbuild")
    token = uuid.uuid4().hex[:8]
    app = build_image(docker_host, NAMES[0], [{"data/random.bin": random_bytes(300 << 10, 51)},
                                              {"data/words.txt": text_bytes(2500 << 10, 52)}],
                      workdir=work, extra_lines=["LABEL token=" + token])
    for name in NAMES[1:]:
        docker_cli(docker_host, "tag", NAMES[0], name)
    env = dict(os.environ, DOCKER_HOST=docker_host, AWS_ACCESS_KEY_ID=rgw.access_key,
               AWS_SECRET_ACCESS_KEY=rgw.secret_key, AWS_ENDPOINT_URL=rgw.endpoint, AWS_EC2_METADATA_DISABLED="true")
    store, raw_store = work / "store", work / "raw"
    bucket = make_bucket(rgw, "dgreg-" + uuid.uuid4().hex[:10])
    s3 = "s3://%s/reg/" % bucket
    for target, extra in ((store, []), (raw_store, ["--compress", "none"]), (s3, [])):
        proc = run_dogestry("push", *extra, target, *NAMES, env=env)
        assert proc.returncode == 0, proc.stderr
    docker_cli(docker_host, "rmi", *NAMES)
    return Pushed({"app": app}, store, s3, raw_store)


@pytest.fixture(scope="module")
def puller(docker_host):
    """A dockerd of the module's own that pulls from the registry (and its containerd, for ctr)."""
    workdir = tempfile.mkdtemp(prefix="dgrp", dir="/tmp")
    try:
        try:
            handle = start_dockerd(workdir)
        except DockerdError as e:
            skip_or_fail("cannot start dockerd: %s" % e)
        try:
            yield handle
        finally:
            handle.stop()
    finally:
        remove_tree(workdir)


def registry(servers, base_env, puller, store, *args, **kw):
    """A dogestry server on HOSTS[0]:PORT serving STORE (and its Docker API next to PULLER)."""
    return servers(HOSTS[0], dict(server_env(base_env, puller, kw.pop("endpoint", "")), **kw.pop("env", {})),
                   store=store, args=args, **kw)


def s3_env(rgw):
    return {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key,
            "AWS_ENDPOINT_URL": rgw.endpoint}


def ref(name):
    return "%s:%d/%s" % (HOSTS[0], PORT, name)


def forget(puller, *refs):
    docker_cli(puller.host, "rmi", "-f", *refs, check=False)


def head_digest(name, tag):
    answer = call(HOSTS[0], "HEAD", "/v2/%s/manifests/%s" % (name, tag),
                  {"Accept": dogestry.OCI_MANIFEST + ", " + dogestry.DOCKER_MANIFEST})
    assert answer.status == 200, answer
    return answer.headers.getheader("Docker-Content-Digest")


# === the manifest is a pure function of the stored image =======================================

def test_manifest_bytes_are_pinned():
    """The same stored image has the same manifest digest in every version of dogestry."""
    image = dogestry.StoredImage("sha256:" + "a" * 64, [
        dogestry.LayerRecord("sha256:" + "1" * 64, "sha256:" + "2" * 64, 1234, "gzip", 4321, (1000, 234)),
        dogestry.LayerRecord("sha256:" + "3" * 64, "sha256:" + "3" * 64, 99, "none"),
        dogestry.LayerRecord("sha256:" + "4" * 64, "sha256:" + "5" * 64, 7, "zstd")], [], 555)
    oci = dogestry.registry_manifest(image, dogestry.OCI_MANIFEST)
    assert oci == (b'{"config":{"digest":"sha256:' + b"a" * 64 + b'","mediaType":"application/vnd.oci.image.config.v1'
                   b'+json","size":555},"layers":[{"digest":"sha256:' + b"2" * 64 + b'","mediaType":"application/vnd.o'
                   b'ci.image.layer.v1.tar+gzip","size":1234},{"digest":"sha256:' + b"3" * 64 + b'","mediaType":"appl'
                   b'ication/vnd.oci.image.layer.v1.tar","size":99},{"digest":"sha256:' + b"5" * 64 + b'","mediaType":'
                   b'"application/vnd.oci.image.layer.v1.tar+zstd","size":7}],"mediaType":"application/vnd.oci.image'
                   b'.manifest.v1+json","schemaVersion":2}')
    assert hashlib.sha256(oci).hexdigest() == "ab0faf358e232ef7d4099ae6f0b4f7cabd4e220cd7b5044c916b18608e397462"
    docker = dogestry.registry_manifest(image, dogestry.DOCKER_MANIFEST)
    assert json.loads(docker)["config"]["mediaType"] == dogestry.DOCKER_CONFIG
    assert [l["mediaType"] for l in json.loads(docker)["layers"]][0] == "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize("accept,served", [
    ("", dogestry.OCI_MANIFEST), ("*/*", dogestry.OCI_MANIFEST),
    (dogestry.DOCKER_MANIFEST, dogestry.DOCKER_MANIFEST),
    ("%s, %s" % (dogestry.DOCKER_MANIFEST, dogestry.OCI_MANIFEST), dogestry.OCI_MANIFEST),
    ("%s;q=0.5, application/vnd.docker.distribution.manifest.list.v2+json" % dogestry.DOCKER_MANIFEST,
     dogestry.DOCKER_MANIFEST),
])
def test_accept_chooses_the_manifest(accept, served):
    assert dogestry.manifest_type_for(accept) == served


# === real clients =====================================================================================

@pytest.fixture(params=["dir", "s3", "s3-streamed"])
def served(request, pushed, servers, base_env, puller, rgw):
    """The module's images served from a directory, from S3 by redirect, and from S3 streamed."""
    if request.param == "dir":
        return registry(servers, base_env, puller, pushed.store)
    extra = ["-redirect=false"] if request.param == "s3-streamed" else []
    return registry(servers, base_env, puller, pushed.s3, *extra, env=s3_env(rgw))


def test_docker_pulls_by_tag_and_by_digest(served, pushed, puller):
    forget(puller, ref(NAMES[0]), ref(NAMES[2]))
    for name in (NAMES[0], NAMES[2]):
        proc = docker_cli(puller.host, "pull", ref(name))
        assert proc.returncode == 0
        assert image_id(puller.host, ref(name)) == pushed.ids["app"]  # the image ID survives
    digest = head_digest("team/app", "1")
    forget(puller, ref(NAMES[0]), ref(NAMES[2]))
    by_digest = ref("team/app@" + digest)
    docker_cli(puller.host, "pull", by_digest)
    assert image_id(puller.host, by_digest) == pushed.ids["app"]
    forget(puller, by_digest)
    served.assert_no_traceback()


def test_containerd_pulls(served, pushed, puller):
    sock = str(puller.exec_root / "containerd" / "containerd.sock")
    namespace = "dgreg" + uuid.uuid4().hex[:6]
    proc = subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "pull", "--plain-http", "--snapshotter",
                           "native", ref(NAMES[2])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    listing = subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "ls"], stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout
    assert head_digest("a/b/c/app", "1") in listing, listing
    subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "rm", ref(NAMES[2])], stdout=subprocess.DEVNULL)


def test_skopeo_inspects_and_copies_verifying_every_digest(served, pushed, tmp_path):
    if not shutil.which("skopeo"):
        skip_or_fail("skopeo not installed (apt-get install skopeo)")
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "docker://" + ref(NAMES[0])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    doc = json.loads(inspect.stdout)
    assert doc["Digest"] == head_digest("team/app", "1") and sorted(doc["RepoTags"]) == ["1", "2"]
    copy = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "docker://" + ref(NAMES[0]),
                           "oci:%s:app" % (tmp_path / "oci")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    assert copy.returncode == 0, copy.stdout
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    manifest = json.loads((tmp_path / "oci" / "blobs" / "sha256" /
                           index["manifests"][0]["digest"][7:]).read_text())
    assert manifest["config"]["digest"] == pushed.ids["app"]


def test_podman_pulls(served, pushed):
    if not shutil.which("podman"):
        skip_or_fail("podman not installed (apt-get install podman)")
    work = tempfile.mkdtemp(prefix="dgpp", dir="/tmp")  # podman wants a short runroot
    base = ["podman", "--storage-driver", "vfs", "--root", work + "/root", "--runroot", work + "/run"]
    try:
        pulled = subprocess.run(base + ["pull", "--tls-verify=false", ref(NAMES[2])], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        assert pulled.returncode == 0, pulled.stderr
        found = subprocess.run(base + ["image", "inspect", "--format", "{{.Id}}", ref(NAMES[2])],
                               stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
        assert "sha256:" + found == pushed.ids["app"]
    finally:
        subprocess.run(base + ["system", "reset", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        remove_tree(work)


def test_uncompressed_and_precompressed_layers(pushed, servers, base_env, puller, docker_host, tmp_path):
    """Raw layers are served as tar, and docker 29's compressed blobs as they were exported."""
    from test_save_formats import SaveFromFile, oci_save, read_tar, write_tar
    raw = registry(servers, base_env, puller, pushed.raw_store)
    forget(puller, ref(NAMES[0]))
    docker_cli(puller.host, "pull", ref(NAMES[0]))
    assert image_id(puller.host, ref(NAMES[0])) == pushed.ids["app"]
    manifest = json.loads(call(HOSTS[0], "GET", "/v2/team/app/manifests/1").body)
    assert {l["mediaType"] for l in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar"}

    # docker 29: a save whose layers are gzip blobs, stored as they are
    docker_cli(puller.host, "tag", ref(NAMES[0]), "other:1")
    saved = tmp_path / "v1.tar"
    docker_cli(puller.host, "save", "-o", str(saved), "other:1")
    files, blobs = oci_save(read_tar(saved), compress_layers=True)
    write_tar(tmp_path / "oci.tar", files)
    precompressed = tmp_path / "docker29"
    client = SaveFromFile(dogestry.docker_endpoint(puller.host, {}, "/"), tmp_path / "oci.tar")
    dogestry.push_image(client, dogestry.LocalStore(str(precompressed)), "other:1",
                        dogestry.Progress(io.StringIO(), quiet=True), dogestry.PushOptions())
    forget(puller, "other:1", ref(NAMES[0]))
    raw.stop()
    registry(servers, base_env, puller, precompressed)
    docker_cli(puller.host, "pull", ref("other:1"))
    assert image_id(puller.host, ref("other:1")) == pushed.ids["app"]
    manifest = json.loads(call(HOSTS[0], "GET", "/v2/other/manifests/1").body)
    assert [l["digest"] for l in manifest["layers"]] == ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    forget(puller, ref("other:1"))


# === the API itself ==================================================================================

def v2(path, headers=None, method="GET"):
    answer = call(HOSTS[0], method, path, headers)
    assert answer.headers.getheader("Docker-Distribution-API-Version") == "registry/2.0", answer
    return answer


error_code = registry_error_code


def test_a_server_without_a_store_says_the_registry_needs_one(servers, base_env, puller):
    servers(HOSTS[0], server_env(base_env, puller, ""))
    answer = v2("/v2/")
    assert answer.status == 404 and error_code(answer) == "UNSUPPORTED"
    assert "dogestry -server STORE" in answer.json()["errors"][0]["message"]


def test_tags_and_catalog_page_with_links(pushed, servers, base_env, puller):
    registry(servers, base_env, puller, pushed.store)
    base = v2("/v2/")
    assert (base.status, base.body) == (200, b"{}\n")
    assert v2("/v2/_catalog").json() == {"repositories": ["a/b/c/app", "team/app"]}
    first = v2("/v2/_catalog?n=1")
    assert first.json() == {"repositories": ["a/b/c/app"]}
    link = first.headers.getheader("Link")
    assert link == '</v2/_catalog?n=1&last=a%2Fb%2Fc%2Fapp>; rel="next"', link
    second = v2(link[1:link.index(">")])
    assert second.json() == {"repositories": ["team/app"]} and second.headers.getheader("Link") is None
    assert v2("/v2/team/app/tags/list").json() == {"name": "team/app", "tags": ["1", "2"]}
    paged = v2("/v2/team/app/tags/list?n=1")
    assert paged.json()["tags"] == ["1"] and "last=1" in paged.headers.getheader("Link")
    assert v2("/v2/team/app/tags/list?n=1&last=1").json()["tags"] == ["2"]
    assert v2("/v2/team/app/tags/list?n=0").json()["tags"] == []
    unknown = v2("/v2/no/such/tags/list")
    assert unknown.status == 404 and error_code(unknown) == "NAME_UNKNOWN"


def test_manifests_and_blobs_over_http(pushed, servers, base_env, puller):
    registry(servers, base_env, puller, pushed.store)
    accept = {"Accept": dogestry.OCI_MANIFEST}
    got = v2("/v2/team/app/manifests/1", accept)
    assert got.status == 200 and got.headers.getheader("Content-Type") == dogestry.OCI_MANIFEST
    digest = got.headers.getheader("Docker-Content-Digest")
    assert digest == "sha256:" + hashlib.sha256(got.body).hexdigest()
    assert int(got.headers.getheader("Content-Length")) == len(got.body)
    head = v2("/v2/team/app/manifests/1", accept, "HEAD")
    assert (head.status, head.body, head.headers.getheader("Docker-Content-Digest")) == (200, b"", digest)
    assert v2("/v2/team/app/manifests/" + digest).body == got.body  # by digest
    docker = v2("/v2/team/app/manifests/2", {"Accept": dogestry.DOCKER_MANIFEST})
    assert docker.headers.getheader("Content-Type") == dogestry.DOCKER_MANIFEST
    assert v2("/v2/team/app/manifests/" + docker.headers.getheader("Docker-Content-Digest")).body == docker.body

    manifest = got.json()
    config = v2("/v2/team/app/blobs/" + manifest["config"]["digest"])
    assert "sha256:" + hashlib.sha256(config.body).hexdigest() == pushed.ids["app"]  # byte for byte
    layer = manifest["layers"][1]
    blob = v2("/v2/team/app/blobs/" + layer["digest"])
    assert blob.status == 200 and len(blob.body) == layer["size"]
    assert "sha256:" + hashlib.sha256(blob.body).hexdigest() == layer["digest"]
    part = v2("/v2/team/app/blobs/" + layer["digest"], {"Range": "bytes=100-199"})
    assert part.status == 206 and part.body == blob.body[100:200]
    assert part.headers.getheader("Content-Range") == "bytes 100-199/%d" % layer["size"]
    tail = v2("/v2/team/app/blobs/" + layer["digest"], {"Range": "bytes=-10"})
    assert tail.status == 206 and tail.body == blob.body[-10:]
    beyond = v2("/v2/team/app/blobs/" + layer["digest"], {"Range": "bytes=%d-" % layer["size"]})
    assert beyond.status == 416 and error_code(beyond) == "RANGE_INVALID"


def test_s3_blobs_redirect_or_stream_verified(pushed, servers, base_env, puller, rgw, fault_proxy):
    """By default a client fetches blobs from S3 itself; with -redirect=false through the server,
    which stops short of the last bytes when a blob does not match its digest."""
    proxy = fault_proxy()
    redirecting = registry(servers, base_env, puller, pushed.s3, env=dict(s3_env(rgw), AWS_ENDPOINT_URL=proxy.url))
    layer = v2("/v2/team/app/manifests/1").json()["layers"][1]
    moved = v2("/v2/team/app/blobs/" + layer["digest"])
    assert moved.status == 307 and moved.body == b""
    location = moved.headers.getheader("Location")
    assert location.startswith(proxy.url) and "X-Amz-Signature=" in location and "X-Amz-Expires=900" in location
    assert not [e for e in proxy.log if "/blobs/" in e["path"] and e["method"] == "GET"]  # the server read none
    redirecting.stop()

    def corrupt(req):
        if req.method == "GET" and layer["digest"][7:] in req.path:
            from faultproxy import Reply
            return Reply(200, b"\0" * layer["size"])
        return None

    proxy = fault_proxy(corrupt)
    registry(servers, base_env, puller, pushed.s3, "-redirect=false",
             env=dict(s3_env(rgw), AWS_ENDPOINT_URL=proxy.url))
    answer = raw_exchange(HOSTS[0], b"GET /v2/team/app/blobs/%s HTTP/1.1\r\nHost: x\r\n\r\n" % layer["digest"].encode())
    assert raw_status(answer) == 200
    assert len(answer.split(b"\r\n\r\n", 1)[1]) < layer["size"]  # cut short: the client sees a broken body


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v2/team/app/manifests/nosuch", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/no/such/manifests/1", 404, "NAME_UNKNOWN"),
    ("GET", "/v2/team/app/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/team/app/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
    ("GET", "/v2/team/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
    ("GET", "/v2/team/app/blobs/md5:" + "0" * 32, 404, "BLOB_UNKNOWN"),
    ("GET", "/v2/Team/App/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/team/../../etc/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/team/%2e%2e/manifests/1", 400, "NAME_INVALID"),
    ("GET", "/v2/team/app/manifests/-bad", 400, "TAG_INVALID"),
    ("GET", "/v2/team/app/manifests/" + "t" * 200, 400, "TAG_INVALID"),
    ("GET", "/v2/team/app/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
    ("POST", "/v2/team/app/blobs/uploads/", 401, "UNAUTHORIZED"),  # writes need a user allowed to write
    ("PUT", "/v2/team/app/manifests/1", 401, "UNAUTHORIZED"),
    ("PATCH", "/v2/team/app/blobs/uploads/x", 401, "UNAUTHORIZED"),
    ("DELETE", "/v2/team/app/manifests/1", 401, "UNAUTHORIZED"),
    ("DELETE", "/v2/team/app/blobs/sha256:" + "0" * 64, 405, "UNSUPPORTED"),  # only gc frees blobs
    ("GET", "/v2/team/app/referrers/sha256:xyz", 400, "DIGEST_INVALID"),  # none known: 200, an empty index
])
def test_bad_requests_get_the_specs_errors(method, path, status, code, pushed, servers, base_env, puller):
    server = registry(servers, base_env, puller, pushed.store)
    answer = v2(path, {"Content-Type": "application/json"}, method) if method == "GET" else \
        call(HOSTS[0], method, path, {"Content-Type": "application/json"}, b"{}")
    assert answer.status == status and error_code(answer) == code, answer
    assert v2("/v2/").status == 200  # still serving
    server.assert_no_traceback()


def test_an_image_in_the_original_layout_says_how_to_serve_it(docker_host, servers, base_env, puller, tmp_path):
    from test_save_formats import original_layout
    build_image(docker_host, "dgreg/old:1", [{"a.txt": b"old\n"}], workdir=tmp_path)
    store = tmp_path / "legacy"
    original_layout(docker_host, "dgreg/old:1", store, "old/1")
    registry(servers, base_env, puller, store)
    answer = v2("/v2/old/manifests/1")
    assert answer.status == 404 and error_code(answer) == "MANIFEST_UNKNOWN"
    assert "original dogestry layout" in answer.json()["errors"][0]["message"]
    assert "dogestry migrate" in answer.json()["errors"][0]["message"]

    migrated = run_dogestry("migrate", "--keep-legacy", store, env=base_env)  # as the message says
    assert migrated.returncode == 0, migrated.stderr
    assert v2("/v2/old/manifests/1").status == 200
    docker_cli(docker_host, "rmi", "dgreg/old:1")


def test_htpasswd_and_docker_login(pushed, servers, base_env, puller, tmp_path):
    line = run_dogestry("passwd", "alice", input="s3cret\n", env=base_env)
    assert line.returncode == 0 and line.stdout.startswith("alice:pbkdf2_sha256$600000$"), line
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("# who may pull\n" + line.stdout)
    registry(servers, base_env, puller, pushed.store, "-htpasswd", htpasswd)
    anonymous = v2("/v2/")
    assert anonymous.status == 401 and error_code(anonymous) == "UNAUTHORIZED"
    assert anonymous.headers.getheader("WWW-Authenticate") == 'Basic realm="dogestry"'
    wrong = v2("/v2/", {"Authorization": "Basic " + base64.b64encode(b"alice:nope").decode()})
    assert wrong.status == 401
    right = v2("/v2/team/app/tags/list", {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()})
    assert right.status == 200 and right.json()["tags"] == ["1", "2"]

    config = tmp_path / "docker-config"
    config.mkdir()
    cli = ["--config", str(config)]
    denied = docker_cli(puller.host, *cli, "login", "-u", "alice", "--password-stdin", "%s:%d" % (HOSTS[0], PORT),
                        input="wrong\n", check=False)
    assert denied.returncode != 0
    logged = docker_cli(puller.host, *cli, "login", "-u", "alice", "--password-stdin", "%s:%d" % (HOSTS[0], PORT),
                        input="s3cret\n")
    assert "Login Succeeded" in logged.stdout
    forget(puller, ref(NAMES[0]))
    assert docker_cli(puller.host, "pull", ref(NAMES[0]), check=False).returncode != 0  # no login: no pull
    docker_cli(puller.host, *cli, "pull", ref(NAMES[0]))
    assert image_id(puller.host, ref(NAMES[0])) == pushed.ids["app"]
    forget(puller, ref(NAMES[0]))


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


class CountedChecks:
    """dogestry.password_matches, recording the iteration count of every hash it checks (the PBKDF2 work)."""

    def __init__(self):
        self.iterations = []

    def __call__(self, password, stored):
        self.iterations.append(dogestry.hash_iterations(stored))
        return dogestry.password_matches(password, stored)


def htpasswd_of(tmp_path, users):
    """An -htpasswd file of USERS: {user: (password, iterations)}."""
    path = tmp_path / "htpasswd"
    path.write_text("".join("%s:%s\n" % (user, dogestry.password_hash(password, iterations=iterations))
                            for user, (password, iterations) in users.items()))
    return str(path)


def test_an_unknown_user_costs_the_same_password_check_as_a_known_one(tmp_path):
    """Unknown users were refused in 1 ms, known ones after 150-200 ms of PBKDF2: the answer time
    told which users exist.  Now an unknown user's password is checked too, against a hash of the
    iterations most users have; a password remembered as right is not checked again."""
    checks = CountedChecks()
    users = {"alice": ("a", 1000), "bob": ("b", 1000), "carol": ("c", 2000)}
    htpasswd = dogestry.Htpasswd(htpasswd_of(tmp_path, users), matches=checks)
    assert not htpasswd.allows(basic("alice", "wrong"), "10.0.0.1")
    assert not htpasswd.allows(basic("mallory", "guess"), "10.0.0.2")
    assert checks.iterations == [1000, 1000]
    assert htpasswd.allows(basic("carol", "c"), "10.0.0.3") and htpasswd.allows(basic("carol", "c"), "10.0.0.3")
    assert checks.iterations == [1000, 1000, 2000]  # the second time, remembered


def test_an_address_runs_out_of_password_checks_and_gets_them_back_with_time(tmp_path):
    """16 wrong passwords at once cost ~3 s of CPU each; now an address may check AUTH_FAILURES in a
    row, then one more every AUTH_FAILURE_REFILL seconds, and is answered 429 meanwhile without any
    work.  Right passwords cost an address nothing, and other addresses are not held back."""
    now = [0.0]
    checks = CountedChecks()
    users = {"user%d" % n: ("pw%d" % n, 1000) for n in range(dogestry.AUTH_FAILURES + 1)}
    users["alice"] = ("a", 1000)
    htpasswd = dogestry.Htpasswd(htpasswd_of(tmp_path, users), clock=lambda: now[0], matches=checks)
    for _ in range(dogestry.AUTH_FAILURES):
        assert not htpasswd.allows(basic("alice", "wrong"), "10.0.0.1")
    for user in ("alice", "nobody"):
        with pytest.raises(dogestry.RegistryError) as refused:
            htpasswd.allows(basic(user, "wrong"), "10.0.0.1")
        assert (refused.value.status, refused.value.code) == (429, "TOOMANYREQUESTS")
        assert refused.value.headers == {"Retry-After": "%d" % (dogestry.AUTH_FAILURE_REFILL + 1)}
    assert len(checks.iterations) == dogestry.AUTH_FAILURES

    assert htpasswd.allows(basic("alice", "a"), "10.0.0.2")  # another address
    assert htpasswd.allows(basic("alice", "a"), "10.0.0.1")  # remembered as right: passes even here
    for n in range(dogestry.AUTH_FAILURES + 1):  # more right passwords than an address may check wrong ones
        assert htpasswd.allows(basic("user%d" % n, "pw%d" % n), "10.0.0.3")
    for _ in range(dogestry.AUTH_FAILURES):  # and they took none of its checks
        assert not htpasswd.allows(basic("alice", "wrong"), "10.0.0.3")
    assert len(checks.iterations) == 3 * dogestry.AUTH_FAILURES + 2

    now[0] += dogestry.AUTH_FAILURE_REFILL
    assert not htpasswd.allows(basic("alice", "wrong"), "10.0.0.1")  # one more check, then none
    with pytest.raises(dogestry.RegistryError):
        htpasswd.allows(basic("alice", "wrong"), "10.0.0.1")


def test_the_failures_of_only_so_many_addresses_are_remembered():
    limiter = dogestry.FailureLimiter(lambda: 0.0, burst=1, refill=60.0, most=2)
    assert limiter.reserve("10.0.0.1") == 0.0 and limiter.reserve("10.0.0.1") == 60.0
    assert limiter.reserve("10.0.0.2") == 0.0 and limiter.reserve("10.0.0.3") == 0.0
    assert limiter.reserve("10.0.0.1") == 0.0  # forgotten: the least recent of three


@pytest.mark.parametrize("count", ["\u00b2", "6" * 5000, "-1", "0"], ids=["superscript-two", "5000-digits", "negative",
                                                                          "zero"])
def test_a_hash_with_a_strange_iteration_count_matches_nothing(count):
    """'²' passed str.isdigit() and then made int() raise: a traceback at every login."""
    stored = dogestry.password_hash("pw", iterations=1000).replace("$1000$", "$%s$" % count)
    assert dogestry.password_matches("pw", stored) is False


def test_wrong_passwords_from_one_address_get_429_at_once(pushed, servers, base_env, puller, tmp_path):
    """16 wrong passwords in parallel from one address: AUTH_FAILURES are checked (401), the rest are
    answered 429 without the work; a right password from another address still gets in."""
    attacker, user = loopback_addresses(2)
    path = htpasswd_of(tmp_path, {"alice": ("s3cret", dogestry.PBKDF2_ITERATIONS)})
    registry(servers, base_env, puller, pushed.store, "-htpasswd", path)
    started = time.monotonic()
    with dogestry.thread_pool(16, "test-logins") as pool:
        answers = list(pool.map(lambda n: call(HOSTS[0], "GET", "/v2/", {"Authorization": basic("alice", "no%d" % n)},
                                               source=attacker), range(16)))
    refills = (time.monotonic() - started) / dogestry.AUTH_FAILURE_REFILL
    statuses = sorted(a.status for a in answers)
    assert dogestry.AUTH_FAILURES <= statuses.count(401) <= dogestry.AUTH_FAILURES + refills + 1, statuses
    throttled = [a for a in answers if a.status == 429]
    assert throttled and statuses.count(401) + len(throttled) == 16, statuses
    assert {error_code(a) for a in throttled} == {"TOOMANYREQUESTS"}
    assert all(int(a.headers.getheader("Retry-After")) >= 1 for a in throttled)
    right = call(HOSTS[0], "GET", "/v2/team/app/tags/list", {"Authorization": basic("alice", "s3cret")}, source=user)
    assert right.status == 200 and right.json()["tags"] == ["1", "2"]


def test_numbers_no_int_can_hold_are_refused_or_read_as_huge(pushed, servers, base_env, puller):
    """?n=² (a Unicode digit), ?n= of 5,000 digits and a Range of 5,000 digits were 500s with a
    traceback (str.isdigit takes '²'; int() refuses more than 4,300 digits)."""
    registry(servers, base_env, puller, pushed.store)
    for path in ("/v2/_catalog?n=%C2%B2", "/v2/team/app/tags/list?n=%C2%B2", "/v2/_catalog?n=%D9%A3"):
        answer = v2(path)
        assert answer.status == 400 and error_code(answer) == "PAGINATION_NUMBER_INVALID", (path, answer)
    huge = "9" * 5000
    assert v2("/v2/_catalog?n=" + huge).json() == {"repositories": ["a/b/c/app", "team/app"]}
    assert v2("/v2/team/app/tags/list?n=000" + huge).json()["tags"] == ["1", "2"]

    layer = v2("/v2/team/app/manifests/1").json()["layers"][1]
    path = "/v2/team/app/blobs/" + layer["digest"]
    whole = v2(path).body
    for wanted in ("bytes=0-" + huge, "bytes=-" + huge):
        part = v2(path, {"Range": wanted})
        assert part.status == 206 and part.body == whole, wanted[:20]
        assert part.headers.getheader("Content-Range") == "bytes 0-%d/%d" % (len(whole) - 1, len(whole))
    beyond = v2(path, {"Range": "bytes=%s-" % huge})
    assert beyond.status == 416 and error_code(beyond) == "RANGE_INVALID"


def test_https_with_a_test_ca(pushed, servers, base_env, puller, tmp_path_factory):
    d = ca_dir(tmp_path_factory, "regtls")
    make_leaf(d, "ca", "server", "/CN=%s" % HOSTS[0], server_ext("IP:%s" % HOSTS[0]))
    certs = d / "clients"
    certs.mkdir()
    shutil.copyfile(str(d / "ca.pem"), str(certs / "ca.crt"))
    registry(servers, base_env, puller, pushed.store, "-tls", "-tlscert", d / "server-cert.pem",
             "-tlskey", d / "server-key.pem", tls=tls_client_context(d / "ca.pem"))
    proc = subprocess.run(["skopeo", "inspect", "--cert-dir", str(certs), "docker://" + ref(NAMES[0])],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["Digest"].startswith("sha256:")
    untrusted = subprocess.run(["skopeo", "inspect", "docker://" + ref(NAMES[0])], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr


# === what a request may cost the server and the store ===============================================
#
# The registry is anonymous unless -htpasswd: a request must not cost the server files, or the store
# work, that grow with what the store holds or with the requests before.  A counting proxy
# (FaultProxy) in front of radosgw sees every S3 request the server sends.

def open_files(server):
    return len(os.listdir("/proc/%d/fd" % server.proc.pid))


def test_a_registry_client_leaves_no_s3_connection_open_behind(pushed, servers, base_env, puller, rgw):
    """Each connection's thread opened an S3 connection of its own, which stayed open after the
    thread ended: one file descriptor lost per client connection, until the server ran out."""
    server = registry(servers, base_env, puller, pushed.s3, env=s3_env(rgw))
    assert v2("/v2/team/app/manifests/1").status == 200
    baseline = open_files(server)
    for _ in range(40):  # each on a connection (and a server thread) of its own
        assert v2("/v2/team/app/manifests/1").status == 200
    deadline = time.monotonic() + 10
    while open_files(server) > baseline + 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # the threads of the last connections are ending
    assert open_files(server) <= baseline + 3, (baseline, open_files(server))


def bucket_store(rgw, bucket):
    """BUCKET as a dogestry store, read and written with the test user's keys straight at radosgw."""
    config = dogestry.AwsConfig({"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}, "/x")
    location = dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint)
    return dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))


def store_image(store, n):
    """Store image N (one small layer) as push writes it; return its hex and its OCI manifest's digest."""
    layer = b"layer %d\n" % n
    record = dogestry.LayerRecord(dogestry.sha256_digest(layer), dogestry.sha256_digest(layer), len(layer), "none")
    store.put_bytes(dogestry.blob_key(record.digest), layer)
    config = json.dumps({"n": n, "rootfs": {"type": "layers", "diff_ids": [record.diff_id]}}).encode()
    image_id = dogestry.sha256_digest(config)
    dogestry._write_image(store, image_id, config, [record])
    manifest = dogestry.registry_manifest(dogestry.StoredImage(image_id, [record], [], len(config)),
                                          dogestry.OCI_MANIFEST)
    return image_id[7:], dogestry.sha256_digest(manifest)


def tag_images(store, name, hexes, count):
    """COUNT tags of repository NAME, t0, t1, ..., naming HEXES in turn."""
    with dogestry.thread_pool(16, "test-tags") as pool:
        list(pool.map(lambda i: dogestry.write_tag(store, dogestry.ImageRef(name, "t%d" % i), hexes[i % len(hexes)]),
                      range(count)))


def sent_to_s3(proxy, since):
    """(method, key, listed prefix or None) of each S3 request the proxy saw after the first SINCE."""
    return [(e["method"], e["key"], dict(e["query"]).get("prefix") if ("list-type", "2") in e["query"] else None)
            for e in proxy.log[since:]]


def listings(requests, prefix):
    return [r for r in requests if r[2] == prefix]


def unknown_digest():
    return "sha256:" + uuid.uuid4().hex * 2


def counted_registry(servers, base_env, puller, rgw, fault_proxy, bucket):
    """A registry serving BUCKET through a counting proxy; the proxy."""
    proxy = fault_proxy()
    registry(servers, base_env, puller, "s3://%s/" % bucket, env=dict(s3_env(rgw), AWS_ENDPOINT_URL=proxy.url))
    return proxy


def in_parallel(paths):
    """GET every path at once, each on its own connection; the answers in order."""
    with dogestry.thread_pool(len(paths), "test-clients") as pool:
        return list(pool.map(lambda path: call(HOSTS[0], "GET", path), paths))


def test_unknown_digests_cost_one_listing_of_images_whatever_the_tags(servers, base_env, puller, rgw, fault_proxy):
    """Each unknown digest used to read every tag of the repository, then every image: with 2,000
    tags, 12.5 s per request for 8 in parallel.  Now a digest costs one read of the manifest it may
    be (pushed through the registry), concurrent lookups share one listing of images/ and read each
    image's manifest once; a repeated unknown digest costs nothing; an image pushed while the
    server runs is found by its digest."""
    bucket = make_bucket(rgw, "dgcost-" + uuid.uuid4().hex[:10])
    store = bucket_store(rgw, bucket)
    hexes = [store_image(store, n)[0] for n in range(4)]
    tag_images(store, "team/app", hexes, 300)
    proxy = counted_registry(servers, base_env, puller, rgw, fault_proxy, bucket)

    before = len(proxy.log)
    digests = [unknown_digest() for _ in range(16)]
    answers = in_parallel(["/v2/team/app/manifests/" + digest for digest in digests])
    assert {(a.status, error_code(a)) for a in answers} == {(404, "MANIFEST_UNKNOWN")}
    sent = sent_to_s3(proxy, before)
    assert listings(sent, "images/") == [("GET", "", "images/")], sent
    assert sorted(key for method, key, listed in sent if listed is None) == sorted(
        ["images/%s/manifest.json" % h for h in hexes] +  # each image's manifest, once
        ["manifests/sha256/%s" % d[7:] for d in digests])  # and the manifest each digest might name

    before = len(proxy.log)
    again = v2("/v2/team/app/manifests/" + digests[0])
    another = unknown_digest()
    other = v2("/v2/other/name/manifests/" + another)
    assert (again.status, other.status) == (404, 404)
    assert sent_to_s3(proxy, before) == [("GET", "manifests/sha256/" + another[7:], None)]

    new_hex, new_digest = store_image(store, 99)  # pushed while the server runs, not tagged
    deadline = time.monotonic() + 4 * dogestry.REGISTRY_LISTING_TTL
    found = v2("/v2/anything/manifests/" + new_digest)
    while found.status == 404 and time.monotonic() < deadline:
        time.sleep(0.2)
        found = v2("/v2/anything/manifests/" + new_digest)
    assert found.status == 200 and "sha256:" + hashlib.sha256(found.body).hexdigest() == new_digest
    assert found.json()["config"]["digest"] == "sha256:" + new_hex
    sent = sent_to_s3(proxy, before)
    assert ("GET", "images/%s/manifest.json" % new_hex, None) in sent
    assert not [r for r in sent if r[1].startswith("repositories/") or r[2] not in (None, "images/")], sent


def test_a_digest_is_checked_against_the_store_each_time_it_is_served(servers, base_env, puller, rgw, fault_proxy):
    """A digest once found was served from memory forever, even after gc deleted its image; now each
    answer reads the image's manifest.json (one request, no listing)."""
    bucket = make_bucket(rgw, "dggone-" + uuid.uuid4().hex[:10])
    store = bucket_store(rgw, bucket)
    image_hex, digest = store_image(store, 1)
    tag_images(store, "team/app", [image_hex], 1)
    proxy = counted_registry(servers, base_env, puller, rgw, fault_proxy, bucket)
    assert v2("/v2/team/app/manifests/t0").headers.getheader("Docker-Content-Digest") == digest

    before = len(proxy.log)
    assert v2("/v2/team/app/manifests/" + digest).status == 200
    assert sent_to_s3(proxy, before) == [("GET", "images/%s/manifest.json" % image_hex, None)]

    store.delete(dogestry.image_key(image_hex, "manifest.json"))  # as gc does, once the tag is gone
    gone = v2("/v2/team/app/manifests/" + digest)
    assert gone.status == 404 and error_code(gone) == "MANIFEST_UNKNOWN"


def test_the_catalog_is_listed_once_for_requests_in_a_row(servers, base_env, puller, rgw, fault_proxy):
    """_catalog listed all of repositories/ for every request; now a listing answers for a few
    seconds (concurrent requests share it), and a repository pushed since shows after that."""
    bucket = make_bucket(rgw, "dgcat-" + uuid.uuid4().hex[:10])
    store = bucket_store(rgw, bucket)
    image_hex, _ = store_image(store, 1)
    tag_images(store, "team/app", [image_hex], 50)
    proxy = counted_registry(servers, base_env, puller, rgw, fault_proxy, bucket)

    before = len(proxy.log)
    answers = [v2("/v2/_catalog"), v2("/v2/_catalog?n=1")] + in_parallel(["/v2/_catalog"] * 8)
    assert {json.dumps(a.json()) for a in answers} == {'{"repositories": ["team/app"]}'}
    assert sent_to_s3(proxy, before) == [("GET", "", "repositories/")]

    tag_images(store, "team/new", [image_hex], 1)
    deadline = time.monotonic() + 4 * dogestry.REGISTRY_LISTING_TTL
    while v2("/v2/_catalog").json()["repositories"] != ["team/app", "team/new"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert v2("/v2/_catalog").json()["repositories"] == ["team/app", "team/new"]
