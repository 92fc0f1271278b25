"""Chunked layers pushed back through the registry API, kept by gc and carried by copy.

A chunked layer reaches clients as its uncompressed tar (digest = diffID, size = rawSize).  A
client that pulled such an image from `dogestry -server STORE` and pushes it again (docker
push of a tag moved to another name, docker push of an image built on top of it, skopeo copy
between repositories of the server) finds that blob there and pushes a manifest naming it: the
manifest is kept byte for byte, the image record it makes holds the stored chunked layer, gc
keeps that layer while a manifest names it, and copy carries such manifests.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import dogestry
from conftest import skip_or_fail
from realdocker import build_image, docker_cli, image_id, loopback_addresses, ok, one_error_line, run_dogestry
from serverkit import PORT, call, server_env
from test_chunks_clients import MIB, tree
from test_registry import puller  # noqa: F401  (a dockerd of that module's own, pulling from the registry)

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
NAME = "dgchunkpush/app"
IMAGE = NAME + ":1"
EMPTY = b"{}"  # the OCI empty descriptor's blob
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Chunky:
    """The image (its ID, config bytes and stored layer records) in a template directory store."""

    def __init__(self, image, config, layers, template):
        self.image, self.config, self.layers, self.template = image, config, layers, template

    @property
    def record(self):
        """The chunked layer's record."""
        return self.layers[0]

    @property
    def diff_id(self):
        return self.record["diffID"]


@pytest.fixture(scope="module")
def chunky(docker_host, tmp_path_factory):
    """dgchunkpush/app:1: a ~24 MiB layer of files (stored chunked) and a small one on top, pushed
    to a template directory store (tests serve copies of it)."""
    work = tmp_path_factory.mktemp("chunkpush")
    image = build_image(docker_host, IMAGE, [tree(), {"etc/app.conf": b"chunky push\n"}], workdir=work)
    template = work / "store"
    ok(run_dogestry("push", template, IMAGE, env=dict(os.environ, DOCKER_HOST=docker_host)))
    (template / "blobs" / "sha256" / sha(EMPTY)[7:]).write_bytes(EMPTY)
    record = json.loads((template / "images" / image[7:] / "manifest.json").read_text())
    assert record["layers"][0]["compression"] == "chunked" and record["layers"][0]["rawSize"] > 24 * MIB
    config = (template / "images" / image[7:] / "config.json").read_bytes()
    return Chunky(image, config, record["layers"], template)


@pytest.fixture
def store(chunky, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(str(chunky.template), str(path))
    return path


def serve(servers, base_env, puller, store):  # noqa: F811
    """A dogestry server on HOSTS[0]:PORT serving STORE, taking anonymous pushes."""
    return servers(HOSTS[0], server_env(base_env, puller, ""), store=store, args=["-anonymous-push"])


def ref(name):
    return "%s:%d/%s" % (HOSTS[0], PORT, name)


def manifest_of(name, tag, accept=dogestry.OCI_MANIFEST):
    answer = call(HOSTS[0], "GET", "/v2/%s/manifests/%s" % (name, tag), {"Accept": accept})
    assert answer.status == 200, answer
    return answer


def put_manifest(name, reference, data, media_type=dogestry.OCI_MANIFEST):
    return call(HOSTS[0], "PUT", "/v2/%s/manifests/%s" % (name, reference), {"Content-Type": media_type}, data)


def error_code(answer):
    return answer.json()["errors"][0]["code"]


def image_record(store, image):
    return json.loads((Path(store) / "images" / image[7:] / "manifest.json").read_text())


def forget(handle, *refs):
    """The engine has none of these images."""
    docker_cli(handle.host, "rmi", "-f", *refs, check=False)
    assert all(image_id(handle.host, r) is None for r in refs)


def skopeo():
    if not shutil.which("skopeo"):
        skip_or_fail("skopeo not installed (apt-get install skopeo)")
    return ["skopeo", "--insecure-policy"]


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)


def chunk_tar_manifest(chunky, size=None, config=None):
    """An OCI manifest (a client's bytes, not dogestry's canonical ones) of the image, naming
    the chunked layer as its uncompressed tar."""
    config = config or chunky.config
    layers = [{"mediaType": OCI_TAR, "digest": chunky.diff_id, "size": size or chunky.record["rawSize"]},
              {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": chunky.layers[1]["digest"],
               "size": chunky.layers[1]["size"]}]
    return json.dumps({"schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST, "layers": layers,
                       "config": {"mediaType": dogestry.OCI_CONFIG, "digest": sha(config), "size": len(config)}},
                      indent=2).encode()


