"""push builds multi-platform tags from Docker engines: `push --multi-platform` puts an engine's image
into the tag's image index as its platform's (from its config), keeping the other platforms; a plain
push replaces the tag unless the tag already holds an index, and then replaces only its own platform;
`push --single-platform` replaces the whole tag.  Hosts pushing different platforms of one tag at the
same time all end up in the index (compare-and-swap on the tag).  `rm --platform` takes one platform
out.  The images are real foreign-platform images built by buildah (FROM scratch + COPY) and loaded
into real dockerds."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import types
import uuid
from pathlib import Path

import pytest

import dogestry
from multiplatform import Buildah, image_platform, load_platform_image, platform_context
from realdocker import (DOGESTRY, docker_cli, loopback_addresses, ok, one_error_line, run_dogestry, start_dockerd,
                        stop_all)
from faultproxy import s3_error
from serverkit import PORT

pytestmark = pytest.mark.integration

IMAGES = {"amd64": "linux/amd64", "arm64": "linux/arm64", "amd64-2": "linux/amd64", "arm64-2": "linux/arm64"}
RACE_TAGS = 10


@pytest.fixture(scope="module")
def images(docker_host, tmp_path_factory):
    """Four small images in the session's dockerd, two per platform, each of its own content:
    image id by key (amd64, arm64, amd64-2, arm64-2)."""
    work = tmp_path_factory.mktemp("mpush")
    buildah = Buildah(work / "buildah")
    token = uuid.uuid4().hex[:8]
    ids = {}
    for key, platform in IMAGES.items():
        context = platform_context(work / key, "dgmp %s %s\n" % (key, token))
        ids[key] = load_platform_image(docker_host, buildah, context, platform, "dgmp/build:" + key)
        assert image_platform(docker_host, "dgmp/build:" + key) == platform  # the config says so, not only a name
    return types.SimpleNamespace(ids=ids, buildah=buildah, work=work)


@pytest.fixture(scope="module")
def arm_host(images, tmp_path_factory):
    """A second dockerd -- an arm64 'host' -- holding an arm64 image (as dgmp/build:arm64): its id."""
    try:
        handle = start_dockerd(tmp_path_factory.mktemp("armhost"))
    except dogestry.DogestryError as e:  # pragma: no cover
        pytest.skip("cannot start a second dockerd: %s" % e)
    try:
        context = platform_context(images.work / "arm-host", "the arm64 host's own image\n")
        image = load_platform_image(handle.host, images.buildah, context, "linux/arm64", "dgmp/build:arm64")
        yield types.SimpleNamespace(host=handle.host, image=image)
    finally:
        stop_all([handle])


def push(env, store, image, tag, *flags):
    """Tag IMAGE as TAG in the engine of env and push it with FLAGS."""
    docker_cli(env["DOCKER_HOST"], "tag", image, tag)
    return ok(run_dogestry("push", *flags, store, tag, env=env))


def tag_text(store, ref):
    name, tag = ref.split(":")
    return (Path(store) / "repositories" / name / tag).read_text().strip()


def index_doc(store, ref):
    """(hex, document) of the index a tag of a directory store holds."""
    text = tag_text(store, ref)
    assert text.startswith("@sha256:"), text
    data = (Path(store) / "manifests" / "sha256" / text[len("@sha256:"):]).read_bytes()
    return text[len("@sha256:"):], json.loads(data)


def entries(store, ref):
    """[(platform, image id)] of the images of a tag's index, in its order (each child manifest is
    stored byte for byte under its digest)."""
    found = []
    for descriptor in index_doc(store, ref)[1]["manifests"]:
        if descriptor.get("platform", {}).get("os") == "unknown":
            continue
        data = (Path(store) / "manifests" / "sha256" / descriptor["digest"][7:]).read_bytes()
        assert dogestry.sha256_digest(data) == descriptor["digest"] and len(data) == descriptor["size"]
        p = descriptor["platform"]
        found.append(("/".join(x for x in (p["os"], p["architecture"], p.get("variant")) if x),
                      json.loads(data)["config"]["digest"]))
    return found


def untagged(store):
    root = Path(store) / "gc" / "untagged"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- what a push makes of a tag --------------------------------------------------------------------

def test_pushes_of_two_platforms_make_one_index_that_registry_clients_and_pull_read(images, docker_env, servers,
                                                                                    docker_host, tmp_path):
    """--multi-platform from an amd64 image and then an arm64 one: the tag holds an OCI index of
    both (each image's manifest stored under its digest); skopeo reads that very index through the
    registry API, and pull --platform loads the arm64 image."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    pushed = push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")

    index_hex, doc = index_doc(store, "dgmp/app:1")
    assert doc["mediaType"] == dogestry.OCI_INDEX and doc["schemaVersion"] == 2
    assert {d["mediaType"] for d in doc["manifests"]} == {dogestry.OCI_MANIFEST}
    assert entries(store, "dgmp/app:1") == [("linux/amd64", images.ids["amd64"]), ("linux/arm64", images.ids["arm64"])]
    assert "as its linux/arm64 image (it holds linux/amd64, linux/arm64)" in pushed.stderr

    address = loopback_addresses(1)[0]
    servers(address, docker_env, store=store)
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          "docker://%s:%d/dgmp/app:1" % (address, PORT)], stdout=subprocess.PIPE, check=True).stdout
    assert dogestry.sha256_digest(raw) == "sha256:" + index_hex

    docker_cli(docker_host, "rmi", "-f", "dgmp/app:1")
    ok(run_dogestry("pull", "--platform", "linux/arm64", store, "dgmp/app:1", env=docker_env))
    assert docker_cli(docker_host, "inspect", "-f", "{{.Id}}", "dgmp/app:1").stdout.strip() == images.ids["arm64"]


