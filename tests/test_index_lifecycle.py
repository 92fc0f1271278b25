"""Multi-platform tags through a store's lifecycle: gc, prune, rm, protect, list, inspect, stats.

An image index and every manifest it names are one unit for gc: while a tag (or the grace period)
keeps the index, each platform's manifest, image record, config and layers stay, and so do the
index's attestation manifests and the referrers (signatures, SBOMs) of the index and of its images.
registry:2's garbage collector broke that (distribution #3004, #3178, #2914: it deleted the manifests
an index named, or their blobs, when they had no tag of their own or were pushed by digest before the
index); these are its cases.  The stores are filled through the registry API of a real
`dogestry -server` (indexkit.py); gc runs with the shortest grace tests allow and judges ages by the
store's own clock (file times moved back here; radosgw's clock waited for).
"""

import json
import os
import shutil
import threading
import types

import pytest

import dogestry
from indexkit import EMPTY, Pusher, age_store, artifact_keys, files, image_keys, layer, manifest_keys, sha
from realdocker import docker_cli, image_id, loopback_addresses, one_error_line, run_dogestry
from serverkit import Server
from test_gc import PausingStore

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
MIN_GRACE = "10"
HOUR = 3600


@pytest.fixture(scope="module")
def env(base_env):
    """What dogestry runs with here: the test's dockerd, gc's shortest grace 10 s."""
    return dict(base_env, DOGESTRY_GC_MIN_GRACE=MIN_GRACE)