def artifact_naming_the_tar(chunky):
    """An OCI artifact (empty config) whose one layer is the chunked layer's tar."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST, "artifactType": "application/vnd.example.tree",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(EMPTY), "size": 2},
        "layers": [{"mediaType": OCI_TAR, "digest": chunky.diff_id, "size": chunky.record["rawSize"]}]}).encode()


def age(store, seconds):
    for path in Path(store).rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(str(path), (st.st_atime - seconds, st.st_mtime - seconds))


# === pushes back through the registry API ==========================================================

def test_docker_pushes_a_pulled_chunked_image_back_under_another_name(chunky, store, servers, base_env,
                                                                     puller):  # noqa: F811
    """docker pull, tag, push: the chunked layer's tar is found on the server (mounted or HEAD),
    the manifest docker writes names it, and is kept and served byte for byte; the tag names
    the image, whose record still holds the chunked layer; docker pulls the new tag to the same ID."""
    server = serve(servers, base_env, puller, store)
    forget(puller, chunky.image)
    docker_cli(puller.host, "pull", ref(IMAGE))
    docker_cli(puller.host, "tag", ref(IMAGE), ref("dgchunkpush/other:1"))

    pushed = docker_cli(puller.host, "push", ref("dgchunkpush/other:1"), check=False)

    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert (store / "repositories" / "dgchunkpush" / "other" / "1").read_text() == chunky.image[7:]
    digest = (store / "manifests" / "tags" / "dgchunkpush" / "other" / "1").read_text()
    served = manifest_of("dgchunkpush/other", "1", ", ".join(dogestry.MANIFEST_TYPES))
    assert served.body == (store / "manifests" / "sha256" / digest[7:]).read_bytes()
    assert served.headers.getheader("Docker-Content-Digest") == digest
    assert chunky.diff_id in [layer["digest"] for layer in json.loads(served.body)["layers"]]
    assert image_record(store, chunky.image)["layers"] == chunky.layers
    forget(puller, chunky.image)
    docker_cli(puller.host, "pull", ref("dgchunkpush/other:1"))
    assert image_id(puller.host, ref("dgchunkpush/other:1")) == chunky.image
    server.assert_no_traceback()


def test_an_image_built_on_a_pulled_chunked_image_is_stored_with_that_chunked_layer(chunky, store, servers, base_env,
                                                                                   puller, tmp_path):  # noqa: F811
    """docker build FROM the pulled image, then docker push: the new image's record holds the
    stored chunked layer's record (not an unchecked one naming a blob that does not exist), so
    `dogestry pull` from the store and docker pull through the registry load it."""
    serve(servers, base_env, puller, store)
    docker_cli(puller.host, "pull", ref(IMAGE))
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "child.txt").write_text("built on a chunked layer\n")
    (context / "Dockerfile").write_text("FROM %s\nCOPY child.txt /\n" % ref(IMAGE))
    docker_cli(puller.host, "build", "-q", "-t", ref("dgchunkpush/child:1"), context)
    child = image_id(puller.host, ref("dgchunkpush/child:1"))

    pushed = docker_cli(puller.host, "push", ref("dgchunkpush/child:1"), check=False)

    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert (store / "repositories" / "dgchunkpush" / "child" / "1").read_text() == child[7:]
    layers = image_record(store, child)["layers"]
    assert layers[0] == chunky.record and len(layers) == 3  # the others: as any pushed layer, unchecked
    forget(puller, child, chunky.image)
    ok(run_dogestry("pull", store, "dgchunkpush/child:1", env=dict(os.environ, DOCKER_HOST=puller.host)))
    assert image_id(puller.host, "dgchunkpush/child:1") == child
    forget(puller, child, chunky.image)
    docker_cli(puller.host, "pull", ref("dgchunkpush/child:1"))
    assert image_id(puller.host, ref("dgchunkpush/child:1")) == child


def test_skopeo_copies_a_chunked_image_between_repositories_of_the_server(chunky, store, servers, base_env,
                                                                         puller):  # noqa: F811
    """skopeo finds every blob in the destination repository and pushes the manifest it pulled:
    the new tag serves that very manifest (same digest) and its image."""
    cmd = skopeo()
    serve(servers, base_env, puller, store)
    source = manifest_of(NAME, "1")

    proc = run(cmd + ["copy", "--src-tls-verify=false", "--dest-tls-verify=false", "docker://" + ref(IMAGE),
                      "docker://" + ref("dgchunkpush/copied:1")])

    assert proc.returncode == 0, proc.stdout
    copied = manifest_of("dgchunkpush/copied", "1")
    assert copied.body == source.body
    assert (store / "repositories" / "dgchunkpush" / "copied" / "1").read_text() == chunky.image[7:]


def test_skopeo_copies_a_multi_platform_tag_of_a_chunked_image_between_repositories(chunky, store, servers, base_env,
                                                                                   puller, docker_host):  # noqa: F811
    """An index whose image manifest names a chunked layer's tar (push --multi-platform stores the
    registry's own manifest): skopeo copy --all pushes the index and that manifest elsewhere."""
    cmd = skopeo()
    docker_cli(docker_host, "tag", IMAGE, "dgchunkpush/multi:1")
    ok(run_dogestry("push", "--multi-platform", store, "dgchunkpush/multi:1",
                    env=dict(os.environ, DOCKER_HOST=docker_host)))
    serve(servers, base_env, puller, store)
    index = manifest_of("dgchunkpush/multi", "1", dogestry.OCI_INDEX)

    proc = run(cmd + ["copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false",
                      "docker://" + ref("dgchunkpush/multi:1"), "docker://" + ref("dgchunkpush/multicopy:1")])

    assert proc.returncode == 0, proc.stdout
    assert manifest_of("dgchunkpush/multicopy", "1", dogestry.OCI_INDEX).body == index.body
    assert (store / "repositories" / "dgchunkpush" / "multicopy" / "1").read_text() == "@" + sha(index.body)


