"""Chunked layers as every client sees them: the registry API, export, import, older dogestry.

A chunked layer (section 11: a layer of 16 MiB or more stored as chunks of its files' contents
plus a recipe) is handed out as its uncompressed tar: in manifests made from the image, its
descriptor is the diffID, the tar's size and the uncompressed media type; the registry streams
that blob itself (there is no stored object to redirect to), export writes it, and every client
the suite runs (docker, containerd, podman, skopeo) pulls the image with the image ID pushed.
An older dogestry refuses such a store's images with one line, and a pull from a store whose
chunks were deleted or changed by hand loads nothing.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket, skip_or_fail
from realdocker import (REPO_ROOT, build_image, docker_cli, image_id, image_layers, is_ci, loopback_addresses, ok,
                        one_error_line, random_bytes, remove_tree, run_dogestry, text_bytes)
from serverkit import PORT, call, docker_user, raw_exchange, raw_status, server_env
from test_chunks import tree as chunk_tree
from test_registry import puller  # noqa: F401  (a dockerd of that module's own, pulling from the registry)

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
MIB = 1 << 20
NAME, TAG = "dgchunkreg/app", "1"
IMAGE = NAME + ":" + TAG
TAR_TYPES = {dogestry.OCI_MANIFEST: "application/vnd.oci.image.layer.v1.tar",
             dogestry.DOCKER_MANIFEST: "application/vnd.docker.image.rootfs.diff.tar"}
PREVIOUS_RELEASE = "ad576fc"  # the last commit before chunked layers


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tree(edit=None):
    """~24 MiB of files, text first (so the layer's chunks are gzip'ed, but for the random ones,
    stored as they are): test_chunks.tree with its text files first."""
    return chunk_tree(edit, text_first=True, seed=400)


class Chunky:
    """The image pushed (its ID), its chunked layer's record, and the stores holding it."""

    def __init__(self, image, record, store, s3, s3_env, s3_push):
        self.image, self.record = image, record
        self.store, self.s3, self.s3_env, self.s3_push = store, s3, s3_env, s3_push

    @property
    def diff_id(self):
        return self.record["diffID"]

    def tar(self):
        """The chunked layer's uncompressed tar, assembled in this process from the directory store."""
        record = dogestry.LayerRecord.from_json(self.record)
        return b"".join(dogestry.layer_tar_chunks(dogestry.LocalStore(str(self.store)), record, lambda n: None))


@pytest.fixture(scope="module")
def chunky(docker_host, rgw, tmp_path_factory):
    """dgchunkreg/app:1: a ~24 MiB layer of files (stored chunked) and a small one on top, pushed
    to a directory store and to a radosgw bucket."""
    work = tmp_path_factory.mktemp("chunky")
    image = build_image(docker_host, IMAGE, [tree(), {"etc/app.conf": b"chunky\n"}], workdir=work)
    env = dict(os.environ, DOCKER_HOST=docker_host, AWS_ACCESS_KEY_ID=rgw.access_key,
               AWS_SECRET_ACCESS_KEY=rgw.secret_key, AWS_ENDPOINT_URL=rgw.endpoint, AWS_EC2_METADATA_DISABLED="true")
    store = work / "store"
    s3 = "s3://%s/reg/" % make_bucket(rgw, "dgchunk-" + uuid.uuid4().hex[:10])
    ok(run_dogestry("push", store, IMAGE, env=env))
    [s3_push] = json.loads(ok(run_dogestry("push", "--json", s3, IMAGE, env=env)).stdout)["images"]
    record = json.loads((store / "images" / image[7:] / "manifest.json").read_text())["layers"][0]
    assert record["compression"] == "chunked" and record["rawSize"] > 24 * MIB
    s3_env = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    return Chunky(image, record, store, s3, s3_env, s3_push)


def ref(name=IMAGE):
    return "%s:%d/%s" % (HOSTS[0], PORT, name)


def serve(servers, base_env, puller, store, *args, env=None):  # noqa: F811
    """A dogestry server on HOSTS[0]:PORT serving STORE (its Docker API loads into PULLER)."""
    env = env or {}
    return servers(HOSTS[0], dict(server_env(base_env, puller, env.get("AWS_ENDPOINT_URL", "")), **env),
                   store=store, args=args)


def forget(puller, chunky):  # noqa: F811
    """The puller's engine has no copy of the image (under any name)."""
    docker_cli(puller.host, "rmi", "-f", chunky.image, check=False)
    assert image_id(puller.host, chunky.image) is None