def test_a_push_without_options_replaces_a_single_image_tag_but_only_its_platform_in_an_index(images, docker_env,
                                                                                            tmp_path):
    """By default a push replaces a tag that names one image, whatever its platform (as docker push
    does); over a tag holding an index it replaces only its own platform's image, keeping the other
    entry as it was and where it was.  What it replaced is recorded for gc."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1")
    push(docker_env, store, images.ids["arm64"], "dgmp/app:1")
    assert tag_text(store, "dgmp/app:1") == images.ids["arm64"][7:]
    assert untagged(store) == [images.ids["amd64"][7:]]
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    old_hex, old = index_doc(store, "dgmp/app:1")

    push(docker_env, store, images.ids["amd64-2"], "dgmp/app:1")

    _, new = index_doc(store, "dgmp/app:1")
    assert entries(store, "dgmp/app:1") == [("linux/arm64", images.ids["arm64"]),
                                            ("linux/amd64", images.ids["amd64-2"])]
    assert new["manifests"][0] == old["manifests"][0]  # the arm64 entry, unchanged
    assert old_hex in untagged(store)


def test_pushing_the_same_image_again_leaves_the_index_as_it_is(images, docker_env, tmp_path):
    """A push of the image a tag's index already holds for its platform keeps the index, byte for byte."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")
    before, records = tag_text(store, "dgmp/app:1"), untagged(store)

    push(docker_env, store, images.ids["amd64"], "dgmp/app:1")
    push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")

    assert tag_text(store, "dgmp/app:1") == before
    assert untagged(store) == records  # nothing was replaced


def test_multi_platform_turns_a_single_image_tag_into_an_index_of_both(images, docker_env, tmp_path):
    """--multi-platform over a tag that names an image of another platform keeps that image as the
    index's first entry; over one of the same platform, the pushed image replaces it."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:2")

    push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")
    push(docker_env, store, images.ids["amd64-2"], "dgmp/app:2", "--multi-platform")

    assert entries(store, "dgmp/app:1") == [("linux/amd64", images.ids["amd64"]), ("linux/arm64", images.ids["arm64"])]
    assert entries(store, "dgmp/app:2") == [("linux/amd64", images.ids["amd64-2"])]


def test_single_platform_replaces_a_whole_index_with_the_image(images, docker_env, tmp_path):
    """--single-platform collapses a multi-platform tag to the one pushed image; the index goes to gc."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")
    index_hex, _ = index_doc(store, "dgmp/app:1")

    push(docker_env, store, images.ids["amd64-2"], "dgmp/app:1", "--single-platform")

    assert tag_text(store, "dgmp/app:1") == images.ids["amd64-2"][7:]
    assert index_hex in untagged(store)