def test_a_manifest_naming_a_chunked_layers_tar_with_another_size_is_refused(chunky, store, servers, base_env,
                                                                             puller):  # noqa: F811
    """The tar's size is the layer's rawSize: another size is a blob the store does not have."""
    serve(servers, base_env, puller, store)
    good = chunk_tar_manifest(chunky)
    wrong = chunk_tar_manifest(chunky, size=chunky.record["rawSize"] + 1)

    answer = put_manifest(NAME, "wrong", wrong)

    assert (answer.status, error_code(answer)) == (400, "MANIFEST_BLOB_UNKNOWN"), answer
    assert chunky.diff_id in answer.json()["errors"][0]["message"]
    assert not (store / "repositories" / NAME / "wrong").exists()
    assert put_manifest(NAME, "right", good).status == 201
    assert manifest_of(NAME, "right").body == good


def test_a_manifest_whose_config_names_another_diffid_for_a_chunked_tar_is_refused(chunky, store, servers, base_env,
                                                                                 puller):  # noqa: F811
    """An uncompressed tar's diffID is its digest: a config saying otherwise makes no image."""
    serve(servers, base_env, puller, store)
    config = json.loads(chunky.config)
    config["rootfs"]["diff_ids"][0] = "sha256:" + "e" * 64
    data = json.dumps(config).encode()
    upload = call(HOSTS[0], "POST", "/v2/%s/blobs/uploads/?digest=%s" % (NAME, sha(data)),
                  {"Content-Type": "application/octet-stream"}, data)
    assert upload.status == 201, upload

    answer = put_manifest(NAME, "lying", chunk_tar_manifest(chunky, config=data))

    assert (answer.status, error_code(answer)) == (400, "MANIFEST_INVALID"), answer
    assert "e" * 64 in answer.json()["errors"][0]["message"]
    assert not (store / "images" / sha(data)[7:]).exists()
    assert not (store / "repositories" / NAME / "lying").exists()


# === gc ===========================================================================================

