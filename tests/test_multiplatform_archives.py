"""Multi-platform images in archives: `dogestry import` keeps every platform of an OCI layout holding an
image index (buildah's `manifest push --all`, buildx's output with its attestations, a docker save of a
whole index), byte for byte; `export --format oci` gives the index back with the same digests, and
`export --format docker` one platform, which docker load takes.

The three-platform archive is made by buildah (FROM scratch + COPY for amd64, arm64 and arm/v7: nothing
runs, no emulation); dockerd takes a foreign image as it is, so a pull of the arm64 image is checked by
its image ID.  The buildx-style layouts (attestation manifests, raw layers, junk) are written by hand."""

import gzip
import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

import dogestry
from multiplatform import Buildah, image_platform, platform_context
from realdocker import docker_cli, image_id, ok, one_error_line, random_bytes, run_dogestry, tar_bytes, text_bytes

pytestmark = pytest.mark.integration

TAG = "mpa/app:1"
PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
ATTESTATION = {"vnd.docker.reference.type": "attestation-manifest"}
HERE = dogestry.make_platform("linux", dogestry.os.uname().machine)


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def members(path):
    """{name: bytes} of a tar's regular files, in order ('./' left off)."""
    with tarfile.open(str(path)) as tar:
        return {m.name[2:] if m.name.startswith("./") else m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_tar(path, files):
    """Write {name: bytes} (in that order) as a tar at path."""
    Path(path).write_bytes(tar_bytes(files))
    return path


def blob_of(files, digest):
    return files["blobs/sha256/" + digest[7:]]


def platform_text(p):
    return "/".join(x for x in (p["os"], p["architecture"], p.get("variant")) if x)


class Archive:
    """What an OCI layout archive holds: its index (the one index.json names) and, per platform,
    the manifest, config and layer digests."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = members(path)
        (top,) = json.loads(self.files["index.json"])["manifests"]
        self.index_digest = top["digest"]
        self.index = blob_of(self.files, top["digest"])
        self.manifests, self.configs, self.layers = {}, {}, {}
        for entry in json.loads(self.index)["manifests"]:
            if "platform" not in entry or entry["platform"]["os"] == "unknown":
                continue
            key = platform_text(entry["platform"])
            manifest = json.loads(blob_of(self.files, entry["digest"]))
            self.manifests[key] = entry["digest"]
            self.configs[key] = manifest["config"]["digest"]
            self.layers[key] = [d["digest"] for d in manifest["layers"]]

    def blob_digests(self):
        return sorted("sha256:" + n[len("blobs/sha256/"):] for n in self.files if n.startswith("blobs/sha256/"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """buildah's OCI archive (`manifest push --all ... oci-archive:`) of a three-platform image
    tagged mpa/app:1, each platform's one layer a file of its own."""
    work = tmp_path_factory.mktemp("mpa")
    buildah = Buildah(work / "buildah")
    buildah.run("manifest", "create", "mpa-list")
    for platform in PLATFORMS:
        context = platform_context(work / platform.replace("/", "-"), "built for %s\n" % platform)
        buildah.build(context, platform, manifest="mpa-list")
    return Archive(buildah.oci_archive("mpa-list", work / "three.tar", TAG))


def tag_content(store, ref=TAG):
    name, _, tag = ref.rpartition(":")
    path = Path(store) / "repositories" / name / tag
    return path.read_text().strip() if path.is_file() else None


def files_under(store, top):
    """{relative path: bytes} of the files under STORE/TOP."""
    root = Path(store) / top
    return {str(p.relative_to(store)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def stored_images(store):
    root = Path(store) / "images"
    return sorted("sha256:" + p.name for p in root.iterdir()) if root.exists() else []


def blob_stats(store):
    """{blob: (size, mtime_ns, inode)}: a blob written again shows as a change."""
    root = Path(store) / "blobs" / "sha256"
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in root.iterdir()}


def import_ok(env, store, archive, *args):
    return ok(run_dogestry("import", *args, store, archive, env=env))


# === import keeps every platform ===================================================================

def test_import_keeps_every_platform_of_a_buildah_archive_and_pull_gets_each(three, base_env, docker_host, tmp_path):
    """The tag names the index, kept byte for byte (its sha256 is the archive's index digest); every
    child manifest and blob is stored as the archive has it, each platform's image has its record;
    `pull --platform linux/arm64` loads the arm64 image into dockerd with its own image ID."""
    store = tmp_path / "store"
    assert import_ok(base_env, store, three.path).stdout.splitlines() == ["Imported image: " + TAG]

    assert tag_content(store) == "@" + three.index_digest
    manifests = files_under(store, "manifests/sha256")
    assert manifests["manifests/sha256/" + three.index_digest[7:]] == three.index
    assert sha(three.index) == three.index_digest
    for platform, digest in three.manifests.items():
        assert manifests["manifests/sha256/" + digest[7:]] == blob_of(three.files, digest), platform
        for layer in three.layers[platform]:
            assert (store / "blobs" / "sha256" / layer[7:]).read_bytes() == blob_of(three.files, layer)
    assert stored_images(store) == sorted(three.configs.values())

    env = dict(base_env, DOCKER_HOST=docker_host)
    docker_cli(docker_host, "rmi", "-f", TAG, check=False)
    ok(run_dogestry("pull", "--platform", "linux/arm64", store, TAG, env=env))
    assert image_id(docker_host, TAG) == three.configs["linux/arm64"]
    assert image_platform(docker_host, TAG) == "linux/arm64"


def test_import_platform_takes_that_platform_as_a_single_image(three, base_env, tmp_path):
    store = tmp_path / "store"
    import_ok(base_env, store, three.path, "--platform", "linux/arm/v7")
    assert tag_content(store) == three.configs["linux/arm/v7"][7:]
    assert stored_images(store) == [three.configs["linux/arm/v7"]]
    assert not (store / "manifests").exists()


def test_import_platform_the_archive_lacks_is_one_error_listing_its_platforms(three, base_env, tmp_path):
    proc = run_dogestry("import", "--platform", "linux/s390x", tmp_path / "store", three.path, env=base_env)
    assert one_error_line(proc) == ("dogestry: error: %s in the archive has no image for linux/s390x; it has "
                                    "linux/amd64, linux/arm/v7, linux/arm64 (choose one with --platform)" % TAG)
    assert tag_content(tmp_path / "store") is None and stored_images(tmp_path / "store") == []


def test_a_skopeo_copy_all_into_an_oci_dir_of_a_docker_manifest_list_keeps_every_platform(three, base_env, tmp_path):
    """`skopeo copy --all --format v2s2` into an `oci:` directory (tarred as `tar -C DIR -c .` does): a
    Docker manifest list and Docker manifests, kept byte for byte, each platform's image with its record."""
    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", "-q", "--all", "--format", "v2s2", "oci-archive:%s" % three.path,
                    "oci:%s:%s" % (layout, TAG)], check=True)
    tarred = tmp_path / "layout.tar"
    with tarfile.open(str(tarred), "w") as tar:
        tar.add(str(layout), arcname=".")
    copied = Archive(tarred)
    store = tmp_path / "store"

    proc = import_ok(base_env, store, tarred)

    assert proc.stdout.splitlines() == ["Imported image: " + TAG]
    assert tag_content(store) == "@" + copied.index_digest
    index = (store / "manifests" / "sha256" / copied.index_digest[7:]).read_bytes()
    assert index == copied.index and b"application/vnd.docker.distribution.manifest.list.v2+json" in index
    assert stored_images(store) == sorted(copied.configs.values())
    assert set(copied.configs) == set(PLATFORMS)