def engine_holds_layer(handle, diff_id):
    """Does any image of the engine hold that layer?"""
    ids = docker_cli(handle.host, "images", "-aq").stdout.split()
    return any(diff_id in image_layers(handle.host, i) for i in set(ids))


def blob_path(chunky):
    return "/v2/%s/blobs/%s" % (NAME, chunky.diff_id)


def archive_members(path):
    with tarfile.open(str(path)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def copy_store(chunky, tmp_path):
    target = tmp_path / "store"
    shutil.copytree(str(chunky.store), str(target))
    return target


def chunk_files(store):
    return sorted((Path(store) / "chunks" / "sha256").iterdir())


# === the registry API =============================================================================

@pytest.mark.parametrize("where", ["dir", "s3"])
def test_docker_pulls_a_chunked_image_through_the_registry_with_the_image_id_pushed(where, chunky, servers, base_env,
                                                                                  puller):  # noqa: F811
    """The manifest names the chunked layer as its uncompressed tar (diffID, raw size, tar media
    type, in OCI and Docker schema 2); docker pulls the image.  From S3 (blobs redirect by default)
    that blob is not redirected: the server streams it, byte for byte the diffID's tar."""
    store, env = (chunky.store, None) if where == "dir" else (chunky.s3, chunky.s3_env)
    server = serve(servers, base_env, puller, store, env=env)
    for media_type in (dogestry.OCI_MANIFEST, dogestry.DOCKER_MANIFEST):
        manifest = call(HOSTS[0], "GET", "/v2/%s/manifests/%s" % (NAME, TAG), {"Accept": media_type}).json()
        assert manifest["layers"][0] == {"mediaType": TAR_TYPES[media_type], "digest": chunky.diff_id,
                                         "size": chunky.record["rawSize"]}
    forget(puller, chunky)

    docker_cli(puller.host, "pull", ref())

    assert image_id(puller.host, ref()) == chunky.image
    blob = call(HOSTS[0], "GET", blob_path(chunky))
    assert blob.status == 200 and blob.headers.getheader("Location") is None
    assert len(blob.body) == chunky.record["rawSize"] and sha(blob.body) == chunky.diff_id
    server.assert_no_traceback()


def test_skopeo_copies_a_chunked_layer_as_the_blob_its_diffid_names(chunky, servers, base_env, puller,
                                                                    tmp_path):  # noqa: F811
    if not shutil.which("skopeo"):
        skip_or_fail("skopeo not installed (apt-get install skopeo)")
    serve(servers, base_env, puller, chunky.store)
    target = tmp_path / "copied"
    proc = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "docker://" + ref(), "dir:%s" % target],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    [layer] = [p for p in target.iterdir() if chunky.diff_id[7:] in p.name]
    assert sha(layer.read_bytes()) == chunky.diff_id
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["config"]["digest"] == chunky.image


