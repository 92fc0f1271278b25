"""Push and pull between a real dockerd and a local directory store."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from realdocker import (build_image, docker_cli, image_id, image_layers, one_error_line, random_bytes,
                        run_dogestry, text_bytes)

pytestmark = pytest.mark.integration


def dogestry_ok(env, *args):
    """Run dogestry and insist it succeeded."""
    proc = run_dogestry(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc



def forget(docker_host, *refs):
    """Remove images from the engine (as a fresh host would be)."""
    docker_cli(docker_host, "rmi", "-f", *refs, check=False)


def blobs(store):
    """Stored layer blobs by name."""
    root = Path(store) / "blobs" / "sha256"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def manifest(store, image):
    """The stored manifest of an image ID."""
    return json.loads((Path(store) / "images" / image.split(":")[1] / "manifest.json").read_text())




@pytest.fixture(scope="module")
def app_image(docker_host):
    """A 3-layer image: incompressible data, compressible text, a tiny file, and a label."""
    layers = [{"data/random.bin": random_bytes(3 << 20, 1)},
              {"data/words.txt": text_bytes(4 << 20, 2)},
              {"etc/app.conf": b"answer = 42\n"}]
    return build_image(docker_host, "dgtest/app:1.0", layers, extra_lines=["LABEL org.example=app"])


def test_round_trip_keeps_the_image_id_and_tag(docker_host, docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    docker_cli(docker_host, "tag", "dgtest/app:1.0", "dgtest/app:keep")  # keep the layers cached...
    forget(docker_host, "dgtest/app:1.0", "dgtest/app:keep")               # ...then drop the image
    assert image_id(docker_host, "dgtest/app:1.0") is None

    dogestry_ok(docker_env, "pull", store, "dgtest/app:1.0")

    assert image_id(docker_host, "dgtest/app:1.0") == app_image


def test_store_layout_names_tag_image_and_content_addressed_layers(docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")

    hexid = app_image.split(":")[1]
    assert (store / "repositories" / "dgtest" / "app" / "1.0").read_text() == hexid
    config = (store / "images" / hexid / "config.json").read_bytes()
    assert "sha256:" + __import__("hashlib").sha256(config).hexdigest() == app_image
    layers = manifest(store, app_image)["layers"]
    assert [l["diffID"] for l in layers] == image_layers(docker_env["DOCKER_HOST"], app_image)
    for layer in layers:
        blob = store / "blobs" / "sha256" / layer["digest"].split(":")[1]
        assert blob.stat().st_size == layer["size"]
        assert "sha256:" + __import__("hashlib").sha256(blob.read_bytes()).hexdigest() == layer["digest"]
    # random bytes do not compress: stored raw; text is gzip-compressed
    assert [l["compression"] for l in layers][:2] == ["none", "gzip"]
    assert layers[1]["size"] < (4 << 20) // 2


def test_gzip_layers_are_one_valid_multi_member_stream(docker_env, app_image, tmp_path):
    import gzip
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    text_layer = manifest(store, app_image)["layers"][1]
    raw = gzip.decompress((store / "blobs" / "sha256" / text_layer["digest"][7:]).read_bytes())
    assert "sha256:" + __import__("hashlib").sha256(raw).hexdigest() == text_layer["diffID"]


def test_gzip_layers_record_their_members_so_pulls_gunzip_on_all_cores(docker_host, docker_env, app_image, tmp_path):
    """The sizes of a gzip layer's independent members are stored with it ("members"): each is a
    whole gzip member of at most 2 MiB unpacked.  A pull uses them, or reads the blob as one
    stream where an older record has none; a record whose sizes lie is a corrupt image."""
    import zlib
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    text_layer = manifest(store, app_image)["layers"][1]
    members = text_layer["members"]
    assert sum(members) == text_layer["size"]
    assert len(members) == -(-text_layer["rawSize"] // (2 << 20)) == 3  # 4 MiB of text (and a tar header)
    blob = (store / "blobs" / "sha256" / text_layer["digest"][7:]).read_bytes()
    offset = 0
    for size in members:
        inflate = zlib.decompressobj(31)
        assert len(inflate.decompress(blob[offset:offset + size])) <= 2 << 20
        assert inflate.eof and inflate.unused_data == b""
        offset += size
    index = json.loads((store / "layers" / (text_layer["diffID"][7:] + ".json")).read_text())
    assert index["members"] == members

    manifest_path = store / "images" / app_image[7:] / "manifest.json"
    pristine = manifest_path.read_text()
    for change, works in (("none", True), ("lie", False), ("sum", False)):
        doc = json.loads(pristine)
        if change == "none":
            del doc["layers"][1]["members"]          # as versions before wrote it
        elif change == "lie":
            doc["layers"][1]["members"] = [members[0] - 1, members[1] + 1] + members[2:]
        else:
            doc["layers"][1]["members"] = [members[0], members[1] + 1] + members[2:]
        manifest_path.write_text(json.dumps(doc))
        forget(docker_host, "dgtest/app:1.0", app_image)  # layers and all: the pull must gunzip them
        proc = run_dogestry("pull", store, "dgtest/app:1.0", env=docker_env)
        if works:
            assert proc.returncode == 0, proc.stderr
            assert image_id(docker_host, "dgtest/app:1.0") == app_image
        else:
            one_error_line(proc, "corrupt" if change == "lie" else "malformed")
            assert image_id(docker_host, "dgtest/app:1.0") is None
    manifest_path.write_text(pristine)
    dogestry_ok(docker_env, "pull", store, "dgtest/app:1.0")
    assert image_id(docker_host, "dgtest/app:1.0") == app_image


def test_compress_none_stores_layers_raw_and_still_pulls(docker_host, docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", "--compress", "none", store, "dgtest/app:1.0")
    layers = manifest(store, app_image)["layers"]
    assert {l["compression"] for l in layers} == {"none"}
    assert [l["digest"] for l in layers] == [l["diffID"] for l in layers]

    docker_cli(docker_host, "tag", "dgtest/app:1.0", "dgtest/app:raw-keep")
    forget(docker_host, "dgtest/app:1.0", "dgtest/app:raw-keep")
    dogestry_ok(docker_env, "pull", store, "dgtest/app:1.0")
    assert image_id(docker_host, "dgtest/app:1.0") == app_image


def test_a_higher_compress_level_stores_smaller_blobs_that_pull_back(docker_host, docker_env, app_image, tmp_path):
    fast, small = tmp_path / "fast", tmp_path / "small"
    dogestry_ok(docker_env, "push", fast, "dgtest/app:1.0")
    dogestry_ok(docker_env, "push", "--compress-level", "9", small, "dgtest/app:1.0")
    fast_layers, small_layers = manifest(fast, app_image)["layers"], manifest(small, app_image)["layers"]
    text = 1  # the text layer: level 9 finds more of its repeats than level 1
    assert fast_layers[text]["compression"] == small_layers[text]["compression"] == "gzip"
    assert small_layers[text]["size"] < 0.9 * fast_layers[text]["size"]
    assert small_layers[0]["compression"] == "none"  # random data stays raw at any level

    docker_cli(docker_host, "tag", "dgtest/app:1.0", "dgtest/app:level-keep")
    forget(docker_host, "dgtest/app:1.0", "dgtest/app:level-keep")
    dogestry_ok(docker_env, "pull", small, "dgtest/app:1.0")
    assert image_id(docker_host, "dgtest/app:1.0") == app_image


@pytest.mark.parametrize("level", ["0", "10", "fast"])
def test_a_compress_level_outside_1_to_9_is_one_clear_error(docker_env, tmp_path, level):
    proc = run_dogestry("push", "--compress-level", level, tmp_path / "store", "dgtest/app:1.0", env=docker_env)
    one_error_line(proc, "compress-level")
    assert not (tmp_path / "store").exists()


def test_file_url_and_plain_path_are_the_same_store(docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", "file://%s" % store, "dgtest/app:1.0")
    listing = dogestry_ok(docker_env, "list", store).stdout.splitlines()
    assert listing[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID"]
    assert listing[1].split() == ["dgtest/app", "1.0", app_image[7:19]]


def test_shared_layers_are_uploaded_once(docker_host, docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    before = {name: (store / "blobs" / "sha256" / name).stat().st_mtime_ns for name in blobs(store)}
    child = build_image(docker_host, "dgtest/child:1", [
        {"data/random.bin": random_bytes(3 << 20, 1)},
        {"data/words.txt": text_bytes(4 << 20, 2)},
        {"etc/app.conf": b"answer = 42\n"},
        {"etc/extra.conf": b"child layer\n"}])

    proc = dogestry_ok(docker_env, "push", store, "dgtest/child:1")

    after = blobs(store)
    assert len(after) == len(before) + 1
    assert all((store / "blobs" / "sha256" / n).stat().st_mtime_ns == t for n, t in before.items())
    assert "3 of 4 layers already stored" in proc.stderr
    assert [l["diffID"] for l in manifest(store, child)["layers"]] == image_layers(docker_host, child)


def test_repush_of_a_stored_image_writes_only_the_tag(docker_host, docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    docker_cli(docker_host, "tag", "dgtest/app:1.0", "dgtest/app:again")
    # A missing -tempdir proves no `docker save` is spooled: only the tag is written.
    start = time.monotonic()
    dogestry_ok(docker_env, "-tempdir", tmp_path / "does-not-exist", "push", store, "dgtest/app:again")
    assert time.monotonic() - start < 5
    assert (store / "repositories" / "dgtest" / "app" / "again").read_text() == app_image[7:]
    forget(docker_host, "dgtest/app:again")


def test_pull_sends_only_the_layers_the_host_lacks(docker_host, docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    child = build_image(docker_host, "dgtest/partial:1", [
        {"data/random.bin": random_bytes(3 << 20, 1)},
        {"data/words.txt": text_bytes(4 << 20, 2)},
        {"etc/app.conf": b"answer = 42\n"},
        {"etc/partial.conf": b"only this layer is new\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/partial:1")
    forget(docker_host, "dgtest/partial:1")  # dgtest/app:1.0 keeps the first three layers

    proc = dogestry_ok(docker_env, "pull", store, "dgtest/partial:1")

    assert "3 of 4 layers already on the Docker host" in proc.stderr
    assert len([l for l in proc.stderr.splitlines() if ": loaded" in l]) == 1
    assert image_id(docker_host, "dgtest/partial:1") == child


def test_pull_of_an_image_the_host_has_only_tags_it(docker_host, docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    (store / "repositories" / "dgtest" / "app" / "other").write_text(app_image[7:])

    proc = dogestry_ok(docker_env, "pull", store, "dgtest/app:other")

    assert "already on the Docker host" in proc.stderr
    assert ": loaded" not in proc.stderr
    assert image_id(docker_host, "dgtest/app:other") == app_image
    forget(docker_host, "dgtest/app:other")


def test_bare_name_means_latest_and_every_tag_lands(docker_host, docker_env, tmp_path):
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/bare", [{"f": b"bare\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/bare")
    assert (store / "repositories" / "dgtest" / "bare" / "latest").exists()
    forget(docker_host, "dgtest/bare")

    dogestry_ok(docker_env, "pull", store, "dgtest/bare")

    assert image_id(docker_host, "dgtest/bare:latest") == built


def test_pull_by_image_id_prefix(docker_host, docker_env, tmp_path):
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/byid:1", [{"f": b"by id\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/byid:1")
    forget(docker_host, "dgtest/byid:1")

    dogestry_ok(docker_env, "pull", store, built[7:19])

    assert image_id(docker_host, built) == built


def test_push_by_image_id_stores_the_image_without_a_tag(docker_host, docker_env, tmp_path):
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/pushid:1", [{"f": b"pushed by id\n"}])
    dogestry_ok(docker_env, "push", store, built[7:19])
    assert (store / "images" / built[7:] / "manifest.json").exists()
    assert not (store / "repositories").exists()
    forget(docker_host, "dgtest/pushid:1")

    dogestry_ok(docker_env, "pull", store, built)

    assert image_id(docker_host, built) == built


def test_corrupt_blob_aborts_the_pull_with_nothing_loaded(docker_host, docker_env, tmp_path):
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/corrupt:1", [{"a": text_bytes(3 << 20, 7)}, {"b": b"top\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/corrupt:1")
    forget(docker_host, "dgtest/corrupt:1")
    bottom = manifest(store, built)["layers"][0]
    blob = store / "blobs" / "sha256" / bottom["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    proc = run_dogestry("pull", store, "dgtest/corrupt:1", env=docker_env)

    one_error_line(proc, "corrupt", bottom["digest"])
    assert image_id(docker_host, built) is None
    assert image_id(docker_host, "dgtest/corrupt:1") is None
    assert bottom["diffID"] not in json.dumps(
        [image_layers(docker_host, i) for i in docker_cli(docker_host, "images", "-aq").stdout.split()])


def test_a_blob_that_does_not_unpack_to_its_layer_is_never_loaded(docker_host, docker_env, tmp_path):
    """A gzip blob is gunzipped on the way to the engine and its unpacked bytes checked against the
    record (the diffID and size) before the last piece goes out: a manifest that lies about them
    (the blob itself intact) fails the pull, and nothing is loaded."""
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/unpack:1", [{"a": text_bytes(3 << 20, 8)}, {"b": b"top\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/unpack:1")
    forget(docker_host, "dgtest/unpack:1")
    manifest_path = store / "images" / built[7:] / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    bottom = doc["layers"][0]
    assert bottom["compression"] == "gzip" and bottom["members"]
    bottom["rawSize"] += 512
    manifest_path.write_text(json.dumps(doc))

    proc = run_dogestry("pull", store, "dgtest/unpack:1", env=docker_env)

    one_error_line(proc, "does not unpack to layer", bottom["diffID"])
    assert image_id(docker_host, built) is None
    assert bottom["diffID"] not in json.dumps(
        [image_layers(docker_host, i) for i in docker_cli(docker_host, "images", "-aq").stdout.split()])


def image_events(docker_host, since, action):
    """IDs of the images the engine reported ACTION for (docker events) since SINCE, until now."""
    until = "%.3f" % time.time()
    return docker_cli(docker_host, "events", "--since", since, "--until", until, "--filter", "type=image",
                      "--filter", "event=" + action, "--format", "{{.ID}}").stdout.split()


def partial_images(docker_host):
    """Images the engine holds that a pull loaded as partial images."""
    return docker_cli(docker_host, "images", "-aq", "--filter", "label=org.dogestry.partial").stdout.split()


def test_a_big_image_loads_in_batches_that_leave_no_partial_image(docker_host, docker_env, tmp_path):
    """With DOGESTRY_LOAD_BATCH=1 (MiB) an image of three 2 MiB layers and a tiny one goes to the
    engine in three docker loads (the tiny layer rides with the last), each streaming while the
    engine registers the one before: two partial images and the image.  The partial images are
    deleted and the image keeps every layer."""
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/batches:1", [
        {"a": text_bytes(2 << 20, 31)}, {"b": random_bytes(2 << 20, 32)}, {"c": text_bytes(2 << 20, 33)},
        {"d": b"top\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/batches:1")
    forget(docker_host, "dgtest/batches:1")
    since = "%.3f" % time.time()

    dogestry_ok(dict(docker_env, DOGESTRY_LOAD_BATCH="1"), "pull", store, "dgtest/batches:1")

    loaded = image_events(docker_host, since, "load")
    assert len(loaded) == 3 and loaded[-1] == built, loaded
    assert sorted(image_events(docker_host, since, "delete")) == sorted(loaded[:2])
    assert partial_images(docker_host) == []
    assert image_id(docker_host, "dgtest/batches:1") == built
    docker_cli(docker_host, "save", "-o", tmp_path / "saved.tar", "dgtest/batches:1")  # every layer is there
    assert len(image_layers(docker_host, built)) == 4


def test_a_corrupt_blob_in_a_later_batch_leaves_no_image_and_no_partial_one(docker_host, docker_env, tmp_path):
    """The first batch is loaded (a partial image) before the second's corrupt blob is found:
    the pull fails with one line, the partial image is deleted and no layer stays behind."""
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/badbatch:1", [
        {"a": text_bytes(2 << 20, 41)}, {"b": text_bytes(2 << 20, 42)}, {"c": b"top\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/badbatch:1")
    forget(docker_host, "dgtest/badbatch:1")
    layers = manifest(store, built)["layers"]
    blob = store / "blobs" / "sha256" / layers[1]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    since = "%.3f" % time.time()

    proc = run_dogestry("pull", store, "dgtest/badbatch:1", env=dict(docker_env, DOGESTRY_LOAD_BATCH="1"))

    one_error_line(proc, "corrupt", layers[1]["digest"])
    loaded = image_events(docker_host, since, "load")
    assert len(loaded) == 1 and loaded[0] != built, loaded  # the first batch's partial image
    assert image_events(docker_host, since, "delete") == loaded
    assert partial_images(docker_host) == []
    assert image_id(docker_host, built) is None
    assert layers[0]["diffID"] not in json.dumps(
        [image_layers(docker_host, i) for i in docker_cli(docker_host, "images", "-aq").stdout.split()])


def test_partial_images_a_killed_pull_left_are_removed_by_the_next_pull_of_the_image(docker_host, docker_env,
                                                                                   tmp_path):
    """A batched pull killed with kill -9 once its first batch is loaded leaves that partial image
    (nothing runs after SIGKILL); the next pull of the image loads it and removes the partial image,
    which names the image it was for (org.dogestry.partial.for)."""
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/killed:1", [
        {"a": text_bytes(2 << 20, 51)}, {"b": random_bytes(2 << 20, 52)}, {"c": text_bytes(2 << 20, 53)},
        {"d": b"top\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/killed:1")
    forget(docker_host, "dgtest/killed:1")
    blob = store / "blobs" / "sha256" / manifest(store, built)["layers"][1]["digest"][7:]
    blob.rename(tmp_path / "held-back")
    os.mkfifo(str(blob))  # the second batch waits at this blob for a writer: the pull stalls there
    env = dict(docker_env, DOGESTRY_LOAD_BATCH="1")
    since = "%.3f" % time.time()
    events = subprocess.Popen(["docker", "-H", docker_host, "events", "--since", since, "--filter", "type=image",
                               "--filter", "event=load", "--format", "{{.ID}}"],
                              stdout=subprocess.PIPE, universal_newlines=True)
    pull = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "dogestry.py"),
                             "pull", str(store), "dgtest/killed:1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watchdog = threading.Timer(120, events.kill)
    watchdog.start()
    try:
        first_load = events.stdout.readline().strip()  # the first batch's partial image is loaded
    finally:
        watchdog.cancel()
        pull.send_signal(signal.SIGKILL)
        pull.wait()
        events.kill()
        events.wait()
    assert first_load and partial_images(docker_host) == [first_load[7:19]]
    labels = inspect_labels(docker_host, first_load)
    blob.unlink()
    (tmp_path / "held-back").rename(blob)

    dogestry_ok(env, "pull", store, "dgtest/killed:1")

    assert partial_images(docker_host) == []
    assert image_id(docker_host, "dgtest/killed:1") == built
    assert len(image_layers(docker_host, built)) == 4
    assert labels.get("org.dogestry.partial.for") == built


def inspect_labels(docker_host, image):
    return json.loads(docker_cli(docker_host, "image", "inspect", "-f", "{{json .Config.Labels}}", image).stdout)


def test_missing_blob_fails_cleanly(docker_host, docker_env, tmp_path):
    store = tmp_path / "store"
    built = build_image(docker_host, "dgtest/missing:1", [{"a": b"aaa\n"}, {"b": b"bbb\n"}])
    dogestry_ok(docker_env, "push", store, "dgtest/missing:1")
    forget(docker_host, "dgtest/missing:1")
    for layer in manifest(store, built)["layers"]:
        (store / "blobs" / "sha256" / layer["digest"][7:]).unlink()

    proc = run_dogestry("pull", store, "dgtest/missing:1", env=docker_env)

    one_error_line(proc, "blobs/sha256/")
    assert image_id(docker_host, "dgtest/missing:1") is None


def test_tag_pointing_to_a_missing_image_fails_cleanly(docker_env, tmp_path):
    store = tmp_path / "store"
    (store / "repositories" / "ghost").mkdir(parents=True)
    (store / "repositories" / "ghost" / "latest").write_text("ab" * 32)
    proc = run_dogestry("pull", store, "ghost", env=docker_env)
    one_error_line(proc, "missing")


def spooling(spool, store=None, chunks_before=()):
    """Is a push writing a layer into its temp dir under SPOOL right now (or, for a layer it
    stores as chunks, writing into STORE chunks other than CHUNKS_BEFORE)?"""
    if store is not None and set(store.glob("chunks/sha256/*")) - set(chunks_before):
        return True
    for member in spool.glob("*/member-*"):
        try:
            if member.stat().st_size > 0:
                return True
        except FileNotFoundError:  # uploaded and gone meanwhile
            continue
    return False


def test_interrupted_push_writes_no_tag_and_cleans_its_temp_dir(docker_host, docker_env, tmp_path):
    store, spool = tmp_path / "store", tmp_path / "spool"
    spool.mkdir()
    build_image(docker_host, "dgtest/big:1", [{"big": text_bytes(48 << 20, 3)}, {"big2": text_bytes(48 << 20, 4)}])
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "dogestry.py"),
           "-tempdir", str(spool), "push", str(store), "dgtest/big:1"]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        before = set(store.glob("chunks/sha256/*"))  # what pushes interrupted before left
        proc = subprocess.Popen(cmd, env=docker_env, stderr=subprocess.PIPE, universal_newlines=True)
        deadline = time.monotonic() + 30
        while not spooling(spool, store, before) and time.monotonic() < deadline:  # mid-push: a layer is being written
            time.sleep(0.02)
        assert spooling(spool, store, before), "the push never started spooling"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "Traceback" not in err
        assert not (store / "repositories" / "dgtest" / "big" / "1").exists()
        assert not list(store.glob("images/*/manifest.json"))
        if sig != signal.SIGKILL:
            assert list(spool.iterdir()) == [], "temp dir left behind after %s" % sig
    assert len(list(spool.iterdir())) == 1  # SIGKILL leaves the temp dir; the next run removes it
    dogestry_ok(docker_env, "-tempdir", spool, "push", store, "dgtest/big:1")
    assert (store / "repositories" / "dgtest" / "big" / "1").exists()
    assert list(spool.iterdir()) == []
    forget(docker_host, "dgtest/big:1")


def test_a_run_removes_temp_dirs_of_killed_runs_but_not_of_live_ones(docker_host, docker_env, tmp_path):
    import fcntl
    spool = tmp_path / "spool"
    dead, live, foreign = spool / ".tmp-dogestry-dead", spool / ".tmp-dogestry-live", spool / "mine"
    for d in (dead, live, foreign):
        d.mkdir(parents=True)
        (d / "member-0").write_bytes(b"x" * 1000)
    (dead / ".tmp-dogestry.lock").touch()
    with open(str(live / ".tmp-dogestry.lock"), "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a running dogestry holds it
        build_image(docker_host, "dgtest/sweep:1", [{"a": text_bytes(1 << 20, 5)}])
        dogestry_ok(docker_env, "-tempdir", spool, "push", tmp_path / "store", "dgtest/sweep:1")
    assert sorted(p.name for p in spool.iterdir()) == [".tmp-dogestry-live", "mine"]
    assert (live / "member-0").exists()


@pytest.mark.parametrize("args, needles", [
    (["push", "{store}", "Not/Valid:Name"], ["invalid image name"]),
    (["push", "{store}", "dgtest/app:bad:tag:x"], ["invalid"]),
    (["push", "{store}", "dgtest/none-such:1"], ["no such image", "dgtest/none-such:1"]),
    (["pull", "{store}", "dgtest/none-such:1"], ["not found"]),
    (["pull", "{store}", "../../etc/passwd"], ["invalid image name"]),
    (["pull", "{missing}", "x"], ["does not exist"]),
    (["list", "{missing}"], ["does not exist"]),
    (["pull", "ftp://host/x", "x"], ["unsupported store URL"]),
    (["pull", "file://otherhost/x", "x"], ["file:///path"]),
    (["rm", "{store}", "dgtest/app:never"], ["not found"]),
    (["inspect", "{store}", "dgtest/app:never"], ["not found"]),
    (["-pullhosts", "tcp://127.0.0.1:1", "pull", "{store}", "x"], ["Docker host check failed", "127.0.0.1:1"]),
    (["-pullhosts", "tcp://127.0.0.1:1", "{store}", "x"], ["Docker host check failed"]),
    (["-pullhosts", "ftp://x", "{store}", "x"], ["unsupported Docker host scheme"]),
    (["-pullhosts", "tcp://127.0.0.1:1", "push", "{store}", "x"], ["-pullhosts goes with pull"]),
    (["-config", "{missing}", "list", "{store}"], ["cannot read config file"]),
])
def test_bad_input_gets_one_clear_line(docker_env, app_image, tmp_path, args, needles):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    args = [a.format(store=store, missing=tmp_path / "missing") for a in args]
    proc = run_dogestry(*args, env=docker_env)
    one_error_line(proc, *needles)


@pytest.mark.parametrize("host, needle", [
    ("unix:///nonexistent/docker.sock", "No such file"),
    ("tcp://127.0.0.1:1", "refused"),
    ("ssh://user@host", "unsupported Docker host"),
    ("nonsense", "invalid Docker host"),
])
def test_dead_or_wrong_docker_host(docker_env, tmp_path, host, needle):
    env = dict(docker_env, DOCKER_HOST=host)
    proc = run_dogestry("push", tmp_path / "store", "dgtest/app:1.0", env=env)
    one_error_line(proc, needle)


def test_usage_errors_exit_2(docker_env):
    assert run_dogestry("push", env=docker_env).returncode == 2
    assert run_dogestry("frobnicate", env=docker_env).returncode == 2
    assert run_dogestry(env=docker_env).returncode == 2


def test_rm_deletes_only_the_tag(docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    count = len(blobs(store))
    dogestry_ok(docker_env, "rm", store, "dgtest/app:1.0")
    assert "dgtest/app" not in dogestry_ok(docker_env, "list", store).stdout
    assert len(blobs(store)) == count


def test_inspect_and_remote_describe_the_store(docker_env, app_image, tmp_path):
    store = tmp_path / "store"
    dogestry_ok(docker_env, "push", store, "dgtest/app:1.0")
    doc = json.loads(dogestry_ok(docker_env, "inspect", store, "dgtest/app:1.0").stdout)
    assert doc["Id"] == app_image
    assert doc["RepoTags"] == ["dgtest/app:1.0"]
    assert doc["Config"]["config"]["Labels"] == {"org.example": "app"}
    remote = dogestry_ok(docker_env, "remote", store).stdout
    assert "Tags:         1" in remote and "Images:       1" in remote


def test_quiet_prints_nothing_on_success(docker_env, app_image, tmp_path):
    proc = dogestry_ok(docker_env, "-q", "push", tmp_path / "store", "dgtest/app:1.0")
    assert proc.stderr == "" and proc.stdout == ""


def test_plain_progress_lines_when_not_a_tty(docker_env, app_image, tmp_path):
    proc = dogestry_ok(docker_env, "push", tmp_path / "store", "dgtest/app:1.0")
    assert "\x1b[" not in proc.stderr
    assert any(line.endswith("/s)") and ": pushed" in line for line in proc.stderr.splitlines())


def test_progress_bars_on_a_tty(docker_env, app_image, tmp_path):
    import pty
    master, slave = pty.openpty()
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "dogestry.py"),
           "push", str(tmp_path / "store"), "dgtest/app:1.0"]
    proc = subprocess.Popen(cmd, env=docker_env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        output += data
    assert proc.wait(timeout=60) == 0
    os.close(master)
    text = output.decode()
    assert "\x1b[" in text and "[" in text and "B/s" in text


@pytest.fixture
def small_tmpfs(tmpfs):
    """A 2 MiB tmpfs: a disk that fills up."""
    return tmpfs("2m")


def test_push_onto_a_full_disk_says_so_and_writes_no_tag(docker_host, docker_env, tmp_path, small_tmpfs):
    build_image(docker_host, "dgtest/fills:1", [{"a": random_bytes(6 << 20, 11)}])
    as_tempdir = run_dogestry("-tempdir", small_tmpfs, "push", tmp_path / "store", "dgtest/fills:1",
                              env=docker_env)
    one_error_line(as_tempdir, "No space left on device")
    assert not (tmp_path / "store" / "repositories" / "dgtest" / "fills" / "1").exists()
    assert list(small_tmpfs.iterdir()) == []  # the temp dir went, too

    as_store = run_dogestry("push", small_tmpfs / "store", "dgtest/fills:1", env=docker_env)
    one_error_line(as_store, "No space left on device")
    assert not (small_tmpfs / "store" / "repositories" / "dgtest" / "fills" / "1").exists()


def test_concurrent_pushes_of_images_sharing_a_layer(docker_host, docker_env, tmp_path):
    """Two pushes at once into one store: both finish, the shared layer is stored once, both pull back."""
    base = {"data/base.bin": random_bytes(6 << 20, 21)}
    one = build_image(docker_host, "dgtest/twin:one", [base, {"one.txt": text_bytes(3 << 20, 22)}])
    two = build_image(docker_host, "dgtest/twin:two", [base, {"two.txt": text_bytes(3 << 20, 23)}])
    store = tmp_path / "store"
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "dogestry.py"), "push", str(store)]
    procs = [subprocess.Popen(cmd + [ref], env=docker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True) for ref in ("dgtest/twin:one", "dgtest/twin:two")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    layers = {l["digest"] for i in (one, two) for l in manifest(store, i)["layers"]}
    assert len(layers) == 3 and blobs(store) == sorted(d.split(":")[1] for d in layers)
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp-")]  # no temp dirs left
    forget(docker_host, "dgtest/twin:one", "dgtest/twin:two")
    dogestry_ok(docker_env, "pull", store, "dgtest/twin:one")
    dogestry_ok(docker_env, "pull", store, "dgtest/twin:two")
    assert (image_id(docker_host, "dgtest/twin:one"), image_id(docker_host, "dgtest/twin:two")) == (one, two)