class Layout:
    """An OCI image layout written by hand, as buildx writes them: images, attestation manifests
    naming them, an index; {member: bytes} in the order written."""

    def __init__(self):
        self.files = {}

    def blob(self, data, media_type, **extra):
        self.files["blobs/sha256/" + sha(data)[7:]] = data
        return dict({"mediaType": media_type, "digest": sha(data), "size": len(data)}, **extra)

    def image(self, platform, payload, raw=False):
        """An image of one layer holding payload (an uncompressed tar if raw, else gzip); its descriptor."""
        layer = tar_bytes({"payload.bin": payload})
        os_name, arch, *variant = platform.split("/")
        config = dict({"architecture": arch, "os": os_name, "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}},
                      **({"variant": variant[0]} if variant else {}))
        layer_blob = self.blob(layer, "application/vnd.oci.image.layer.v1.tar") if raw else \
            self.blob(gzip.compress(layer, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": self.blob(json.dumps(config).encode(),
                                                                                        OCI_CONFIG),
                    "layers": [layer_blob]}
        platform_doc = dict({"os": os_name, "architecture": arch}, **({"variant": variant[0]} if variant else {}))
        return self.blob(json.dumps(manifest).encode(), OCI_MANIFEST, platform=platform_doc)

    def attestation(self, subject):
        """buildx's attestation manifest of an image: an in-toto statement as its layer."""
        statement = self.blob(json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                                          "subject": [{"digest": {"sha256": subject["digest"][7:]}}]}).encode(),
                              "application/vnd.in-toto+json",
                              annotations={"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"})
        config = self.blob(json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                                       "rootfs": {"type": "layers", "diff_ids": [statement["digest"]]}}).encode(),
                           OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [statement]}
        return self.blob(json.dumps(manifest).encode(), OCI_MANIFEST,
                         platform={"os": "unknown", "architecture": "unknown"},
                         annotations=dict(ATTESTATION, **{"vnd.docker.reference.digest": subject["digest"]}))

    def write(self, path, manifests, tag=TAG):
        """The layout with an index of manifests, which index.json names as tag."""
        index = self.blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode(),
                          OCI_INDEX)
        name, _, ref = tag.rpartition(":")
        top = dict(index, annotations={"io.containerd.image.name": "docker.io/%s:%s" % (name, ref),
                                       "org.opencontainers.image.ref.name": ref})
        files = dict(self.files, **{"index.json": json.dumps({"schemaVersion": 2, "manifests": [top]}).encode(),
                                    "oci-layout": b'{"imageLayoutVersion":"1.0.0"}'})
        return write_tar(path, files)


