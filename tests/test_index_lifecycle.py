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
from indexkit import Pusher, age_store, artifact_keys, files, image_keys, layer, manifest_keys, sha
from realdocker import docker_cli, image_id, loopback_addresses, one_error_line, run_dogestry
from serverkit import Server
from test_gc import PausingStore, ok, s3_client, wait_until_older_than

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
MIN_GRACE = "10"
HOUR = 3600


@pytest.fixture(scope="module")
def env(base_env):
    """What dogestry runs with here: the test's dockerd, gc's shortest grace 10 s."""
    return dict(base_env, DOGESTRY_GC_MIN_GRACE=MIN_GRACE)


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


def test_gc_on_radosgw_frees_an_untagged_index_whole_and_keeps_what_another_index_names(env, rgw, bucket, tmp_path):
    """The same on radosgw, with S3's own clock: once index X's tag is gone for longer than the grace,
    gc deletes X, arm, the attestations and the referrers; amd (in index Y) and the base layer stay."""
    s3 = dict(env, AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
              AWS_ENDPOINT_URL=rgw.endpoint)
    url = "s3://%s/mp/" % bucket
    with running_server(s3, url, tmp_path):
        kit = fill(Pusher(HOSTS[0]))
    client = s3_client(rgw, bucket)

    def keys():
        return {key[len("mp/"):] for key, _ in client.list("mp/")}

    ok(s3, "rm", url, "mp/app:x")
    wait_until_older_than(client, "mp/gc/untagged/" + kit.x.hex, 11)
    before = keys()

    ok(s3, "gc", url, "--grace", "10s")

    kept = image_keys(kit.amd) | artifact_keys(kit.sig_amd) | index_parts(kit, kit.y) | {kit.base_blob}
    assert before - keys() == (index_parts(kit, kit.x) - kept) | {"gc/untagged/" + kit.x.hex}
    assert pulls_platform(s3, url, "mp/app:y", "linux/amd64", kit.amd)


# === prune, rm, protect ===========================================================================

def set_push_time(path, tag, seconds_ago):
    tag_file = path / "repositories" / "mp" / "app" / tag
    os.utime(str(tag_file), (tag_file.stat().st_atime, tag_file.stat().st_mtime - seconds_ago))


def test_prune_counts_an_index_tag_as_one_tag_and_records_it_for_gc_as_rm_does(env, store):
    """Repository mp/app holds two tags, each an index of two platforms whose images have no tags of
    their own: --keep-last 1 removes the older index tag (one tag, not its platforms), which gc keeps
    whole for the grace period and then frees as after rm; --older-than counts the newer one once."""
    path, kit = store
    age_store(path)
    set_push_time(path, "x", 60)  # x was pushed before y

    dry = ok(env, "prune", path, "--keep-last", "1", "mp/app", "--dry-run").stdout
    assert dry.splitlines() == ["would remove mp/app:x (%s)" % kit.x.hex[:12], "prune %s: would remove 1 tags" % path]
    ok(env, "prune", path, "--keep-last", "1", "mp/app")
    assert json.loads((path / "gc" / "untagged" / kit.x.hex).read_text())["tags"] == ["mp/app:x"]
    before = files(path)
    ok(env, "gc", path)
    assert files(path) == before  # untagged less than the grace ago: all of X stays
    age_store(path, prefix="gc")
    ok(env, "gc", path)
    kept = image_keys(kit.amd) | artifact_keys(kit.sig_amd) | index_parts(kit, kit.y) | {kit.base_blob}
    assert set(before) - set(files(path)) == (index_parts(kit, kit.x) - kept) | {"gc/untagged/" + kit.x.hex}

    older = ok(env, "prune", path, "--older-than", "1h", "mp/app").stdout
    assert older.splitlines() == ["removed mp/app:y (%s)" % kit.y.hex[:12], "prune %s: removed 1 tags" % path]


def test_protect_and_unprotect_an_index_tag_as_any_tag(env, store):
    """A protected index tag: rm refuses it and prune keeps it; unprotect lets prune remove it."""
    path, kit = store
    age_store(path)
    ok(env, "protect", path, "mp/app:x")
    one_error_line(run_dogestry("rm", path, "mp/app:x", env=env), "mp/app:x is protected")
    assert ok(env, "prune", path, "--older-than", "1h", "mp/app").stdout.splitlines() == [
        "removed mp/app:y (%s)" % kit.y.hex[:12], "prune %s: removed 1 tags" % path]
    ok(env, "unprotect", path, "mp/app:x")
    assert ok(env, "prune", path, "--older-than", "1h", "mp/app").stdout.splitlines()[0] == \
        "removed mp/app:x (%s)" % kit.x.hex[:12]


def test_an_immutable_index_tag_refuses_a_registry_push_of_another_index_and_takes_the_same_again(env, store, tmp_path):
    """protect --immutable of an index tag: the registry refuses another index pushed to it (403
    DENIED, nothing moved), takes the same index again, and rm needs --force."""
    path, kit = store
    ok(env, "protect", "--immutable", path, "mp/app:x")
    with running_server(env, path, tmp_path):
        pusher = Pusher(HOSTS[0])
        refused = pusher.put(kit.y.data, kit.y.media_type, "x")
        assert refused.status == 403 and refused.json()["errors"][0]["code"] == "DENIED"
        assert "immutable" in refused.json()["errors"][0]["message"]
        assert pusher.put(kit.x.data, kit.x.media_type, "x").status == 201
    assert (path / "repositories" / "mp" / "app" / "x").read_text() == "@" + kit.x.digest
    one_error_line(run_dogestry("rm", path, "mp/app:x", env=env), "protected")
    ok(env, "rm", "--force", path, "mp/app:x")
    assert not (path / "repositories" / "mp" / "app" / "x").exists()


