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
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket, skip_or_fail
from realdocker import (DockerdError, build_image, docker_cli, image_id, loopback_addresses, random_bytes, remove_tree,
                        run_dogestry, start_dockerd, text_bytes)
from serverkit import PORT, call, raw_exchange, raw_status, server_env, tls_client_context
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