def test_the_two_options_exclude_each_other(docker_env, tmp_path):
    proc = run_dogestry("push", "--multi-platform", "--single-platform", str(tmp_path), "dgmp/app:1", env=docker_env)
    assert proc.returncode == 2
    one_error_line(proc, "not allowed with argument")


def test_a_docker_manifest_list_stays_one_and_attestations_go_with_their_image(images, docker_env, tmp_path):
    """A tag holding a Docker manifest list gets the pushed image as a Docker schema 2 manifest; the
    buildx attestation of the image a push replaces leaves the index with it, others stay."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    local = dogestry.LocalStore(store)
    amd64 = dogestry.registry_manifest(dogestry.load_stored_image(local, images.ids["amd64"][7:]),
                                       dogestry.DOCKER_MANIFEST)
    attestation = {"mediaType": dogestry.OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 840,
                   "platform": {"os": "unknown", "architecture": "unknown"},
                   "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                   "vnd.docker.reference.digest": dogestry.sha256_digest(amd64)}}
    listing = dogestry.json_document({"schemaVersion": 2, "mediaType": dogestry.DOCKER_MANIFEST_LIST, "manifests": [
        dogestry.image_descriptor(amd64, dogestry.DOCKER_MANIFEST, dogestry.parse_platform("linux/amd64")),
        attestation]})
    for data in (amd64, listing):  # as a registry client would have pushed them
        local.put_bytes("manifests/sha256/" + dogestry.sha256_digest(data)[7:], data)
    local.put_bytes("repositories/dgmp/app/1", b"@" + dogestry.sha256_digest(listing).encode())

    push(docker_env, store, images.ids["arm64"], "dgmp/app:1")
    _, with_arm = index_doc(store, "dgmp/app:1")
    push(docker_env, store, images.ids["amd64-2"], "dgmp/app:1")
    _, replaced = index_doc(store, "dgmp/app:1")

    assert with_arm["mediaType"] == dogestry.DOCKER_MANIFEST_LIST
    assert with_arm["manifests"][1] == attestation  # the amd64 image's, kept with it
    assert with_arm["manifests"][2]["mediaType"] == dogestry.DOCKER_MANIFEST
    assert replaced["mediaType"] == dogestry.DOCKER_MANIFEST_LIST
    assert attestation not in replaced["manifests"]
    assert entries(store, "dgmp/app:1") == [("linux/arm64", images.ids["arm64"]),
                                            ("linux/amd64", images.ids["amd64-2"])]


def test_an_immutable_multi_platform_tag_refuses_a_push_that_would_change_it(images, docker_env, tmp_path):
    """protect --immutable holds for indexes: adding or replacing a platform is refused before any
    layer goes up; pushing the image the index already holds is fine."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    ok(run_dogestry("protect", "--immutable", store, "dgmp/app:1", env=docker_env))
    before = tag_text(store, "dgmp/app:1")

    for image, flags in ((images.ids["arm64"], ["--multi-platform"]), (images.ids["amd64-2"], [])):
        docker_cli(docker_env["DOCKER_HOST"], "tag", image, "dgmp/app:1")
        one_error_line(run_dogestry("push", *flags, store, "dgmp/app:1", env=docker_env), "dgmp/app:1 is immutable")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1")

    assert tag_text(store, "dgmp/app:1") == before
    assert not (Path(store) / "images" / images.ids["arm64"][7:]).exists()