# === list, inspect, stats =========================================================================

def test_list_shows_the_platforms_of_each_multi_platform_tag(env, store):
    """A PLATFORMS column (read from each index: one GET per index tag) when some tag has several;
    a single image's row is as before (its platform is in its config, which list does not read)."""
    path, kit = store
    lines = ok(env, "list", path).stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "PLATFORMS"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[1:]}
    assert rows == {("mp/app", "x"): ["-", "linux/amd64,linux/arm64", "(index", "%s)" % kit.x.digest[:19]],
                    ("mp/app", "y"): ["-", "linux/amd64,linux/arm/v7", "(index", "%s)" % kit.y.digest[:19]],
                    ("mp/solo", "1"): [kit.solo.config[7:19]]}
    ok(env, "rm", path, "mp/app:x", "mp/app:y")
    assert ok(env, "list", path).stdout.splitlines()[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID"]


def test_inspect_of_an_index_tag_shows_the_index_and_each_platforms_image(env, store):
    """inspect of a multi-platform tag: the index's digest, media type and tags, each platform with
    its manifest and image ID, buildx's attestations, and the index itself."""
    path, kit = store
    doc = json.loads(ok(env, "inspect", path, "mp/app:x").stdout)
    assert doc["Id"] == kit.x.digest and doc["RepoTags"] == ["mp/app:x"]
    assert doc["Format"] == dogestry.OCI_INDEX and doc["Size"] == len(kit.x.data)
    assert doc["Platforms"] == [
        {"Platform": image.platform, "Id": image.config, "Digest": image.digest, "MediaType": dogestry.OCI_MANIFEST,
         "Size": len(image.data)} for image in (kit.amd, kit.arm)]
    assert doc["Attestations"] == [{"Digest": kit.att_amd.digest, "For": kit.amd.digest},
                                   {"Digest": kit.att_arm.digest, "For": kit.arm.digest}]
    assert doc["Index"] == json.loads(kit.x.data)


def test_inspect_platform_shows_that_platforms_image_as_inspect_shows_any_image(env, store):
    """inspect --platform of a multi-platform tag: the image of that platform (its ID, config,
    layers); a platform the tag lacks is one line naming those it has."""
    path, kit = store
    doc = json.loads(ok(env, "inspect", "--platform", "linux/arm/v7", path, "mp/app:y").stdout)
    assert doc["Id"] == kit.v7.config
    assert (doc["Config"]["architecture"], doc["Config"]["variant"]) == ("arm", "v7")
    assert [layer["digest"] for layer in doc["Layers"]] == kit.v7.layers
    one_error_line(run_dogestry("inspect", "--platform", "linux/s390x", path, "mp/app:y", env=env),
                   "has no image for linux/s390x; it has linux/amd64, linux/arm/v7")


def test_stats_counts_index_tags_indexes_and_their_platforms(env, store):
    """stats counts every tag (index tags too), the indexes and the images of each platform they
    name, and the platform images' layers in the bytes without sharing."""
    path, kit = store
    stats = json.loads(ok(env, "stats", "--json", path).stdout)
    assert (stats["tags"], stats["repositories"]) == (3, 2)
    assert (stats["index_tags"], stats["indexes"], stats["platform_images"]) == (2, 2, 3)
    assert stats["platforms"] == {"linux/amd64": 1, "linux/arm/v7": 1, "linux/arm64": 1}
    sizes = {layer["digest"]: layer["size"] for image in (kit.amd, kit.arm, kit.v7, kit.solo)
             for layer in json.loads(image.data)["layers"]}
    assert stats["unshared_bytes"] == sum(sizes[d] for image in (kit.amd, kit.arm, kit.v7, kit.solo)
                                          for d in image.layers)
    table = ok(env, "stats", path).stdout
    assert "Indexes:         2 (named by 2 tags), of 3 images" in table
    assert "Platforms:       linux/amd64 1, linux/arm/v7 1, linux/arm64 1" in table


def test_list_on_s3_reads_each_index_once_and_no_image_config(env, rgw, bucket, tmp_path, fault_proxy):
    """What list costs on S3: one LIST of the tags, one GET per tag, one more GET per index tag."""
    s3 = dict(env, AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
              AWS_ENDPOINT_URL=rgw.endpoint)
    url = "s3://%s/mp/" % bucket
    with running_server(s3, url, tmp_path):
        kit = fill(Pusher(HOSTS[0]))
    proxy = fault_proxy()

    listing = ok(dict(s3, AWS_ENDPOINT_URL=proxy.url), "list", url).stdout

    assert "linux/amd64,linux/arm64" in listing
    gets = sorted(e["path"].split("/mp/", 1)[1] for e in proxy.log if e["method"] == "GET" and "/mp/" in e["path"])
    assert gets == sorted(["manifests/sha256/" + kit.x.hex, "manifests/sha256/" + kit.y.hex, "repositories/mp/app/x",
                           "repositories/mp/app/y", "repositories/mp/solo/1"])