def test_containerd_pulls_a_chunked_image(chunky, servers, base_env, puller):  # noqa: F811
    serve(servers, base_env, puller, chunky.store)
    sock = str(puller.exec_root / "containerd" / "containerd.sock")
    namespace = "dgchunk" + uuid.uuid4().hex[:6]
    ctr = ["ctr", "-a", sock, "-n", namespace, "images"]
    proc = subprocess.run(ctr + ["pull", "--plain-http", "--snapshotter", "native", ref()], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stdout
        listing = subprocess.run(ctr + ["ls"], stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
        digest = call(HOSTS[0], "HEAD", "/v2/%s/manifests/%s" % (NAME, TAG),
                      {"Accept": dogestry.OCI_MANIFEST}).headers.getheader("Docker-Content-Digest")
        assert digest in listing, listing
    finally:
        subprocess.run(ctr + ["rm", ref()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_podman_pulls_a_chunked_image(chunky, servers, base_env, puller):  # noqa: F811
    if not shutil.which("podman"):
        skip_or_fail("podman not installed (apt-get install podman)")
    serve(servers, base_env, puller, chunky.store)
    work = tempfile.mkdtemp(prefix="dgcp", dir="/tmp")  # podman wants a short runroot
    base = ["podman", "--storage-driver", "vfs", "--root", work + "/root", "--runroot", work + "/run"]
    try:
        pulled = subprocess.run(base + ["pull", "--tls-verify=false", ref()], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        assert pulled.returncode == 0, pulled.stderr
        found = subprocess.run(base + ["image", "inspect", "--format", "{{.Id}}", ref()],
                               stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
        assert "sha256:" + found == chunky.image
    finally:
        subprocess.run(base + ["system", "reset", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        remove_tree(work)


def test_head_and_ranges_of_a_chunked_layer_are_those_of_its_tar(chunky, servers, base_env, puller):  # noqa: F811
    serve(servers, base_env, puller, chunky.store)
    tar, size = chunky.tar(), chunky.record["rawSize"]
    head = call(HOSTS[0], "HEAD", blob_path(chunky))
    assert head.status == 200 and head.body == b""
    assert int(head.headers.getheader("Content-Length")) == size
    assert head.headers.getheader("Docker-Content-Digest") == chunky.diff_id
    for first, last in ((0, 99), (100, 3 * MIB), (size // 2, size // 2 + 5 * MIB), (size - 1000, size - 1)):
        part = call(HOSTS[0], "GET", blob_path(chunky), {"Range": "bytes=%d-%d" % (first, last)})
        assert part.status == 206 and part.body == tar[first:last + 1], (first, last)
        assert part.headers.getheader("Content-Range") == "bytes %d-%d/%d" % (first, last, size)
    tail = call(HOSTS[0], "GET", blob_path(chunky), {"Range": "bytes=-10"})
    assert tail.status == 206 and tail.body == tar[-10:]
    beyond = call(HOSTS[0], "GET", blob_path(chunky), {"Range": "bytes=%d-" % size})
    assert beyond.status == 416


def test_a_range_of_a_chunked_layer_reads_only_the_chunks_it_takes_bytes_from(chunky, servers, base_env, puller,
                                                                              fault_proxy):  # noqa: F811
    """100 bytes of a file's content: one chunk read (two if they straddle a cut); a tar header
    (the metadata is in the recipe): none."""
    proxy = fault_proxy()
    serve(servers, base_env, puller, chunky.s3, env=dict(chunky.s3_env, AWS_ENDPOINT_URL=proxy.url))
    tar = chunky.tar()
    header = tar.index(b"app/zbin/b20")  # a tar header's name field (at its start)
    for first, most in ((header + 512 + 100000, 2), (header, 0)):
        before = len(proxy.log)

        part = call(HOSTS[0], "GET", blob_path(chunky), {"Range": "bytes=%d-%d" % (first, first + 99)})

        assert part.status == 206 and part.body == tar[first:first + 100]
        chunk_reads = [e for e in proxy.log[before:] if e["method"] == "GET" and "/chunks/sha256/" in e["path"]]
        assert (1 if most else 0) <= len(chunk_reads) <= most, chunk_reads


def test_a_changed_chunk_cuts_the_blob_short(chunky, servers, base_env, puller, tmp_path):  # noqa: F811
    """The tar is checked against the diffID as it streams: the client gets a truncated body."""
    store = copy_store(chunky, tmp_path)
    raw = [p for p in chunk_files(store) if p.read_bytes()[:2] != b"\x1f\x8b"][0]  # stored as it is
    data = bytearray(raw.read_bytes())
    data[len(data) // 2] ^= 0xFF
    raw.write_bytes(bytes(data))
    server = serve(servers, base_env, puller, store)

    answer = raw_exchange(HOSTS[0], b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % blob_path(chunky).encode(), timeout=120)

    assert raw_status(answer) == 200
    assert len(answer.split(b"\r\n\r\n", 1)[1]) < chunky.record["rawSize"]
    server.assert_no_traceback()


def test_a_chunked_layers_diffid_is_mounted_into_another_repository(chunky, servers, base_env, puller):  # noqa: F811
    """The store has that blob (GET assembles it), and a pushed manifest may name it: 201, as for
    any stored blob, so docker pushing the image under another name sends nothing."""
    serve(servers, base_env, puller, chunky.store, "-anonymous-push")
    mount = call(HOSTS[0], "POST", "/v2/other/app/blobs/uploads/?mount=%s&from=%s" % (chunky.diff_id, NAME))
    assert mount.status == 201, mount
    assert mount.headers.getheader("Docker-Content-Digest") == chunky.diff_id


def test_the_accelerator_docker_api_pulls_a_chunked_image(chunky, servers, base_env, puller, tmp_path):  # noqa: F811
    serve(servers, base_env, puller, chunky.store)
    forget(puller, chunky)
    config = tmp_path / "cfg"
    config.mkdir()

    proc = docker_user(HOSTS[0], "pull", IMAGE, config_dir=config)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert image_id(puller.host, IMAGE) == chunky.image


# === export and import ============================================================================

def test_export_writes_a_chunked_layer_as_its_uncompressed_tar_that_docker_loads(chunky, puller, tmp_path):  # noqa: F811
    archive = tmp_path / "app.tar"
    ok(run_dogestry("export", chunky.store, IMAGE, "-o", archive))
    layer = archive_members(archive)["%s/layer.tar" % chunky.diff_id[7:]]
    assert sha(layer) == chunky.diff_id
    forget(puller, chunky)

    docker_cli(puller.host, "load", "-i", archive)

    assert image_id(puller.host, IMAGE) == chunky.image


def test_export_oci_gives_a_chunked_layer_the_registrys_descriptor_and_skopeo_reads_it(chunky, tmp_path):
    if not shutil.which("skopeo"):
        skip_or_fail("skopeo not installed (apt-get install skopeo)")
    archive = tmp_path / "app.tar"
    ok(run_dogestry("export", chunky.store, IMAGE, "--format", "oci", "-o", archive))
    files = archive_members(archive)
    assert sha(files["blobs/sha256/" + chunky.diff_id[7:]]) == chunky.diff_id
    [entry] = json.loads(files["index.json"])["manifests"]
    manifest = json.loads(files["blobs/sha256/" + entry["digest"][7:]])
    assert manifest["layers"][0] == {"mediaType": TAR_TYPES[dogestry.OCI_MANIFEST], "digest": chunky.diff_id,
                                     "size": chunky.record["rawSize"]}

    proc = subprocess.run(["skopeo", "inspect", "oci-archive:%s:%s" % (archive, IMAGE)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    inspected = json.loads(proc.stdout)
    assert inspected["Layers"][0] == chunky.diff_id and inspected["Digest"] == entry["digest"]


def test_import_stores_a_big_layer_chunked_and_a_rebuild_uploads_about_one_chunk(chunky, docker_host, puller,
                                                                                tmp_path):  # noqa: F811
    """A docker save is imported as push would store it: the big layer as chunks.  The archive of
    the image rebuilt with one file edited uploads the chunk that changed, not the layer."""
    edited = build_image(docker_host, "dgchunkreg/app:2", [tree(edit="app/doc/t07.txt"),
                                                           {"etc/app.conf": b"chunky\n"}], workdir=tmp_path)
    store = tmp_path / "store"
    for tag in ("1", "2"):
        docker_cli(docker_host, "save", "-o", tmp_path / (tag + ".tar"), "%s:%s" % (NAME, tag))

    first = json.loads(ok(run_dogestry("import", "--json", store, tmp_path / "1.tar")).stdout)
    record = json.loads((store / "images" / chunky.image[7:] / "manifest.json").read_text())["layers"][0]
    assert record["compression"] == "chunked" and record["diffID"] == chunky.diff_id
    assert first["chunks_sent"] == len(chunk_files(store)) >= 12
    second = json.loads(ok(run_dogestry("import", "--json", store, tmp_path / "2.tar")).stdout)

    assert 1 <= second["chunks_sent"] <= 2 and second["chunks_skipped"] >= 10
    assert second["bytes_sent"] < 3 * MIB
    docker_cli(puller.host, "rmi", "-f", edited, check=False)
    ok(run_dogestry("pull", store, "dgchunkreg/app:2", env=dict(os.environ, DOCKER_HOST=puller.host)))
    assert image_id(puller.host, "dgchunkreg/app:2") == edited


def test_a_multi_platform_archive_keeps_its_big_raw_layers_as_the_archive_has_them(base_env, tmp_path):
    """Its manifests name the raw blobs: a layer of 16 MiB or more (chunked as it is read) is
    made again from its chunks and stored under the archive's digest."""
    from test_multiplatform_archives import Layout, tag_content
    layout = Layout()
    images = [layout.image(p, text_bytes(17 * MIB, 60 + i), raw=True) for i, p in enumerate(("linux/amd64",
                                                                                              "linux/arm64"))]
    archive = layout.write(tmp_path / "raw.tar", images)
    layers = [json.loads(layout.files["blobs/sha256/" + d["digest"][7:]])["layers"][0]["digest"] for d in images]
    store = tmp_path / "store"

    ok(run_dogestry("import", store, archive, env=base_env))

    for layer in layers:
        assert sha((store / "blobs" / "sha256" / layer[7:]).read_bytes()) == layer
    assert tag_content(store) == "@" + json.loads(archive_members(archive)["index.json"])["manifests"][0]["digest"]


def test_a_multi_platform_tag_of_a_chunked_image_names_its_tar_and_serves_and_exports_it(chunky, docker_host, servers,
                                                                                         base_env, puller,
                                                                                         tmp_path):  # noqa: F811
    """push --multi-platform stores the image's manifest (as the registry makes it) in an index:
    docker pulls the tag through the registry, and export --format oci writes the layer's tar
    under the digest that stored manifest names."""
    store = tmp_path / "store"
    ok(run_dogestry("push", "--multi-platform", store, IMAGE, env=dict(os.environ, DOCKER_HOST=docker_host)))
    serve(servers, base_env, puller, store)
    forget(puller, chunky)

    docker_cli(puller.host, "pull", ref())

    assert image_id(puller.host, ref()) == chunky.image
    archive = tmp_path / "app.tar"
    ok(run_dogestry("export", store, IMAGE, "--format", "oci", "-o", archive))
    files = archive_members(archive)
    assert sha(files["blobs/sha256/" + chunky.diff_id[7:]]) == chunky.diff_id
    [entry] = json.loads(files["index.json"])["manifests"]
    index = json.loads(files["blobs/sha256/" + entry["digest"][7:]])
    [child] = [json.loads(files["blobs/sha256/" + m["digest"][7:]]) for m in index["manifests"]]
    assert child["layers"][0]["digest"] == chunky.diff_id


# === older dogestry, and a store changed by hand ====================================================

@pytest.fixture
def old_dogestry(tmp_path):
    """The previous release's dogestry.py (from the repository's history: CI's clone is a full one)."""
    found = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", PREVIOUS_RELEASE + "^{commit}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if found.returncode != 0:
        if not is_ci() and not (REPO_ROOT / ".git").exists():
            pytest.skip("not a git checkout: the previous release's code is not at hand")
        pytest.fail("commit %s is not in %s's history (a shallow clone?): %s"
                    % (PREVIOUS_RELEASE, REPO_ROOT, found.stderr.strip()), pytrace=False)
    source = subprocess.run(["git", "-C", str(REPO_ROOT), "show", PREVIOUS_RELEASE + ":dogestry.py"],
                            stdout=subprocess.PIPE, check=True).stdout
    path = tmp_path / "old_dogestry.py"
    path.write_bytes(source)
    return path


def run_old(path, *args, env=None):
    return subprocess.run([shutil.which("python3") or "python3", str(path)] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=300)


def test_the_previous_release_refuses_a_chunked_image_with_one_line_and_loads_nothing(chunky, old_dogestry, puller,
                                                                                      tmp_path):  # noqa: F811
    """Its layer records' shape check names the chunked record's compression as unknown: pull,
    export and inspect stop there, before any layer is read."""
    env = dict(os.environ, DOCKER_HOST=puller.host)
    forget(puller, chunky)
    output = tmp_path / "out.tar"
    for args in (("pull", chunky.store, IMAGE), ("export", chunky.store, IMAGE, "-o", output),
                 ("inspect", chunky.store, IMAGE)):
        one_error_line(run_old(old_dogestry, *args, env=env), "manifest.json: layers[0]: compression is not gzip or "
                                                               "zstd or none")
    assert image_id(puller.host, IMAGE) is None and image_id(puller.host, chunky.image) is None
    assert not engine_holds_layer(puller, chunky.diff_id)
    assert not output.exists()


@pytest.mark.parametrize("change,needle", [("deleted", "missing"), ("packed", "corrupt"),
                                           ("stored as it is", "do not make it")])
def test_a_pull_with_a_chunk_deleted_or_changed_by_hand_is_one_line_and_loads_nothing(change, needle, chunky, puller,
                                                                                      tmp_path):  # noqa: F811
    """A chunk deleted, or a byte of one changed (a gzip'ed one fails to unpack, one stored as
    it is no longer makes the diffID's tar): nothing is loaded or tagged."""
    store = copy_store(chunky, tmp_path)
    files = chunk_files(store)
    packed = [p for p in files if p.read_bytes()[:2] == b"\x1f\x8b"]
    as_is = [p for p in files if p not in packed]
    victim = (as_is if change == "stored as it is" else packed)[0]
    if change == "deleted":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    forget(puller, chunky)

    proc = run_dogestry("pull", store, IMAGE, env=dict(os.environ, DOCKER_HOST=puller.host))

    one_error_line(proc, needle, chunky.diff_id)
    assert image_id(puller.host, IMAGE) is None and image_id(puller.host, chunky.image) is None
    assert not engine_holds_layer(puller, chunky.diff_id)


def test_a_chunked_push_to_radosgw_pulls_back_the_same_image(chunky, puller):  # noqa: F811
    assert chunky.s3_push["chunks_sent"] >= 12
    forget(puller, chunky)
    env = dict(os.environ, DOCKER_HOST=puller.host, AWS_EC2_METADATA_DISABLED="true", **chunky.s3_env)

    ok(run_dogestry("pull", chunky.s3, IMAGE, env=env))

    assert image_id(puller.host, IMAGE) == chunky.image