def test_a_push_refreshes_the_old_manifests_its_index_names_before_the_tag(images, docker_env, tmp_path):
    """A manifest the new index names that is stored already but old (gc may be about to take it) is
    made young again before the tag names the index."""
    env = dict(docker_env, DOGESTRY_GC_MIN_GRACE="10")
    store = str(tmp_path / "store")
    push(env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    _, doc = index_doc(store, "dgmp/app:1")
    child = Path(store) / "manifests" / "sha256" / doc["manifests"][0]["digest"][7:]
    ok(run_dogestry("rm", store, "dgmp/app:1", env=env))
    for path in Path(store).rglob("*"):
        if path.is_file():
            os.utime(path, (path.stat().st_atime - 3600, path.stat().st_mtime - 3600))
    aged = child.stat().st_mtime

    push(env, store, images.ids["amd64"], "dgmp/app:2", "--multi-platform")

    assert index_doc(store, "dgmp/app:2")[1]["manifests"][0]["digest"] == doc["manifests"][0]["digest"]
    assert child.stat().st_mtime > aged + 3000


# --- hosts pushing at the same time ----------------------------------------------------------------

class TagReadRendezvous:
    """A proxy rule that holds the first read of each tag until a second one of it arrives: the two
    pushes of the tag then read the same version of it, and only one of their writes can succeed."""

    def __init__(self):
        self.lock, self.barriers, self.met = threading.Lock(), {}, 0

    def __call__(self, req):
        if req.method != "GET" or not req.key.startswith("repositories/"):
            return None
        with self.lock:
            barrier, seen = self.barriers.setdefault(req.key, (threading.Barrier(2, timeout=120), []))
            seen.append(req.n)
            first_two = len(seen) <= 2
        if first_two:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
                with self.lock:
                    self.met += 1
        return None


def store_of(kind, request, tmp_path):
    """(url, environment, an in-process Store, the rendezvous or None) of a fresh store; on radosgw
    the pushes go through a proxy holding their reads of the tag until both have come."""
    if kind == "directory":
        url = str(tmp_path / "store")
        return url, request.getfixturevalue("docker_env"), dogestry.LocalStore(url), None
    rgw, bucket, env = (request.getfixturevalue(f) for f in ("rgw", "bucket", "s3_env"))
    rendezvous = TagReadRendezvous()
    proxy = request.getfixturevalue("fault_proxy")(rendezvous)
    config = dogestry.AwsConfig({"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key},
                                "/nonexistent")
    location = dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint)
    store = dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))
    return "s3://%s/" % bucket, dict(env, AWS_ENDPOINT_URL=proxy.url), store, rendezvous


@pytest.mark.parametrize("kind", ["directory", "radosgw"])
def test_two_hosts_pushing_their_platforms_of_a_tag_at_once_both_end_up_in_it(kind, images, arm_host, docker_host,
                                                                               request, tmp_path):
    """An amd64 host and an arm64 host run `push --multi-platform` of the same tag at the same moment,
    for tag after tag: every tag ends with both platforms (neither update is lost).  On radosgw both
    pushes of every tag are made to read the tag before either writes it."""
    url, env, store, rendezvous = store_of(kind, request, tmp_path)
    hosts = ((docker_host, images.ids["amd64"]), (arm_host.host, arm_host.image))
    for n in range(RACE_TAGS):
        tag = "dgmp/race:%d" % n
        for host, image in hosts:
            docker_cli(host, "tag", image, tag)
        procs = [subprocess.Popen([sys.executable, str(DOGESTRY), "push", "--multi-platform", url, tag],
                                  env=dict(env, DOCKER_HOST=host), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True) for host, _ in hosts]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "Traceback" not in err, err

        index = dogestry.tag_index(store, dogestry.ImageRef("dgmp/race", str(n)))
        assert sorted((str(e.platform), "sha256:" + dogestry.image_of_manifest(store, e.digest))
                      for e in dogestry.index_images(index)) == [("linux/amd64", images.ids["amd64"]),
                                                                 ("linux/arm64", arm_host.image)]
    if rendezvous is not None:
        assert rendezvous.met == 2 * RACE_TAGS  # every tag's two pushes read it at the same time


def test_a_store_without_conditional_writes_takes_plain_pushes_but_refuses_multi_platform_ones(
        images, s3_env, rgw, bucket, fault_proxy):
    """An S3 store that answers 501 NotImplemented to If-Match / If-None-Match: a push of one image
    works as before; --multi-platform fails with one line saying why, and the tag is untouched."""
    def no_conditions(req):
        if req.method == "PUT" and ("if-match" in req.headers or "if-none-match" in req.headers):
            return s3_error(501, "NotImplemented", "A header you provided implies functionality that is not "
                            "implemented", req.path)
        return None

    env = dict(s3_env, AWS_ENDPOINT_URL=fault_proxy(no_conditions).url)
    url = "s3://%s/" % bucket
    push(env, url, images.ids["amd64"], "dgmp/app:1")

    docker_cli(env["DOCKER_HOST"], "tag", images.ids["arm64"], "dgmp/app:1")
    proc = run_dogestry("push", "--multi-platform", url, "dgmp/app:1", env=env)

    one_error_line(proc, "cannot write an object only if it is unchanged", "NotImplemented")
    listing = ok(run_dogestry("list", url, env=s3_env)).stdout
    assert images.ids["amd64"][7:19] in listing and images.ids["arm64"][7:19] not in listing


