"""What a store may trust, and what gc may touch: a store is shared by careless and hostile writers.

- The layer index rule: `layers/<diffID>.json` (which every later push reuses without reading the
  blob) is written only for a layer whose diffID dogestry checked against the blob's own bytes,
  and only such entries are trusted.  A zstd layer cannot be unpacked here: it is stored, named
  only by its own image's manifest.
- import stores a blob named by its digest only once the archive's manifests say it is a layer of
  an image being imported (not another platform's layer, not an attestation, not junk).
"""

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from realdocker import build_image, docker_cli, image_id, image_layers, ok, random_bytes, run_dogestry, text_bytes

pytestmark = pytest.mark.integration

BASE = {"base/lib.bin": random_bytes(300 << 10, 301)}
APP = {"app/words.txt": text_bytes(200 << 10, 302)}


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def built(docker_host, tmp_path_factory):
    """dgint/base:1 (one layer) and dgint/app:1 (the same layer, then one of its own), and a docker
    save of both to give them back to the engine after a test removed them."""
    base = build_image(docker_host, "dgint/base:1", [BASE])
    app = build_image(docker_host, "dgint/app:1", [BASE, APP])
    saved = tmp_path_factory.mktemp("saved") / "images.tar"
    docker_cli(docker_host, "save", "-o", saved, "dgint/base:1", "dgint/app:1")
    return {"base": base, "app": app, "diff_ids": image_layers(docker_host, "dgint/app:1"), "saved": saved}


@pytest.fixture
def images(docker_host, built):
    """The images, in the engine."""
    docker_cli(docker_host, "load", "-i", built["saved"])
    return built


def index_entry(store, diff_id):
    path = Path(store) / "layers" / (diff_id[7:] + ".json")
    return json.loads(path.read_text()) if path.exists() else None


def stored_layers(store, image):
    """(diffID, digest, compression) of each layer of IMAGE's manifest in STORE."""
    manifest = json.loads((Path(store) / "images" / image[7:] / "manifest.json").read_text())
    return [(l["diffID"], l["digest"], l["compression"]) for l in manifest["layers"]]


def blobs(store):
    return sorted(p.name for p in (Path(store) / "blobs" / "sha256").iterdir())


def tar_file(members):
    """A tar archive of [(name, bytes)], in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def oci_image(config, layers, media_type="application/vnd.oci.image.layer.v1.tar+zstd"):
    """(manifest bytes, {digest: bytes} of the config, the layers and the manifest)."""
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": media_type, "digest": sha(data), "size": len(data)} for data in layers]}).encode()
    blobs = {sha(data): data for data in [config] + list(layers) + [manifest]}
    return manifest, blobs


def oci_archive(path, blobs, index):
    """Write an OCI image layout archive: the blobs first, then index.json and oci-layout (as skopeo does)."""
    members = [("blobs/sha256/" + digest[7:], data) for digest, data in sorted(blobs.items())]
    members += [("index.json", json.dumps(index).encode()), ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    Path(path).write_bytes(tar_file(members))
    return path


def zstd_claiming(path, diff_ids, tag="dgint/evil:1"):
    """An OCI archive of one image whose config claims DIFF_IDS and whose layers are zstd blobs
    (their magic number, then junk: nothing here can unpack zstd to check them)."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}).encode()
    layers = [b"\x28\xb5\x2f\xfd" + random_bytes(2 << 20, 303 + n) for n in range(len(diff_ids))]
    manifest, blobs = oci_image(config, layers)
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    return oci_archive(path, blobs, index), [sha(data) for data in layers], sha(config)


def pulls_back(docker_host, env, store, tag, expected, *forget):
    """Pull TAG into an engine that has none of FORGET; the image ID that arrives must be EXPECTED."""
    docker_cli(docker_host, "rmi", "-f", *forget, check=False)
    ok(run_dogestry("pull", store, tag, env=env))
    return image_id(docker_host, tag) == expected


# === the layer index rule ======================================================================

def test_an_unchecked_layer_never_replaces_the_index_entry_of_a_stored_layer(docker_host, docker_env, images,
                                                                             tmp_path):
    """An archive whose zstd layer claims the diffID of a layer the store has is imported (its image
    gets the store's own, checked copy of that layer); the index entry still names the pushed layer,
    so the next push of an image with that layer reuses the real one, and its pull gives the image."""
    store = tmp_path / "store"
    base_layer = images["diff_ids"][0]
    ok(run_dogestry("push", store, "dgint/base:1", env=docker_env))
    entry = index_entry(store, base_layer)

    archive, zstd_blobs, evil = zstd_claiming(tmp_path / "evil.tar", [base_layer])
    ok(run_dogestry("import", store, archive, env=docker_env))
    assert index_entry(store, base_layer) == entry
    assert stored_layers(store, evil) == [(base_layer, entry["digest"], entry["compression"])]
    assert zstd_blobs[0][7:] not in blobs(store)

    ok(run_dogestry("push", store, "dgint/app:1", env=docker_env))
    assert index_entry(store, base_layer) == entry
    assert pulls_back(docker_host, docker_env, store, "dgint/app:1", images["app"], "dgint/app:1", "dgint/base:1")