def test_gc_keeps_a_chunked_layer_a_tagged_artifact_names_and_frees_it_with_the_tag(chunky, store, servers, base_env,
                                                                                   puller):  # noqa: F811
    """An artifact naming the chunked layer's tar (no image record keeps that layer): while its
    tag stands, gc keeps the layer's index entry and recipe and the registry still serves the tar;
    once the tag goes, they go."""
    serve(servers, base_env, puller, store)
    assert put_manifest(NAME, "tree", artifact_naming_the_tar(chunky)).status == 201
    ok(run_dogestry("rm", store, IMAGE))
    age(store, 7200)
    entry = store / "layers" / (chunky.diff_id[7:] + ".json")
    recipe = store / "blobs" / "sha256" / chunky.record["digest"][7:]

    ok(run_dogestry("gc", store))

    assert entry.exists() and recipe.exists()
    assert not (store / "images" / chunky.image[7:]).exists()  # the image itself was freed
    blob = call(HOSTS[0], "GET", "/v2/%s/blobs/%s" % (NAME, chunky.diff_id), timeout=120)
    assert blob.status == 200 and sha(blob.body) == chunky.diff_id

    ok(run_dogestry("rm", store, NAME + ":tree"))
    age(store, 7200)
    ok(run_dogestry("gc", store))
    assert not entry.exists() and not recipe.exists()


# === copy =========================================================================================

def test_copy_carries_the_manifest_a_tag_was_pushed_with_that_names_a_chunked_tar(chunky, store, servers, base_env,
                                                                                 puller, docker_host,
                                                                                 tmp_path):  # noqa: F811
    """The manifest goes along where DST holds the chunked layer: DST's registry serves the same
    digest for the tag."""
    serve(servers, base_env, puller, store)
    manifest = chunk_tar_manifest(chunky)
    assert put_manifest(NAME, "pushed", manifest).status == 201
    dst = tmp_path / "dst"
    ok(run_dogestry("push", dst, IMAGE, env=dict(os.environ, DOCKER_HOST=docker_host)))

    ok(run_dogestry("copy", store, dst, NAME + ":pushed"))

    assert (dst / "manifests" / "sha256" / sha(manifest)[7:]).read_bytes() == manifest
    assert (dst / "manifests" / "tags" / NAME / "pushed").read_text() == sha(manifest)
    assert (dst / "repositories" / NAME / "pushed").read_text() == chunky.image[7:]


def test_copy_of_a_multi_platform_tag_of_a_chunked_image_tags_the_index(chunky, store, docker_host, servers, base_env,
                                                                        puller, tmp_path):  # noqa: F811
    """The index's image manifest names the chunked layer's tar, which DST holds with the image:
    the tag is copied with the index, and DST's registry serves it to docker."""
    env = dict(os.environ, DOCKER_HOST=docker_host)
    docker_cli(docker_host, "tag", IMAGE, "dgchunkpush/multi:1")
    ok(run_dogestry("push", "--multi-platform", store, "dgchunkpush/multi:1", env=env))
    dst = tmp_path / "dst"
    ok(run_dogestry("push", dst, IMAGE, env=env))

    ok(run_dogestry("copy", store, dst, "dgchunkpush/multi:1"))

    content = (store / "repositories" / "dgchunkpush" / "multi" / "1").read_text()
    assert content.startswith("@sha256:")
    assert (dst / "repositories" / "dgchunkpush" / "multi" / "1").read_text() == content
    serve(servers, base_env, puller, dst)
    forget(puller, chunky.image)
    docker_cli(puller.host, "pull", ref("dgchunkpush/multi:1"))
    assert image_id(puller.host, ref("dgchunkpush/multi:1")) == chunky.image


def test_copy_of_an_artifact_naming_a_chunked_tar_the_destination_lacks_copies_the_layer_chunked(
        chunky, store, servers, base_env, puller, tmp_path):  # noqa: F811
    """An artifact naming a chunked layer's tar alone is copied with that layer, chunked as in SRC:
    its recipe, its chunks and its index entry, then the tag."""
    serve(servers, base_env, puller, store)
    assert put_manifest(NAME, "tree", artifact_naming_the_tar(chunky)).status == 201
    dst = tmp_path / "dst"

    proc = run_dogestry("copy", store, dst, NAME + ":tree")

    assert proc.returncode == 0, proc.stderr
    assert (dst / "repositories" / NAME / "tree").exists()
    record = json.loads((dst / "layers" / (chunky.diff_id[7:] + ".json")).read_text())
    assert record["compression"] == "chunked"
    recipe = dogestry.read_recipe(dogestry.LocalStore(str(dst)), dogestry.LayerRecord.from_json(record))
    assert sorted(p.name for p in (dst / "chunks" / "sha256").iterdir()) == sorted({h for h, _ in recipe.chunks})