# --- rm --platform ---------------------------------------------------------------------------------

def test_rm_platform_takes_one_platform_out_and_the_last_one_takes_the_tag(images, docker_env, tmp_path):
    """rm --platform leaves the tag's other platforms (the old index goes to gc); removing its last
    image removes the tag, as rm does."""
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")
    both_hex, _ = index_doc(store, "dgmp/app:1")

    removed = ok(run_dogestry("rm", "--platform", "linux/arm64/v8", store, "dgmp/app:1", env=docker_env))

    assert entries(store, "dgmp/app:1") == [("linux/amd64", images.ids["amd64"])]
    assert "it holds linux/amd64" in removed.stderr
    assert both_hex in untagged(store)
    amd64_hex, _ = index_doc(store, "dgmp/app:1")

    ok(run_dogestry("rm", "--platform", "linux/amd64", store, "dgmp/app:1", env=docker_env))

    assert not (Path(store) / "repositories" / "dgmp" / "app" / "1").exists()
    assert amd64_hex in untagged(store)


def test_rm_platform_of_a_platform_the_tag_lacks_names_the_ones_it_has(images, docker_env, tmp_path):
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")
    before = tag_text(store, "dgmp/app:1")

    proc = run_dogestry("rm", "--platform", "linux/s390x", store, "dgmp/app:1", env=docker_env)

    one_error_line(proc, "dgmp/app:1 in %s has no image for linux/s390x to remove; it has linux/amd64, linux/arm64"
                   % store)
    assert tag_text(store, "dgmp/app:1") == before


def test_rm_platform_of_a_protected_tag_needs_force(images, docker_env, tmp_path):
    store = str(tmp_path / "store")
    push(docker_env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    push(docker_env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")
    ok(run_dogestry("protect", store, "dgmp/app:1", env=docker_env))

    one_error_line(run_dogestry("rm", "--platform", "linux/arm64", store, "dgmp/app:1", env=docker_env),
                   "dgmp/app:1 is protected", "--force")
    ok(run_dogestry("rm", "--force", "--platform", "linux/arm64", store, "dgmp/app:1", env=docker_env))

    assert entries(store, "dgmp/app:1") == [("linux/amd64", images.ids["amd64"])]
    assert (Path(store) / "gc" / "protected" / "dgmp" / "app" / "1").exists()


def test_rm_of_a_multi_platform_tag_leaves_its_images_to_gc(images, docker_env, tmp_path):
    """rm without --platform removes the tag only: the index, its manifests and images stay until gc
    finds them unreached and past the grace period (the untagged record spares them meanwhile)."""
    env = dict(docker_env, DOGESTRY_GC_MIN_GRACE="10")
    store = str(tmp_path / "store")
    push(env, store, images.ids["amd64"], "dgmp/app:1", "--multi-platform")
    push(env, store, images.ids["arm64"], "dgmp/app:1", "--multi-platform")
    index_hex, doc = index_doc(store, "dgmp/app:1")
    kept = ["manifests/sha256/" + index_hex] + ["manifests/sha256/" + d["digest"][7:] for d in doc["manifests"]] + \
        ["images/%s/manifest.json" % images.ids[k][7:] for k in ("amd64", "arm64")]

    ok(run_dogestry("rm", store, "dgmp/app:1", env=env))
    assert all((Path(store) / key).exists() for key in kept)
    ok(run_dogestry("gc", "--grace", "10s", store, env=env))
    assert all((Path(store) / key).exists() for key in kept)  # young: within the grace

    for path in Path(store).rglob("*"):  # everything, the untagged record too, an hour old
        if path.is_file():
            st = path.stat()
            os.utime(path, (st.st_atime - 3600, st.st_mtime - 3600))
    ok(run_dogestry("gc", "--grace", "10s", store, env=env))

    assert not any((Path(store) / key).exists() for key in kept)