def test_attestation_manifests_are_kept_with_their_blobs_but_never_as_images(base_env, tmp_path):
    """buildx's index: two images and an attestation manifest for each (platform unknown/unknown).  The
    attestations and their blobs (config, in-toto statement) are stored byte for byte; only the two
    images get image records, and only their layers layer index entries."""
    layout = Layout()
    images = [layout.image("linux/amd64", b"amd64 payload"), layout.image("linux/arm64", b"arm64 payload")]
    attestations = [layout.attestation(image) for image in images]
    archive = layout.write(tmp_path / "buildx.tar", images + attestations)
    store = tmp_path / "store"

    import_ok(base_env, store, archive)

    index = json.loads(members(archive)["index.json"])["manifests"][0]["digest"]
    assert tag_content(store) == "@" + index
    stored = files_under(store, "manifests/sha256")
    for descriptor in images + attestations:
        assert stored["manifests/sha256/" + descriptor["digest"][7:]] == layout.files["blobs/sha256/"
                                                                                     + descriptor["digest"][7:]]
    for attestation in attestations:
        doc = json.loads(layout.files["blobs/sha256/" + attestation["digest"][7:]])
        for blob in [doc["config"]] + doc["layers"]:
            assert (store / "blobs" / "sha256" / blob["digest"][7:]).read_bytes() == \
                layout.files["blobs/sha256/" + blob["digest"][7:]]
    configs = [json.loads(layout.files["blobs/sha256/" + d["digest"][7:]])["config"]["digest"] for d in images]
    assert stored_images(store) == sorted(configs)
    diff_ids = [json.loads(layout.files["blobs/sha256/" + c[7:]])["rootfs"]["diff_ids"][0] for c in configs]
    assert sorted(p.name for p in (store / "layers").iterdir()) == sorted(d[7:] + ".json" for d in diff_ids)


def test_blobs_no_manifest_names_are_never_stored_and_stored_ones_never_again(base_env, tmp_path):
    """Bounded cost: a big blob no manifest names is dropped; importing the archive again writes no
    blob (a layer whose blob the store has is not uploaded again)."""
    layout = Layout()
    images = [layout.image("linux/amd64", random_bytes(3 << 20, 71)), layout.image("linux/arm64", b"arm64")]
    junk = layout.blob(random_bytes(3 << 20, 72), "application/octet-stream")
    archive = layout.write(tmp_path / "junk.tar", images)
    store = tmp_path / "store"

    import_ok(base_env, store, archive)
    before = blob_stats(store)
    assert junk["digest"][7:] not in before
    import_ok(base_env, store, archive)

    assert blob_stats(store) == before
    assert tag_content(store) == "@" + json.loads(members(archive)["index.json"])["manifests"][0]["digest"]


def test_raw_layers_are_kept_as_the_archive_has_them_even_when_the_store_holds_them_compressed(base_env, tmp_path):
    """Uncompressed layers (big and compressible enough to be compressed as they are read) are stored as the archive
    has them, under its digests, which the kept manifests name; also when the store already holds
    one of them compressed (an import --platform of it before): that copy is unpacked again."""
    layout = Layout()
    images = [layout.image(p, text_bytes(2 << 20, i), raw=True) for i, p in enumerate(("linux/amd64", "linux/arm64"))]
    archive = layout.write(tmp_path / "raw.tar", images)
    layers = [json.loads(layout.files["blobs/sha256/" + d["digest"][7:]])["layers"][0]["digest"] for d in images]

    for store, first in ((tmp_path / "fresh", None), (tmp_path / "compressed", "linux/amd64")):
        if first:
            import_ok(base_env, store, archive, "--platform", first)
            assert layers[0][7:] not in blob_stats(store)  # stored compressed, under another digest
        import_ok(base_env, store, archive)
        for layer in layers:
            assert sha((store / "blobs" / "sha256" / layer[7:]).read_bytes()) == layer, store.name
        assert tag_content(store).startswith("@sha256:")