def ok(env, *args):
    proc = run_dogestry(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


class running_server:
    """`dogestry -server STORE -anonymous-push` on a test address, for a with block."""

    def __init__(self, env, store, workdir):
        self.server = Server(HOSTS[0], env, workdir, store, args=["-anonymous-push"])

    def __enter__(self):
        return self.server.wait_ready()

    def __exit__(self, *exc):
        self.server.stop()
        self.server.assert_no_traceback()


def fill(pusher):
    """The store every test starts from (repository mp/app unless said):

    base: a layer under every image; amd, arm, v7: the platforms' images (base + a layer each);
    x:1 = index X of amd and arm with buildx's attestation manifest for each (att_amd, att_arm);
    y:1 = index Y of amd and v7 (amd is shared by both indexes);
    mp/solo:1 = an image (base + its own layer) pushed by tag;
    sig_x: a signature whose subject is X; sbom_arm: an SBOM of arm; sig_amd: a signature of amd.
    Each platform image and attestation is pushed by digest before its index, as buildx does."""
    kit = types.SimpleNamespace()
    base = layer({"base/lib.txt": b"shared by every platform\n" * 400})
    kit.amd = pusher.image("linux/amd64", [base, layer({"hello": b"amd64 binary\n"})])
    kit.arm = pusher.image("linux/arm64", [base, layer({"hello": b"arm64 binary\n"})])
    kit.v7 = pusher.image("linux/arm/v7", [base, layer({"hello": b"arm v7 binary\n"})])
    kit.att_amd, kit.att_arm = pusher.attestation(kit.amd), pusher.attestation(kit.arm)
    kit.x = pusher.index("x", [kit.amd, kit.arm], [kit.att_amd, kit.att_arm])
    kit.y = pusher.index("y", [kit.amd, kit.v7])
    kit.solo = pusher.image("linux/amd64", [base, layer({"solo": b"a single-platform image\n"})], "1", "mp/solo")
    kit.sig_x = pusher.artifact(kit.x, "application/vnd.example.signature")
    kit.sbom_arm = pusher.artifact(kit.arm, "application/spdx+json", b'{"spdxVersion": "SPDX-2.3"}')
    kit.sig_amd = pusher.artifact(kit.amd, "application/vnd.example.signature")
    kit.base_blob = "blobs/sha256/" + sha(base[0])[7:]
    return kit


@pytest.fixture(scope="module")
def template(env, tmp_path_factory):
    """A directory store filled once (fill), and what it holds."""
    work = tmp_path_factory.mktemp("indexes")
    store = work / "store"
    store.mkdir()
    with running_server(env, store, work):
        kit = fill(Pusher(HOSTS[0]))
    return store, kit


@pytest.fixture
def store(template, tmp_path):
    """A fresh copy of the template store (file times kept), and what it holds."""
    source, kit = template
    path = tmp_path / "store"
    shutil.copytree(str(source), str(path))
    return path, kit


def index_parts(kit, index):
    """Every key of an index: itself, its images, attestations and the referrers of all of them."""
    keys = manifest_keys(index)
    for image in index.images:
        keys |= image_keys(image)
    for attestation in index.attestations:
        keys |= artifact_keys(attestation)
    for referrer in (kit.sig_x, kit.sbom_arm, kit.sig_amd):
        if referrer.subject in [index] + index.images:
            keys |= artifact_keys(referrer)
    return keys


def pulls_platform(env, store, tag, platform, image):
    """`dogestry pull --platform` of TAG loads IMAGE into dockerd (which checks every layer's diffID)."""
    host = env["DOCKER_HOST"]
    docker_cli(host, "rmi", "-f", tag, check=False)
    ok(env, "pull", "--platform", platform, store, tag)
    return image_id(host, tag) == image.config


# === gc: an index and what it names are one unit ===================================================

def test_a_tagged_index_keeps_its_platform_images_attestations_and_referrers_however_old(env, store):
    """Nothing of a tagged index goes, though none of its images or attestations has a tag of its
    own and all are far older than the grace (registry:2's #3004): each platform still pulls."""
    path, kit = store
    age_store(path)
    before = files(path)
    assert index_parts(kit, kit.x) | index_parts(kit, kit.y) <= set(before)

    report = ok(env, "gc", path).stdout

    assert files(path) == before
    assert "deleted 0 images, 0 layer records, 0 blobs" in report
    assert pulls_platform(env, path, "mp/app:x", "linux/arm64", kit.arm)
    assert pulls_platform(env, path, "mp/app:y", "linux/arm/v7", kit.v7)


def test_rm_of_an_index_tag_keeps_all_of_it_for_the_grace_then_gc_frees_what_nothing_else_names(env, store):
    """rm of an index tag (no --platform) removes the tag and records the index as untagged: gc keeps
    the whole index for the grace period; after it, the index, its images no other index or tag names,
    its attestations and the referrers of all of them go; amd (also in index Y) with its signature, and
    the base layer (under tagged images too) stay."""
    path, kit = store
    age_store(path)
    proc = ok(env, "rm", path, "mp/app:x")
    assert "deleted mp/app:x (%s)" % kit.x.hex[:12] in proc.stderr
    assert (path / "gc" / "untagged" / kit.x.hex).exists()
    before = files(path)

    assert "deleted 0 images" in ok(env, "gc", path).stdout
    assert files(path) == before

    age_store(path, prefix="gc")
    ok(env, "gc", path)
    gone = set(before) - set(files(path))
    kept = image_keys(kit.amd) | artifact_keys(kit.sig_amd) | index_parts(kit, kit.y) | {kit.base_blob}
    assert gone == (index_parts(kit, kit.x) - kept) | {"gc/untagged/" + kit.x.hex}
    assert image_keys(kit.arm) - {kit.base_blob} <= gone and artifact_keys(kit.att_amd) <= gone
    assert pulls_platform(env, path, "mp/app:y", "linux/amd64", kit.amd)
    assert pulls_platform(env, path, "mp/solo:1", "linux/amd64", kit.solo)


def test_a_platform_image_also_tagged_alone_stays_with_its_referrers_when_its_index_goes(env, store, tmp_path):
    """arm's manifest pushed under a tag of its own too: when index X goes, arm's manifest, image and
    SBOM stay (the tag names them); X, its signature and its attestation manifests go."""
    path, kit = store
    with running_server(env, path, tmp_path):
        Pusher(HOSTS[0]).manifest(kit.arm.data, kit.arm.media_type, "arm64-only")
    ok(env, "rm", path, "mp/app:x")
    age_store(path)
    before = files(path)

    ok(env, "gc", path)

    gone = set(before) - set(files(path))
    assert image_keys(kit.arm) | artifact_keys(kit.sbom_arm) <= set(files(path))
    assert gone == manifest_keys(kit.x) | artifact_keys(kit.sig_x) | artifact_keys(kit.att_amd) | \
        artifact_keys(kit.att_arm) | {"gc/untagged/" + kit.x.hex}
    assert pulls_platform(env, path, "mp/app:arm64-only", "linux/arm64", kit.arm)


def test_platform_images_pushed_by_digest_stay_young_until_their_index_comes(env, store, tmp_path):
    """Images pushed by digest, their index not yet pushed (buildx pushes them first; registry:2's
    #2914): gc keeps them for the grace period, and the index pushed after them works."""
    path, _ = store
    with running_server(env, path, tmp_path):
        pusher = Pusher(HOSTS[0], "mp/late")
        base = layer({"base/late.txt": b"late base\n"})
        images = [pusher.image(p, [base, layer({"hello": p.encode()})]) for p in ("linux/amd64", "linux/arm64")]
        assert "deleted 0 images" in ok(env, "gc", path).stdout  # no tag reaches them: young ones stay
        pusher.index("1", images)
    age_store(path)
    ok(env, "gc", path)
    assert image_keys(images[0]) | image_keys(images[1]) <= set(files(path))
    assert pulls_platform(env, path, "mp/late:1", "linux/arm64", images[1])


def engine_pushed_index(env, store, kit, target, workdir):
    """Images amd and arm pushed into TARGET from the engine (`dogestry push`, tags mp/made:amd64 and
    mp/made:arm64), and index mp/made:1 naming the manifests the registry serves for them, pushed as
    `docker buildx imagetools create` does; returns (the index's images, as served)."""
    host = env["DOCKER_HOST"]
    for platform, image in (("linux/amd64", kit.amd), ("linux/arm64", kit.arm)):
        assert pulls_platform(env, store, "mp/app:x", platform, image)
        docker_cli(host, "tag", "mp/app:x", "mp/made:" + platform.split("/")[1])
        ok(env, "push", target, "mp/made:" + platform.split("/")[1])
    with running_server(env, target, workdir):
        pusher = Pusher(HOSTS[0], "mp/made")
        served = [pusher.fetch("amd64"), pusher.fetch("arm64")]
        served[0].platform, served[1].platform = "linux/amd64", "linux/arm64"
        pusher.index("1", served)
    return served


def test_an_index_of_images_pushed_from_engines_stores_their_manifests_and_keeps_the_images(env, store, tmp_path):
    """An index pushed through the registry naming the manifests it serves for images `dogestry push`
    stored: the index's push stores those manifests too, byte for byte (every manifest an index names
    is under manifests/), and gc keeps the images after their own tags are gone."""
    path, kit = store
    target = tmp_path / "engines"
    served = engine_pushed_index(env, path, kit, target, tmp_path)
    for manifest in served:
        assert (target / "manifests" / "sha256" / manifest.hex).read_bytes() == manifest.data
    ok(env, "rm", target, "mp/made:amd64", "mp/made:arm64")
    age_store(target)

    ok(env, "gc", target)

    assert pulls_platform(env, target, "mp/made:1", "linux/arm64", kit.arm)
    assert pulls_platform(env, target, "mp/made:1", "linux/amd64", kit.amd)


def test_gc_keeps_the_images_an_older_versions_index_names_by_the_manifests_made_from_them(env, store, tmp_path):
    """An index stored by an older version names manifests made from stored images without storing
    them: gc finds the images they are made from (reading the other images' records) and keeps them."""
    path, kit = store
    target = tmp_path / "engines"
    served = engine_pushed_index(env, path, kit, target, tmp_path)
    for manifest in served:
        (target / "manifests" / "sha256" / manifest.hex).unlink(missing_ok=True)  # as older versions left it
    ok(env, "rm", target, "mp/made:amd64", "mp/made:arm64")
    age_store(target)

    report = ok(env, "gc", target).stdout

    assert "deleted 0 images, 0 layer records, 0 blobs" in report
    for image in (kit.amd, kit.arm):
        docker_cli(env["DOCKER_HOST"], "rmi", "-f", image.config, check=False)
        ok(env, "pull", target, image.config[7:19])  # by image ID: the image is whole
        assert image_id(env["DOCKER_HOST"], image.config) == image.config


def test_an_index_pushed_while_gc_deletes_its_old_platform_images_never_names_a_deleted_one(env, store, tmp_path):
    """Platform images pushed by digest long ago, which nothing names, and a gc about to delete them;
    an index naming them pushed right then refreshes them as a push refreshes what it reuses, and
    writes again the image records gc took: the index never names a half-deleted image."""
    path, _ = store
    with running_server(env, path, tmp_path):
        pusher = Pusher(HOSTS[0], "mp/race")
        images = [pusher.image(p, [layer({"race": p.encode()})]) for p in ("linux/amd64", "linux/arm64")]
    age_store(path)
    paused = PausingStore(str(path), hold=30, in_flight=0.4 * dogestry.GC_RECHECK_WINDOW)
    progress = dogestry.Progress(open(os.devnull, "w"), quiet=True)
    gc = threading.Thread(target=dogestry.collect_garbage, args=(paused, HOUR, progress))
    gc.start()
    assert paused.rechecked.wait(30)  # gc found the images old and is about to delete them
    index = Pusher(HOSTS[0]).index_document(images)

    dogestry.Registry(paused, gc_min_grace=float(MIN_GRACE)).put_manifest(
        "mp/race", "1", dogestry.parse_pushed_manifest(index, dogestry.OCI_INDEX))
    gc.join()

    assert (path / "repositories" / "mp" / "race" / "1").read_text() == "@" + sha(index)
    assert pulls_platform(env, path, "mp/race:1", "linux/amd64", images[0])
    assert pulls_platform(env, path, "mp/race:1", "linux/arm64", images[1])
    assert paused.touched.is_set()  # the push did refresh what it found old
