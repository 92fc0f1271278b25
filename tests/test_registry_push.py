"""Pushing manifests into `dogestry -server STORE`: kept byte for byte, tags, indexes, referrers, deletes, gc.

The blobs these manifests name are stored by `dogestry push` (layers in blobs/sha256/, configs in
images/<id>/): the manifests are the spec's PUT requests (OCI Distribution Spec v1.1, "Pushing
manifests", "Listing referrers", "Deleting"), and the real docker CLI pulls what they describe.
"""

import base64
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

import dogestry
from realdocker import build_image, docker_cli, image_id, loopback_addresses, ok, random_bytes, run_dogestry, text_bytes
from serverkit import PORT, call, server_env
from test_registry import puller  # noqa: F401  (a dockerd of that module's own, pulling from the registry)

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
NAME = "dgpush/app"
EMPTY = b"{}"  # the OCI empty descriptor's blob
DOCKER_LAYER = {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "none": "application/vnd.docker.image.rootfs.diff.tar"}


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def image(docker_host, tmp_path_factory):
    """dgpush/app:1 (random data stored raw, text stored gzip), pushed to a template directory store."""
    work = tmp_path_factory.mktemp("pushimg")
    built = build_image(docker_host, NAME + ":1", [{"a.bin": random_bytes(200 << 10, 81)},
                                                  {"b.txt": text_bytes(400 << 10, 82)}], workdir=work)
    template = work / "store"
    ok(run_dogestry("push", template, NAME + ":1", env=dict(os.environ, DOCKER_HOST=docker_host)))
    record = json.loads((template / "images" / built[7:] / "manifest.json").read_text())
    return {"id": built, "template": template, "layers": record["layers"], "config_size": record["config"]["size"]}


@pytest.fixture
def store(image, tmp_path):
    """A fresh copy of the template store, with the OCI empty blob stored too."""
    path = tmp_path / "store"
    shutil.copytree(str(image["template"]), str(path))
    (path / "blobs" / "sha256" / sha(EMPTY)[7:]).write_bytes(EMPTY)
    return path


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory):
    """A -htpasswd file with the user admin (password secret) who may pull, push and delete."""
    line = ok(run_dogestry("passwd", "admin", "--push", "--delete", input="secret\n")).stdout
    path = tmp_path_factory.mktemp("users") / "htpasswd"
    path.write_text(line)
    return path


@pytest.fixture
def server(servers, base_env, puller, store, htpasswd):  # noqa: F811
    """A server for the store whose user admin may push and delete, next to the puller's dockerd."""
    return servers(HOSTS[0], server_env(base_env, puller, ""), store=store, args=["-htpasswd", htpasswd])