def test_a_docker_save_of_a_whole_index_keeps_every_platform_and_of_a_partial_one_its_image(three, base_env,
                                                                                           tmp_path):
    """docker 25+ (containerd image store) saves an image's index beside manifest.json: held whole,
    every platform is imported; with only the platforms it pulled (the others' manifests missing),
    the archive is read by its manifest.json as before."""
    name, _, ref = TAG.rpartition(":")
    files = dict(three.files)
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_INDEX, "digest": three.index_digest, "size": len(three.index),
        "annotations": {"io.containerd.image.name": "docker.io/%s:%s" % (name, ref),
                        "org.opencontainers.image.ref.name": ref}}]}).encode()
    files["manifest.json"] = json.dumps([{"Config": "blobs/sha256/" + three.configs["linux/amd64"][7:],
                                          "RepoTags": [TAG], "Layers": ["blobs/sha256/" + d[7:] for d in
                                                                        three.layers["linux/amd64"]]}]).encode()
    whole = write_tar(tmp_path / "whole.tar", files)
    partial = write_tar(tmp_path / "partial.tar", {n: d for n, d in files.items() if n not in (
        "blobs/sha256/" + three.manifests["linux/arm64"][7:], "blobs/sha256/" + three.manifests["linux/arm/v7"][7:])})

    import_ok(base_env, tmp_path / "a", whole)
    import_ok(base_env, tmp_path / "b", partial)

    assert tag_content(tmp_path / "a") == "@" + three.index_digest
    assert stored_images(tmp_path / "a") == sorted(three.configs.values())
    assert tag_content(tmp_path / "b") == three.configs["linux/amd64"][7:]


def _without_arm64_manifest(three, files):
    del files["blobs/sha256/" + three.manifests["linux/arm64"][7:]]


def _arm64_manifest_changed(three, files):
    name = "blobs/sha256/" + three.manifests["linux/arm64"][7:]
    files[name] = files[name].replace(b'"schemaVersion":2', b'"schemaVersion": 2')


def _arm64_layer_changed(three, files):
    name = "blobs/sha256/" + three.layers["linux/arm64"][0][7:]
    files[name] = gzip.compress(b"not the layer", mtime=0)


@pytest.mark.parametrize("breaking, needle", [
    (_without_arm64_manifest, "the archive lacks manifest"),
    (_arm64_manifest_changed, "does not match its digest"),
    (_arm64_layer_changed, "does not match its digest"),
], ids=["child-manifest-missing", "child-manifest-digest-mismatch", "layer-digest-mismatch"])
def test_a_broken_multi_platform_archive_leaves_no_tag_and_no_manifests(three, breaking, needle, base_env, tmp_path):
    files = dict(three.files)
    breaking(three, files)
    archive = write_tar(tmp_path / "broken.tar", files)
    store = tmp_path / "store"

    proc = run_dogestry("import", store, archive, env=base_env)

    assert proc.returncode == 1
    one_error_line(proc, needle)
    assert tag_content(store) is None
    assert files_under(store, "manifests") == {} and stored_images(store) == []


def test_import_to_an_immutable_tag_of_other_content_writes_nothing(three, base_env, tmp_path):
    store = tmp_path / "store"
    import_ok(base_env, store, three.path, "--platform", "linux/amd64")
    ok(run_dogestry("protect", "--immutable", store, TAG, env=base_env))
    before = blob_stats(store)

    proc = run_dogestry("import", store, three.path, env=base_env)

    one_error_line(proc, "is immutable")
    assert tag_content(store) == three.configs["linux/amd64"][7:]
    assert blob_stats(store) == before and not (store / "manifests").exists()
    assert stored_images(store) == [three.configs["linux/amd64"]]


# === export ========================================================================================

@pytest.fixture
def imported(three, base_env, tmp_path):
    """A directory store holding the three-platform archive's image as mpa/app:1."""
    store = tmp_path / "store"
    import_ok(base_env, store, three.path)
    return store