def test_an_unchecked_layer_never_becomes_the_index_entry_of_a_new_layer(docker_host, docker_env, images, tmp_path):
    """Into a store that never saw the layer, the zstd layer claiming its diffID gets no index
    entry; the push of the real image stores its own copy, which the index then names."""
    store = tmp_path / "store"
    base_layer = images["diff_ids"][0]
    archive, zstd_blobs, evil = zstd_claiming(tmp_path / "evil.tar", [base_layer])
    ok(run_dogestry("import", store, archive, env=docker_env))
    assert index_entry(store, base_layer) is None
    assert stored_layers(store, evil) == [(base_layer, zstd_blobs[0], "zstd")]

    ok(run_dogestry("push", store, "dgint/base:1", env=docker_env))
    entry = index_entry(store, base_layer)
    assert entry is not None and entry["digest"] != zstd_blobs[0] and entry["compression"] != "zstd"
    assert pulls_back(docker_host, docker_env, store, "dgint/base:1", images["base"], "dgint/base:1", "dgint/app:1")


def test_an_index_entry_an_older_version_wrote_for_an_unchecked_layer_is_not_trusted(docker_host, docker_env, images,
                                                                                      tmp_path):
    """A store an earlier version let such an import poison (the entry names a zstd blob): the next
    push does not reuse it, stores its own layer and names that instead."""
    store = tmp_path / "store"
    base_layer = images["diff_ids"][0]
    archive, zstd_blobs, _ = zstd_claiming(tmp_path / "evil.tar", [base_layer])
    ok(run_dogestry("import", store, archive, env=docker_env))
    poisoned = {"compression": "zstd", "diffID": base_layer, "digest": zstd_blobs[0],
                "size": (store / "blobs" / "sha256" / zstd_blobs[0][7:]).stat().st_size}
    (store / "layers").mkdir(exist_ok=True)
    (store / "layers" / (base_layer[7:] + ".json")).write_text(json.dumps(poisoned))

    ok(run_dogestry("push", store, "dgint/app:1", env=docker_env))
    assert index_entry(store, base_layer)["digest"] != zstd_blobs[0]
    assert pulls_back(docker_host, docker_env, store, "dgint/app:1", images["app"], "dgint/app:1", "dgint/base:1")