def docker_manifest(image, indent=3):
    """A Docker schema 2 manifest of the image, as a client would write it (not dogestry's canonical bytes)."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": dogestry.DOCKER_MANIFEST,
        "config": {"mediaType": dogestry.DOCKER_CONFIG, "size": image["config_size"], "digest": image["id"]},
        "layers": [{"mediaType": DOCKER_LAYER[l["compression"]], "size": l["size"], "digest": l["digest"]}
                   for l in image["layers"]]}, indent=indent).encode()


def artifact(subject, artifact_type="application/vnd.example.signature"):
    """An OCI artifact manifest (empty config, no layers) whose subject is SUBJECT (bytes, media type)."""
    data, media_type = subject
    return json.dumps({
        "schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(EMPTY), "size": 2},
        "layers": [], "subject": {"mediaType": media_type, "digest": sha(data), "size": len(data)},
        "annotations": {"org.example.signed-by": "ci"}}).encode()


def index_of(*manifests):
    return json.dumps({"schemaVersion": 2, "mediaType": dogestry.OCI_INDEX, "manifests": [
        {"mediaType": media_type, "digest": sha(data), "size": len(data),
         "platform": {"os": "linux", "architecture": "amd64"}} for data, media_type in manifests]}).encode()


AUTH = {"Authorization": "Basic " + base64.b64encode(b"admin:secret").decode()}


def put(reference, data, media_type, name=NAME):
    return call(HOSTS[0], "PUT", "/v2/%s/manifests/%s" % (name, reference), dict(AUTH, **{"Content-Type": media_type}),
                data)


def get(path, accept=None):
    return call(HOSTS[0], "GET", path, dict(AUTH, Accept=accept or ", ".join(dogestry.MANIFEST_TYPES)))


def delete(path):
    return call(HOSTS[0], "DELETE", path, AUTH)


def error_code(answer):
    return answer.json()["errors"][0]["code"]


def keys(store, top):
    base = Path(store) / top
    return sorted(str(p.relative_to(store)) for p in base.rglob("*") if p.is_file()) if base.exists() else []


def age(store, seconds):
    for path in Path(store).rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(str(path), (st.st_atime - seconds, st.st_mtime - seconds))


# === manifests, byte for byte ===================================================================

def test_a_pushed_manifest_is_served_as_pushed_and_docker_pulls_it_by_digest(image, store, server, puller):  # noqa: F811
    """A Docker schema 2 manifest PUT by tag (with its own white space): 201 with its digest; GET by tag
    and by digest give those very bytes; the tag file still holds the image ID (older versions pull
    the same image) and manifests/tags/ the manifest; docker pulls NAME@digest and gets the image."""
    data = docker_manifest(image)
    answer = put("pushed", data, dogestry.DOCKER_MANIFEST)
    assert answer.status == 201, answer
    digest = sha(data)
    assert answer.headers.getheader("Docker-Content-Digest") == digest
    assert answer.headers.getheader("Location") == "/v2/%s/manifests/%s" % (NAME, digest)
    for reference in ("pushed", digest):
        got = get("/v2/%s/manifests/%s" % (NAME, reference))
        assert (got.status, got.body, got.headers.getheader("Content-Type")) == (200, data, dogestry.DOCKER_MANIFEST)
        assert got.headers.getheader("Docker-Content-Digest") == digest
    assert (store / "repositories" / NAME / "pushed").read_text() == image["id"][7:]
    assert (store / "manifests" / "tags" / NAME / "pushed").read_text() == digest
    assert (store / "manifests" / "sha256" / digest[7:]).read_bytes() == data

    docker_cli(puller.host, "rmi", "-f", image["id"], check=False)
    config = puller.workdir / "docker-config"
    config.mkdir(exist_ok=True)
    docker_cli(puller.host, "--config", config, "login", "-u", "admin", "--password-stdin", "%s:%d" % (HOSTS[0], PORT),
               input="secret\n")
    docker_cli(puller.host, "--config", config, "pull", "%s:%d/%s@%s" % (HOSTS[0], PORT, NAME, digest))
    assert image_id(puller.host, "%s:%d/%s@%s" % (HOSTS[0], PORT, NAME, digest)) == image["id"]


def test_a_tag_moved_by_dogestry_push_serves_the_new_image_not_the_old_manifest(image, store, server, docker_host):
    """manifests/tags/ names the manifest a tag was pushed with only while the tag names its image: a
    `dogestry push` that moves the tag to another image gets that image's own manifest served."""
    assert put("moving", docker_manifest(image), dogestry.DOCKER_MANIFEST).status == 201
    other = build_image(docker_host, "dgpush/other:1", [{"c.txt": b"another image\n"}])
    docker_cli(docker_host, "tag", "dgpush/other:1", NAME + ":moving")
    ok(run_dogestry("push", store, NAME + ":moving", env=dict(os.environ, DOCKER_HOST=docker_host)))
    got = get("/v2/%s/manifests/moving" % NAME, dogestry.OCI_MANIFEST)
    assert got.status == 200 and json.loads(got.body)["config"]["digest"] == other