def test_export_oci_of_a_multi_platform_tag_gives_back_the_same_digests(three, imported, base_env, tmp_path):
    """skopeo reads the index with the digest it had, copies every platform (--all) with the archive's
    own blobs, and the export imports into a fresh store as the same tag content."""
    out = tmp_path / "out.tar"
    ok(run_dogestry("export", imported, TAG, "--format", "oci", "-o", out, env=base_env))

    raw = subprocess.run(["skopeo", "inspect", "--raw", "oci-archive:%s" % out], stdout=subprocess.PIPE,
                         check=True).stdout
    assert sha(raw) == three.index_digest
    copied = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", "-q", "--all", "oci-archive:%s" % out, "oci:%s" % copied], check=True)
    assert sorted("sha256:" + p.name for p in (copied / "blobs" / "sha256").iterdir()) == three.blob_digests()
    (top,) = json.loads(members(out)["index.json"])["manifests"]
    assert top["annotations"]["org.opencontainers.image.ref.name"] == TAG

    again = tmp_path / "again"
    import_ok(base_env, again, out)
    assert tag_content(again) == tag_content(imported)
    assert files_under(again, "manifests") == files_under(imported, "manifests")
    assert stored_images(again) == stored_images(imported)


def test_export_oci_with_platform_writes_that_platforms_manifest_as_stored(three, imported, base_env, tmp_path):
    out = tmp_path / "arm64.tar"
    ok(run_dogestry("export", imported, TAG, "--format", "oci", "--platform", "linux/arm64", "-o", out, env=base_env))
    (top,) = json.loads(members(out)["index.json"])["manifests"]
    assert top["digest"] == three.manifests["linux/arm64"]
    assert sha(members(out)["blobs/sha256/" + top["digest"][7:]]) == top["digest"]


@pytest.mark.parametrize("how", ["platform", "engine", "no-engine"])
def test_export_docker_of_a_multi_platform_tag_takes_one_platform_that_docker_load_takes(
        how, three, imported, base_env, docker_host, tmp_path):
    """docker load takes no index: --platform picks the image, else the engine's platform (DOCKER_HOST's
    engine), else, with no engine to ask, this machine's; export says which it took."""
    out = tmp_path / "docker.tar"
    env = dict(base_env, DOCKER_HOST=docker_host if how != "no-engine" else "unix://%s" % (tmp_path / "none.sock"))
    args = ["--platform", "linux/arm64"] if how == "platform" else []
    proc = ok(run_dogestry("export", imported, TAG, "-o", out, *args, env=env))
    engine = docker_cli(docker_host, "version", "-f", "{{.Server.Arch}}").stdout.strip()
    platform = {"platform": "linux/arm64", "engine": "linux/" + engine, "no-engine": str(HERE)}[how]
    assert "exporting the %s image of multi-platform tags" % platform in proc.stderr
    assert ("no Docker engine answered" in proc.stderr) == (how == "no-engine")

    (entry,) = json.loads(members(out)["manifest.json"])
    assert entry["RepoTags"] == [TAG]
    assert sha(members(out)[entry["Config"]]) == three.configs[platform]
    docker_cli(docker_host, "rmi", "-f", TAG, check=False)
    docker_cli(docker_host, "load", "-q", "-i", str(out))
    assert image_id(docker_host, TAG) == three.configs[platform]


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_export_of_a_platform_the_tag_lacks_is_one_error_listing_its_platforms(fmt, imported, base_env, tmp_path):
    out = tmp_path / "out.tar"
    proc = run_dogestry("export", imported, TAG, "--format", fmt, "--platform", "linux/s390x", "-o", out, env=base_env)
    assert one_error_line(proc) == ("dogestry: error: %s in %s has no image for linux/s390x; it has linux/amd64, "
                                    "linux/arm/v7, linux/arm64 (choose one with --platform)" % (TAG, imported))
    assert not out.exists()


# === a store on S3 (radosgw) =======================================================================

def test_a_multi_platform_archive_imports_into_s3_and_exports_back_with_the_same_index(three, rgw, s3_env, bucket,
                                                                                       tmp_path):
    url = "s3://%s/mp/" % bucket
    import_ok(s3_env, url, three.path)
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, "mp/", "us-east-1", rgw.endpoint)
    store = dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))
    assert store.get_bytes("repositories/mpa/app/1").decode() == "@" + three.index_digest
    assert store.get_bytes("manifests/sha256/" + three.index_digest[7:]) == three.index

    out = tmp_path / "out.tar"
    ok(run_dogestry("export", url, TAG, "--format", "oci", "-o", out, env=s3_env))
    exported = Archive(out)
    assert exported.index_digest == three.index_digest
    assert exported.blob_digests() == three.blob_digests()