def test_copy_never_makes_an_unchecked_layer_an_index_entry(docker_host, docker_env, images, tmp_path):
    """copy carries an image with a zstd layer (unchecked) to another store as it is, named by the
    image's manifest only; a push of the real layer into that store then stores and names its own."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    base_layer = images["diff_ids"][0]
    archive, zstd_blobs, evil = zstd_claiming(tmp_path / "evil.tar", [base_layer])
    ok(run_dogestry("import", src, archive, env=docker_env))
    ok(run_dogestry("copy", src, dst, "dgint/evil:1", env=docker_env))
    assert stored_layers(dst, evil) == [(base_layer, zstd_blobs[0], "zstd")]
    assert index_entry(dst, base_layer) is None

    ok(run_dogestry("push", dst, "dgint/app:1", env=docker_env))
    assert index_entry(dst, base_layer)["digest"] != zstd_blobs[0]
    assert pulls_back(docker_host, docker_env, dst, "dgint/app:1", images["app"], "dgint/app:1", "dgint/base:1")

# === import stores what its images name, nothing else ===========================================

def archive_members(path):
    with tarfile.open(str(path)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_import_stores_only_the_layers_of_the_images_it_imports(docker_env, images, tmp_path):
    """A multi-platform OCI archive (this machine's image, another platform's with a big layer of its
    own) that also holds a big blob nothing names, imported with --platform of this machine: the store
    gets this machine's image and its layers, nothing else (the other blobs were spooled, held back
    and dropped, never uploaded)."""
    import dogestry
    src = tmp_path / "src"
    ok(run_dogestry("push", src, "dgint/app:1", env=docker_env))
    plain = tmp_path / "plain.tar"
    ok(run_dogestry("export", src, "dgint/app:1", "--format", "oci", "-o", plain, env=docker_env))
    members = archive_members(plain)
    (descriptor,) = json.loads(members["index.json"])["manifests"]
    here = dogestry.make_platform("linux", dogestry.os.uname().machine).architecture
    other = "arm64" if here != "arm64" else "amd64"
    other_layer = random_bytes(3 << 20, 310)
    other_config = json.dumps({"architecture": other, "os": "linux",
                               "rootfs": {"type": "layers", "diff_ids": [sha(other_layer)]}}).encode()
    other_manifest, other_blobs = oci_image(other_config, [other_layer], "application/vnd.oci.image.layer.v1.tar")
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": descriptor["mediaType"], "digest": descriptor["digest"], "size": descriptor["size"],
         "platform": {"os": "linux", "architecture": here}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(other_manifest),
         "size": len(other_manifest), "platform": {"os": "linux", "architecture": other}}]}).encode()
    junk = random_bytes(3 << 20, 311)
    archived = {"sha256:" + name[len("blobs/sha256/"):]: data for name, data in members.items()
                if name.startswith("blobs/sha256/")}
    archived.update(other_blobs)
    archived.update({sha(nested): nested, sha(junk): junk})
    archive = oci_archive(tmp_path / "multi.tar", archived, {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha(nested), "size": len(nested),
        "annotations": descriptor["annotations"]}]})

    store = tmp_path / "store"
    assert ok(run_dogestry("import", "--platform", here, store, archive, env=docker_env)).stdout.splitlines() == \
        ["Imported image: dgint/app:1"]
    assert (store / "repositories" / "dgint" / "app" / "1").read_text().strip() == images["app"][7:]
    assert blobs(store) == blobs(src)
    assert sorted(p.name for p in (store / "images").iterdir()) == [images["app"][7:]]


# === gc deletes keys of its own shapes only =====================================================

GC_ENV = {"DOGESTRY_GC_MIN_GRACE": "10"}
# the keys the root store's gc may delete: exactly these shapes
ROOT_OWN = re.compile(r"^(images/[0-9a-f]{64}/(config\.json|manifest\.json)|layers/[0-9a-f]{64}\.json"
                      r"|blobs/sha256/[0-9a-f]{64}|gc/untagged/[0-9a-f]{64})$")
FOREIGN = ("blobs/sha256/README", "images/%s/notes.txt" % ("a" * 64), "layers/notes.json", "gc/untagged/README")


def test_gc_on_s3_leaves_nested_stores_and_other_keys_alone(docker_host, rgw, s3_env, images, bucket):
    """Stores nested in one bucket (s3://b/, s3://b/layers/, s3://b/blobs/sha256/team/) and files of
    other shapes: a gc of s3://b/ deletes what it owns and no tag reaches, says what it left alone,
    and leaves every key of the nested stores, their multipart uploads and the other files as they were."""
    from test_gc import s3_client, wait_until_older_than
    env = dict(s3_env, **GC_ENV)
    root, in_layers, in_team = ("s3://%s/%s" % (bucket, p) for p in ("", "layers/", "blobs/sha256/team/"))
    ok(run_dogestry("push", root, "dgint/base:1", env=env))
    ok(run_dogestry("rm", root, "dgint/base:1", env=env))
    ok(run_dogestry("push", in_layers, "dgint/app:1", env=env))
    ok(run_dogestry("push", in_team, "dgint/base:1", env=env))
    client = s3_client(rgw, bucket)
    for key in FOREIGN:
        client.put(key, lambda: b"not dogestry's\n", 15, hashlib.sha256(b"not dogestry's\n").hexdigest())
    nested_upload, own_upload = "layers/blobs/sha256/" + "1" * 64, "blobs/sha256/" + "2" * 64
    for key in (nested_upload, own_upload):
        client.call("POST", key, query=[("uploads", "")])
    others = {k: size for k, size in client.list("") if not ROOT_OWN.match(k)}
    assert len([k for k in others if k.startswith(("layers/", "blobs/sha256/team/"))]) >= 10
    wait_until_older_than(client, "gc/untagged/" + images["base"][7:], 11)

    dry = ok(run_dogestry("gc", "--dry-run", root, "--grace", "10s", env=env))
    assert "would delete 1 images, 1 layer records, 1 blobs" in dry.stdout
    assert "left alone" in dry.stdout and "blobs/sha256/README" in dry.stdout
    real = ok(run_dogestry("gc", root, "--grace", "10s", env=env))
    assert "deleted 1 images, 1 layer records, 1 blobs" in real.stdout
    assert not any(line.startswith("deleted") and "team" in line for line in real.stdout.splitlines())

    after = dict(client.list(""))
    assert {k: after.get(k) for k in others} == others
    assert not any(k.startswith("images/" + images["base"][7:]) for k in after)
    assert [key for key, _, _ in client.uploads_under("")] == [nested_upload]
    assert pulls_back(docker_host, env, in_layers, "dgint/app:1", images["app"], "dgint/app:1", "dgint/base:1")
    assert pulls_back(docker_host, env, in_team, "dgint/base:1", images["base"], "dgint/app:1", "dgint/base:1")


def age_store(store, seconds):
    """Make every file of a directory store look that much older."""
    import os
    for path in Path(store).rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(str(path), (st.st_atime - seconds, st.st_mtime - seconds))


def all_files(store):
    return {str(p.relative_to(store)): p.read_bytes() for p in Path(store).rglob("*") if p.is_file()}


def test_gc_of_a_directory_leaves_nested_stores_their_files_and_temp_files(docker_env, images, tmp_path):
    """The same in a directory store: nested stores' keys and temp files of their killed writes, and
    files of other shapes, are left alone; the store's own unreferenced image and temp files go."""
    env = dict(docker_env, **GC_ENV)
    root = tmp_path / "store"
    ok(run_dogestry("push", root, "dgint/base:1", env=env))
    ok(run_dogestry("rm", root, "dgint/base:1", env=env))
    ok(run_dogestry("push", root / "layers", "dgint/app:1", env=env))
    for key in FOREIGN + ("layers/blobs/sha256/.tmp-killed",):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(b"not dogestry's\n")
    (root / "blobs" / "sha256" / ".tmp-killed").write_bytes(b"a killed write of this store\n")
    age_store(root, 7200)
    kept = {k: v for k, v in all_files(root).items() if not ROOT_OWN.match(k) and not k.startswith("blobs/sha256/.tmp")}
    assert "layers/blobs/sha256/.tmp-killed" in kept and len([k for k in kept if k.startswith("layers/")]) >= 6

    proc = ok(run_dogestry("gc", root, env=env))
    assert "deleted 1 images, 1 layer records, 1 blobs" in proc.stdout
    assert "1 leftovers of killed pushes removed" in proc.stdout
    after = all_files(root)
    assert {k: v for k, v in after.items() if k in kept} == kept
    assert not (root / "blobs" / "sha256" / ".tmp-killed").exists()
    assert not (root / "images" / images["base"][7:]).exists()


# === what the grace period holds back, and until when ===========================================

def held_until(text):
    """The Unix time in '... until about YYYY-MM-DD HH:MM UTC'."""
    import calendar
    import time
    stamp = re.search(r"until about (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", text).group(1)
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M"))


def test_stats_and_gc_say_what_the_grace_period_holds_back_and_until_when(docker_env, images, tmp_path):
    """After rm of every tag, stats' unreferenced bytes and gc's 'would delete 0B' agree: both say
    how much the grace period holds back and from when gc can free it; once old enough, it is freed."""
    import time
    store = tmp_path / "store"
    ok(run_dogestry("push", store, "dgint/app:1", env=docker_env))
    ok(run_dogestry("rm", store, "dgint/app:1", env=docker_env))
    stored = sum(p.stat().st_size for p in (store / "blobs" / "sha256").iterdir())
    started = time.time()

    stats = json.loads(ok(run_dogestry("stats", "--json", store, env=docker_env)).stdout)
    assert (stats["unreferenced_bytes"], stats["held_bytes"], stats["freeable_bytes"]) == (stored, stored, 0)
    assert started + 3600 - 120 <= stats["held_for"] + started <= time.time() + 3600
    table = ok(run_dogestry("stats", store, env=docker_env)).stdout
    assert abs(held_until(table) - (started + 3600)) <= 180
    dry = ok(run_dogestry("gc", "--dry-run", store, env=docker_env)).stdout
    assert "would delete 0 images, 0 layer records, 0 blobs, 0B" in dry
    assert "held back by the 1h grace period" in dry and abs(held_until(dry) - (started + 3600)) <= 180

    age_store(store, 2 * 3600)
    stats = json.loads(ok(run_dogestry("stats", "--json", store, env=docker_env)).stdout)
    assert (stats["unreferenced_bytes"], stats["held_bytes"], stats["freeable_bytes"]) == (stored, 0, stored)
    assert "held back" not in ok(run_dogestry("gc", store, env=docker_env)).stdout
    assert [key for key in all_files(store) if key.startswith("blobs/")] == []