BAD = {
    # case: (content type, body maker, reference, status, code)
    "missing-layer": (dogestry.DOCKER_MANIFEST, lambda i: docker_manifest(i).replace(
        i["layers"][1]["digest"].encode(), b"sha256:" + b"e" * 64), "bad", 400, "MANIFEST_BLOB_UNKNOWN"),
    "wrong-layer-size": (dogestry.DOCKER_MANIFEST, lambda i: docker_manifest(i).replace(
        b'"size": %d' % i["layers"][1]["size"], b'"size": %d' % (i["layers"][1]["size"] + 1)), "bad", 400,
        "MANIFEST_BLOB_UNKNOWN"),
    "unknown-media-type": ("application/json", docker_manifest, "bad", 400, "MANIFEST_INVALID"),
    "media-types-disagree": (dogestry.OCI_MANIFEST, docker_manifest, "bad", 400, "MANIFEST_INVALID"),
    "not-json": (dogestry.OCI_MANIFEST, lambda i: b"{not json", "bad", 400, "MANIFEST_INVALID"),
    "wrong-shape": (dogestry.OCI_MANIFEST, lambda i: b'{"schemaVersion": 2, "config": "x", "layers": []}', "bad",
                    400, "MANIFEST_INVALID"),
    "too-large": (dogestry.OCI_MANIFEST, lambda i: b" " * (4 << 20) + b"{}", "bad", 413, "SIZE_INVALID"),
    "digest-not-its-own": (dogestry.DOCKER_MANIFEST, docker_manifest, "sha256:" + "0" * 64, 400, "DIGEST_INVALID"),
    "index-of-unknown": (dogestry.OCI_INDEX, lambda i: index_of((b"{}", dogestry.OCI_MANIFEST)), "bad", 400,
                         "MANIFEST_UNKNOWN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_manifest_that_cannot_be_stored_is_refused_and_nothing_is_written(case, image, store, server):
    """A missing or wrong-sized blob, an unknown or contradicted media type, not JSON, the wrong
    shape, over 4 MiB, pushed under a digest not its own, an index naming an unknown manifest: the
    spec's error, and no manifest, tag or record written."""
    media_type, make, reference, status, code = BAD[case]
    answer = put(reference, make(image), media_type)
    assert (answer.status, error_code(answer)) == (status, code), answer
    assert keys(store, "manifests") == []
    assert not (store / "repositories" / NAME / "bad").exists()
    assert get("/v2/").status == 200
    server.assert_no_traceback()


# === indexes, artifacts and referrers ==========================================================

def test_an_index_tag_names_the_index_and_older_readers_fail_clearly(image, store, server, docker_host):
    """An OCI index pushed by tag (its manifest pushed by digest first): the tag serves the index,
    its file holds @sha256:<index> (a version that knows only image IDs says it is not one), list
    shows it, and pull takes the index's image for the engine's platform (linux/amd64 here), or
    names the platforms the index has when --platform asks for another."""
    manifest = docker_manifest(image)
    assert put(sha(manifest), manifest, dogestry.DOCKER_MANIFEST).status == 201
    index = index_of((manifest, dogestry.DOCKER_MANIFEST))
    assert put("multi", index, dogestry.OCI_INDEX).status == 201
    got = get("/v2/%s/manifests/multi" % NAME)
    assert (got.status, got.body, got.headers.getheader("Content-Type")) == (200, index, dogestry.OCI_INDEX)
    assert (store / "repositories" / NAME / "multi").read_text() == "@" + sha(index)
    listing = ok(run_dogestry("list", store)).stdout
    assert "multi" in listing and sha(index)[:19] in listing
    env = dict(os.environ, DOCKER_HOST=docker_host)
    proc = run_dogestry("pull", store, NAME + ":multi", "--platform", "linux/arm64", env=env)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].endswith(
        "has no image for linux/arm64; it has linux/amd64 (choose one with --platform)")
    ok(run_dogestry("pull", "--platform", "linux/amd64", store, NAME + ":multi", env=env))
    assert image_id(docker_host, NAME + ":multi") == image["id"]


def test_referrers_list_the_artifacts_whose_subject_a_manifest_is(image, store, server):
    """An artifact with a subject, pushed by digest: 201 with OCI-Subject; the referrers API lists
    its descriptor (artifactType, annotations), filtered by artifactType on request."""
    manifest = docker_manifest(image)
    assert put("signed", manifest, dogestry.DOCKER_MANIFEST).status == 201
    signature = artifact((manifest, dogestry.DOCKER_MANIFEST))
    answer = put(sha(signature), signature, dogestry.OCI_MANIFEST)
    assert answer.status == 201 and answer.headers.getheader("OCI-Subject") == sha(manifest)

    listed = get("/v2/%s/referrers/%s" % (NAME, sha(manifest)))
    assert listed.status == 200 and listed.headers.getheader("Content-Type") == dogestry.OCI_INDEX
    assert listed.json()["manifests"] == [{
        "mediaType": dogestry.OCI_MANIFEST, "digest": sha(signature), "size": len(signature),
        "artifactType": "application/vnd.example.signature", "annotations": {"org.example.signed-by": "ci"}}]
    other = get("/v2/%s/referrers/%s?artifactType=application/vnd.example.sbom" % (NAME, sha(manifest)))
    assert other.json()["manifests"] == [] and other.headers.getheader("OCI-Filters-Applied") == "artifactType"
    assert get("/v2/%s/referrers/%s" % (NAME, sha(signature))).json()["manifests"] == []


# === deletes and gc =============================================================================

def test_delete_by_tag_and_by_digest_removes_tags_as_rm_does(image, store, server):
    """DELETE of a tag: 202, the tag is gone (its image recorded as untagged for gc); DELETE by
    digest removes every tag of the repository naming that manifest; the manifest stays for gc."""
    manifest = docker_manifest(image)
    for tag in ("one", "two", "three"):
        assert put(tag, manifest, dogestry.DOCKER_MANIFEST).status == 201
    assert delete("/v2/%s/manifests/one" % NAME).status == 202
    assert get("/v2/%s/manifests/one" % NAME).status == 404
    assert (store / "gc" / "untagged" / image["id"][7:]).exists()
    assert delete("/v2/%s/manifests/%s" % (NAME, sha(manifest))).status == 202
    assert sorted(p.name for p in (store / "repositories" / NAME).iterdir()) == ["1"]  # dogestry push's own tag
    assert (store / "manifests" / "sha256" / sha(manifest)[7:]).exists()
    missing = delete("/v2/%s/manifests/%s" % (NAME, sha(manifest)))
    assert (missing.status, error_code(missing)) == (404, "MANIFEST_UNKNOWN")


def test_gc_keeps_pushed_manifests_their_images_keep_and_frees_the_rest(image, store, server):
    """gc keeps a manifest pushed for an image a tag keeps, and the artifact whose subject it is;
    an index whose tag is gone goes once old; once the image's last tag goes too, everything does."""
    manifest = docker_manifest(image)
    signature = artifact((manifest, dogestry.DOCKER_MANIFEST))
    index = index_of((manifest, dogestry.DOCKER_MANIFEST))
    for reference, data, media_type in ((sha(manifest), manifest, dogestry.DOCKER_MANIFEST),
                                        (sha(signature), signature, dogestry.OCI_MANIFEST),
                                        ("multi", index, dogestry.OCI_INDEX)):
        assert put(reference, data, media_type).status == 201
    ok(run_dogestry("rm", store, NAME + ":multi"))
    age(store, 7200)
    ok(run_dogestry("gc", store))
    assert keys(store, "manifests/sha256") == ["manifests/sha256/" + sha(d)[7:] for d in sorted(
        (manifest, signature), key=lambda d: sha(d))]
    assert get("/v2/%s/referrers/%s" % (NAME, sha(manifest))).json()["manifests"][0]["digest"] == sha(signature)

    ok(run_dogestry("rm", store, NAME + ":1"))
    age(store, 7200)
    report = ok(run_dogestry("gc", store)).stdout
    assert "2 manifests" in report
    assert keys(store, "manifests") == []
    assert keys(store, "blobs") == [] and keys(store, "images") == []


def test_copy_carries_the_manifest_a_tag_was_pushed_with(image, store, server, tmp_path):
    """`dogestry copy` of an image tag pushed through the registry copies the manifest it was pushed
    with (and what it names) too: the copy's registry serves the same digest for the tag."""
    manifest = docker_manifest(image)
    assert put("pushed", manifest, dogestry.DOCKER_MANIFEST).status == 201
    dst = tmp_path / "dst"
    ok(run_dogestry("copy", store, dst, NAME + ":pushed"))
    assert (dst / "manifests" / "sha256" / sha(manifest)[7:]).read_bytes() == manifest
    assert (dst / "manifests" / "tags" / NAME / "pushed").read_text() == sha(manifest)
    assert (dst / "repositories" / NAME / "pushed").read_text() == image["id"][7:]


def test_a_manifest_push_over_an_immutable_tag_is_denied_and_the_same_image_is_fine(image, store, server):
    """An immutable tag (protect --immutable): a manifest of another image or an index pushed over it is
    403 DENIED with nothing written; a manifest of the image it names is fine."""
    ok(run_dogestry("protect", "--immutable", store, NAME + ":1"))
    manifest = docker_manifest(image)
    assert put("1", manifest, dogestry.DOCKER_MANIFEST).status == 201  # the same image, as a client pushed it
    index = index_of((manifest, dogestry.DOCKER_MANIFEST))
    answer = put("1", index, dogestry.OCI_INDEX)
    assert (answer.status, error_code(answer)) == (403, "DENIED") and "immutable" in answer.json()["errors"][0]["message"]
    assert (store / "repositories" / NAME / "1").read_text() == image["id"][7:]
    assert not (store / "manifests" / "sha256" / sha(index)[7:]).exists()
    refused = delete("/v2/%s/manifests/1" % NAME)
    assert (refused.status, error_code(refused)) == (403, "DENIED")


def test_prune_removes_old_tags_of_indexes_as_of_images(image, store, server):
    """prune --keep-last counts a tag of an index pushed through the registry like any tag of its
    repository: the older index tag goes (and the image tag pushed with dogestry push stays)."""
    manifest = docker_manifest(image)
    assert put(sha(manifest), manifest, dogestry.DOCKER_MANIFEST).status == 201
    index = index_of((manifest, dogestry.DOCKER_MANIFEST))
    assert put("multi", index, dogestry.OCI_INDEX).status == 201
    tag = store / "repositories" / NAME / "multi"
    os.utime(str(tag), (tag.stat().st_atime - 3600, tag.stat().st_mtime - 3600))  # pushed an hour ago
    report = ok(run_dogestry("prune", store, "--keep-last", "1", NAME)).stdout
    assert report.splitlines()[0] == "removed %s:multi (%s)" % (NAME, sha(index)[7:19])
    assert sorted(p.name for p in (store / "repositories" / NAME).iterdir()) == ["1"]
    assert (store / "gc" / "untagged" / sha(index)[7:]).exists()
