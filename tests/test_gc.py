"""Store lifecycle: gc, rm by image ID, prune, protect, stats; safe against pushes running at the same time.

gc spares anything younger than its grace period (at least 10 s), measured on the store's own clock.
Directory-store tests make objects old by moving file times back; radosgw tests wait for S3's clock.
"""

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

import dogestry
from realdocker import (DOGESTRY, build_image, docker_cli, image_id, one_error_line, random_bytes, run_dogestry,
                        text_bytes)

pytestmark = pytest.mark.integration

HOUR = 3600
MIN_GRACE = "10"  # DOGESTRY_GC_MIN_GRACE for every push and gc here: S3's clock cannot be moved back


@pytest.fixture
def docker_env(docker_env):
    return dict(docker_env, DOGESTRY_GC_MIN_GRACE=MIN_GRACE)


@pytest.fixture
def s3_env(s3_env):
    return dict(s3_env, DOGESTRY_GC_MIN_GRACE=MIN_GRACE)


def ok(env, *args):
    proc = run_dogestry(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def age_store(store, seconds=2 * HOUR, prefix=""):
    """Make every file of a directory store (under prefix) look that much older."""
    for path in Path(store, prefix).rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def files(store):
    """Every key of a directory store."""
    return sorted(str(p.relative_to(store)) for p in Path(store).rglob("*") if p.is_file())


def stored_manifest(store, image):
    return json.loads((Path(store) / "images" / image[7:] / "manifest.json").read_text())


def blob_keys(store, image):
    return {"blobs/sha256/" + l["digest"][7:] for l in stored_manifest(store, image)["layers"]}


def pulls_back(docker_host, env, store, tag, expected):
    """Pull TAG into an engine that lacks it; True if the same image ID arrives (dockerd checks every diffID)."""
    docker_cli(docker_host, "rmi", "-f", tag, check=False)
    proc = run_dogestry("pull", store, tag, env=env)
    assert proc.returncode == 0, proc.stderr
    return image_id(docker_host, tag) == expected


FAMILY = "abcdefghijkl"


@pytest.fixture(scope="module")
def family(docker_host):
    """Twelve images (dggc/a:1 ... dggc/l:1) on one shared base layer, each with a layer of its own."""
    base = {"base/lib.bin": random_bytes(1 << 20, 101)}
    return types.SimpleNamespace(**{name: build_image(docker_host, "dggc/%s:1" % name, [
        base, {"app/%s.txt" % name: text_bytes(200 << 10, 102 + n)}]) for n, name in enumerate(FAMILY)})


def test_gc_deletes_what_no_tag_reaches_once_older_than_the_grace(docker_host, docker_env, family, tmp_path):
    store = tmp_path / "store"
    ok(docker_env, "push", store, "dggc/a:1")
    ok(docker_env, "push", store, "dggc/b:1")
    ok(docker_env, "rm", store, "dggc/b:1")
    only_b = blob_keys(store, family.b) - blob_keys(store, family.a)
    assert len(only_b) == 1

    young = ok(docker_env, "gc", store, "--grace", "1h")  # all of it is a few seconds old
    assert "deleted 0 images, 0 layer records, 0 blobs" in young.stdout

    age_store(store)
    before = files(store)
    dry = ok(docker_env, "gc", "--dry-run", store)
    assert files(store) == before
    assert "would delete image %s" % family.b[7:] in dry.stdout
    assert "would delete blob sha256:%s" % only_b.pop()[13:] in dry.stdout
    assert "would delete 1 images, 1 layer records, 1 blobs" in dry.stdout

    real = ok(docker_env, "gc", store)
    assert [l for l in real.stdout.splitlines() if not l.startswith("gc ")] == \
        [l.replace("would delete", "deleted") for l in dry.stdout.splitlines() if not l.startswith("gc ")]
    after = files(store)
    assert not any(family.b[7:] in key for key in after)
    assert blob_keys(store, family.a) <= set(after)
    assert "gc/untagged/" + family.b[7:] not in after  # the record of the rm expired with the grace
    assert pulls_back(docker_host, docker_env, store, "dggc/a:1", family.a)


def test_an_image_untagged_less_than_the_grace_ago_is_spared(docker_env, family, tmp_path):
    store = tmp_path / "store"
    ok(docker_env, "push", store, "dggc/b:1")
    age_store(store)
    ok(docker_env, "rm", store, "dggc/b:1")  # a pull that read the tag just before may still need it
    assert (store / "gc" / "untagged" / family.b[7:]).exists()

    ok(docker_env, "gc", store)
    assert (store / "images" / family.b[7:] / "manifest.json").exists()

    age_store(store, prefix="gc")
    ok(docker_env, "gc", store)
    assert not (store / "images" / family.b[7:]).exists()


def test_a_push_over_a_tag_keeps_the_image_it_replaced_for_the_grace(docker_env, family, tmp_path):
    store = tmp_path / "store"
    ok(docker_env, "push", store, "dggc/a:1")
    docker_cli(docker_env["DOCKER_HOST"], "tag", "dggc/b:1", "dggc/moving:1")
    docker_cli(docker_env["DOCKER_HOST"], "tag", "dggc/a:1", "dggc/moving:1")
    ok(docker_env, "push", store, "dggc/moving:1")
    age_store(store)
    docker_cli(docker_env["DOCKER_HOST"], "tag", "dggc/b:1", "dggc/moving:1")
    ok(docker_env, "push", store, "dggc/moving:1")  # a moves off moving:1 (dggc/a:1 still names it)
    ok(docker_env, "rm", store, "dggc/a:1")
    age_store(store, prefix="repositories")

    ok(docker_env, "gc", store)
    assert (store / "images" / family.a[7:] / "manifest.json").exists()
    assert json.loads((store / "gc" / "untagged" / family.a[7:]).read_text())["tags"] == ["dggc/a:1"]


def test_rm_by_image_id_removes_every_tag_of_the_image(docker_env, family, tmp_path):
    store = tmp_path / "store"
    for tag in ("dggc/a:1",):
        ok(docker_env, "push", store, tag)
    docker_cli(docker_env["DOCKER_HOST"], "tag", "dggc/a:1", "dggc/other:7")
    ok(docker_env, "push", store, "dggc/other:7")
    ok(docker_env, "push", store, "dggc/b:1")

    proc = ok(docker_env, "rm", store, family.a[7:19])

    assert "deleted dggc/a:1" in proc.stderr and "deleted dggc/other:7" in proc.stderr
    listing = ok(docker_env, "list", store).stdout
    assert "dggc/b" in listing and "dggc/a" not in listing and "dggc/other" not in listing
    one_error_line(run_dogestry("rm", store, "0123456789ab", env=docker_env), "not found")


def test_prune_keeps_the_newest_tags_and_protected_ones(docker_env, family, tmp_path):
    store = tmp_path / "store"
    host = docker_env["DOCKER_HOST"]
    for number, image in enumerate(("a", "b", "c", "a")):
        docker_cli(host, "tag", "dggc/%s:1" % image, "dggc/app:v%d" % number)
        ok(docker_env, "push", store, "dggc/app:v%d" % number)
        age_store(store, seconds=60, prefix="repositories")  # older tags: pushed longer ago
    ok(docker_env, "push", store, "dggc/c:1")
    ok(docker_env, "protect", store, "dggc/app:v0")

    dry = ok(docker_env, "prune", store, "--keep-last", "2", "dggc/app", "--dry-run")
    assert dry.stdout.splitlines() == ["would remove dggc/app:v1 (%s)" % family.b[7:19],
                                       "prune %s: would remove 1 tags" % store]
    ok(docker_env, "prune", store, "--keep-last", "2", "dggc/app")
    listing = ok(docker_env, "list", store).stdout
    assert [l.split()[1] for l in listing.splitlines()[1:] if l.startswith("dggc/app ")] == ["v0", "v2", "v3"]
    assert "dggc/c" in listing  # another repository: not named, not pruned

    ok(docker_env, "unprotect", store, "dggc/app:v0")
    ok(docker_env, "prune", store, "--older-than", "2m")
    remaining = [l.split()[:2] for l in ok(docker_env, "list", store).stdout.splitlines()[1:]]
    assert remaining == [["dggc/app", "v3"], ["dggc/c", "1"]]


def test_stats_counts_sharing_and_what_gc_would_free(docker_env, family, tmp_path):
    store = tmp_path / "store"
    for tag in ("dggc/a:1", "dggc/b:1", "dggc/c:1"):
        ok(docker_env, "push", store, tag)
    ok(docker_env, "rm", store, "dggc/c:1")
    stats = json.loads(ok(docker_env, "stats", "--json", store).stdout)
    layers = {name: stored_manifest(store, getattr(family, name))["layers"] for name in "abc"}
    size = {l["digest"]: l["size"] for ls in layers.values() for l in ls}
    assert stats["tags"] == 2 and stats["repositories"] == 2 and stats["images"] == 3 and stats["blobs"] == 4
    assert stats["stored_bytes"] == sum(size.values())
    assert stats["unshared_bytes"] == sum(l["size"] for name in "ab" for l in layers[name])
    assert stats["unreferenced_bytes"] == layers["c"][1]["size"]
    assert stats["dedup_ratio"] == round(stats["unshared_bytes"] / (stats["stored_bytes"] - layers["c"][1]["size"]), 3)
    table = ok(docker_env, "stats", store).stdout
    assert "Unreferenced:" in table and "dedup" in table


@pytest.mark.parametrize("args, needle", [(("--grace", "5s"), "too short"), (("--grace", "soon"), "bad duration"),
                                          (("--grace",), "expected one argument")])
def test_bad_gc_settings_are_one_clear_error(docker_env, tmp_path, args, needle):
    store = tmp_path / "store"
    store.mkdir()
    one_error_line(run_dogestry("gc", store, *args, env=docker_env), needle)


def test_prune_needs_exactly_one_rule(docker_env, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    one_error_line(run_dogestry("prune", store, env=docker_env), "one rule")
    one_error_line(run_dogestry("prune", store, "--keep-last", "1", "--older-than", "1h", env=docker_env), "one rule")


def test_gc_removes_what_killed_pushes_left_in_a_directory_store(docker_env, tmp_path):
    store = tmp_path / "store"
    (store / "blobs" / "sha256").mkdir(parents=True)
    leftover = store / "blobs" / "sha256" / ".tmp-abc123"
    leftover.write_bytes(b"half a layer")
    work = store / (dogestry.WORK_PREFIX + "killed")
    work.mkdir()
    (work / "member-0").write_bytes(b"spooled")
    (work / dogestry.WORK_LOCK).write_bytes(b"")  # its run held a lock on this; a killed run holds none
    age_store(store)
    os.utime(work, (time.time() - 2 * HOUR,) * 2)
    proc = ok(docker_env, "gc", store)
    assert not leftover.exists() and not work.exists()
    assert "2 leftovers of killed pushes removed" in proc.stdout


# -- a synthetic store: many small images, written through the store API (no engine needed) --

def fake_store(root, images, shared=2, own=2, seed=0):
    """IMAGES images of SHARED common and OWN private layers (tiny blobs, raw), every one tagged
    fake/img<i>:1; return {tag: image hex}."""
    store = dogestry.LocalStore(str(root))
    store.ensure()
    rnd = random.Random(seed)

    def layer(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        store.put_bytes(dogestry.blob_key(digest), data)
        record = dogestry.LayerRecord(digest, digest, len(data), "none", len(data))
        dogestry.write_json(store, dogestry.layer_index_key(digest), record.to_json())
        return record

    common = [layer(b"common %d" % n) for n in range(shared)]
    tags = {}
    for i in range(images):
        records = common + [layer(b"image %d layer %d %x" % (i, n, rnd.getrandbits(64))) for n in range(own)]
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [r.diff_id for r in records]}, "n": i}).encode()
        image = "sha256:" + hashlib.sha256(config).hexdigest()
        dogestry._write_image(store, image, config, records)
        ref = dogestry.ImageRef("fake/img%d" % i, "1")
        store.put_bytes(dogestry.tag_key(ref), image[7:].encode())
        tags[str(ref)] = image[7:]
    return store, tags


def consistent(store):
    """Every tag's image is whole: manifest, config and every blob with its size."""
    for ref, image_hex in dogestry.list_tags(store):
        image = dogestry.load_stored_image(store, image_hex)
        assert store.stat(dogestry.image_key(image_hex, "config.json")) == image.config_size, ref
        for record in image.layers:
            assert store.stat(dogestry.blob_key(record.digest)) == record.size, (ref, record.digest)


def test_a_gc_killed_at_any_point_leaves_a_consistent_store_and_the_next_one_finishes(tmp_path):
    kills = []
    for attempt, delay in enumerate((0.15, 0.3, 0.45, 0.6, 0.75)):
        root = tmp_path / ("store%d" % attempt)
        store, tags = fake_store(root, 150)
        doomed = [t for n, t in enumerate(sorted(tags)) if n % 3]
        dogestry.remove_tags(store, [(dogestry.parse_image_ref(t), tags[t]) for t in doomed])
        age_store(root)
        gc = subprocess.Popen([sys.executable, str(DOGESTRY), "gc", str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        time.sleep(delay)  # the point to kill it at: a random moment of its run is what is tested
        gc.send_signal(signal.SIGKILL)
        out, _ = gc.communicate()
        kills.append(out.count("deleted "))
        consistent(store)
        proc = run_dogestry("gc", str(root))
        assert proc.returncode == 0, proc.stderr
        consistent(store)
        keep = {tags[t] for t in tags if t not in doomed}
        assert {k.split("/")[1] for k in store.list("images/")} == keep
        assert set(store.list("layers/")) == {dogestry.layer_index_key(r.diff_id) for h in keep
                                             for r in dogestry.load_stored_image(store, h).layers}
    assert len(set(kills)) > 1  # the kills landed at different points of the runs


# -- racing pushes: the hard part --

def race(docker_host, env, store, family, seconds=30):
    """Push the family's images in turn under one moving tag while gc --grace 10s runs in a loop:
    the images left untagged age into gc's reach, and are pushed again while gc deletes them.
    Return (gc runs that deleted something, push failures)."""
    stop = threading.Event()
    deleting_runs, failures, errors = [], [], []

    def gc_loop():
        while not stop.is_set():
            proc = run_dogestry("gc", store, "--grace", "10s", env=env)
            if proc.returncode != 0 or "Traceback" in proc.stderr:
                errors.append(proc.stderr)
            elif "deleted 0 images, 0 layer records, 0 blobs" not in proc.stdout:
                deleting_runs.append(proc.stdout)

    host = env["DOCKER_HOST"]
    docker_cli(host, "tag", "dggc/a:1", "dggc/moving:1")
    ok(env, "push", store, "dggc/moving:1")  # the store exists before gc looks at it
    thread = threading.Thread(target=gc_loop)
    thread.start()
    deadline = time.monotonic() + seconds
    try:
        for name in itertools.cycle(FAMILY[1:] + FAMILY[0]):  # each untagged for 11 pushes: > 10 s
            if time.monotonic() > deadline:
                break
            tag = "dggc/moving:1"
            docker_cli(host, "tag", "dggc/%s:1" % name, tag)
            proc = run_dogestry("push", store, tag, env=env)
            if proc.returncode != 0:
                assert "push again" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
                failures.append(proc.stderr)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    return deleting_runs, failures


def check_every_tag_pulls_back(docker_host, env, store, family):
    listing = ok(env, "list", store).stdout.splitlines()[1:]
    by_short = {getattr(family, n)[7:19]: getattr(family, n) for n in FAMILY}
    assert listing
    for line in listing:
        name, tag, short = line.split()[:3]
        assert pulls_back(docker_host, env, store, "%s:%s" % (name, tag), by_short[short])


def test_pushes_racing_gc_never_leave_a_tag_without_its_image_on_a_directory(docker_host, docker_env, family,
                                                                             tmp_path):
    store = str(tmp_path / "store")
    deleting_runs, _ = race(docker_host, docker_env, store, family)
    assert deleting_runs  # gc really deleted while pushes ran
    check_every_tag_pulls_back(docker_host, docker_env, store, family)


def test_pushes_racing_gc_never_leave_a_tag_without_its_image_on_s3(docker_host, s3_env, family, bucket):
    store = "s3://%s/race/" % bucket
    deleting_runs, _ = race(docker_host, s3_env, store, family)
    assert deleting_runs
    check_every_tag_pulls_back(docker_host, s3_env, store, family)


# -- radosgw --

def s3_client(rgw, bucket, access_key=None, secret_key=None):
    env = {"AWS_ACCESS_KEY_ID": access_key or rgw.access_key, "AWS_SECRET_ACCESS_KEY": secret_key or rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    return dogestry.S3Client(dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint),
                             dogestry.CredentialChain(config), config)


def wait_until_older_than(client, key, seconds, timeout=60):
    """Wait until S3 itself says KEY is that old (gc judges ages on S3's clock)."""
    deadline = time.monotonic() + timeout
    while client.age(key) < seconds:
        assert time.monotonic() < deadline, "%s never got %s s old" % (key, seconds)
        time.sleep(0.5)


def test_gc_on_s3_deletes_in_batches_and_aborts_old_multipart_uploads(docker_host, rgw, s3_env, family, bucket):
    store = "s3://%s/team/" % bucket
    ok(s3_env, "push", store, "dggc/a:1")
    ok(s3_env, "push", store, "dggc/b:1")
    ok(s3_env, "rm", store, "dggc/b:1")
    client = s3_client(rgw, bucket)
    upload = dogestry._parse_xml(client.call("POST", "team/blobs/sha256/" + "0" * 64, query=[("uploads", "")])[1])
    assert upload.findtext("UploadId")
    wait_until_older_than(client, "team/gc/untagged/" + family.b[7:], 11)

    proc = ok(s3_env, "gc", store, "--grace", "10s")

    assert "deleted 1 images, 1 layer records, 1 blobs" in proc.stdout
    assert "1 leftovers of killed pushes removed" in proc.stdout
    assert client.uploads_under("team/") == []
    keys = [k for k, _ in client.list("team/")]
    assert not any(family.b[7:] in k for k in keys)
    assert pulls_back(docker_host, s3_env, store, "dggc/a:1", family.a)


def test_a_key_that_may_not_delete_gets_one_clear_error(rgw, s3_env, family, bucket):
    store = "s3://%s/" % bucket
    ok(s3_env, "push", store, "dggc/b:1")
    ok(s3_env, "rm", store, "dggc/b:1")
    suffix = uuid.uuid4().hex[:10]
    reader = types.SimpleNamespace(uid="reader-" + suffix, access_key="READER" + suffix.upper(),
                                   secret_key="reader-secret-" + suffix)
    rgw.radosgw_admin("user", "create", "--uid=" + reader.uid, "--display-name=Reader",
                      "--access-key=" + reader.access_key, "--secret-key=" + reader.secret_key)
    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": ["arn:aws:iam:::user/" + reader.uid]},
        "Action": ["s3:ListBucket", "s3:GetObject", "s3:ListBucketMultipartUploads"],
        "Resource": ["arn:aws:s3:::" + bucket, "arn:aws:s3:::%s/*" % bucket]}, {
        "Effect": "Deny", "Principal": {"AWS": ["arn:aws:iam:::user/" + reader.uid]},
        "Action": ["s3:DeleteObject"], "Resource": ["arn:aws:s3:::%s/*" % bucket]}]}).encode()
    owner = s3_client(rgw, bucket)
    owner.call("PUT", query=[("policy", "")], body=lambda: policy, payload_hash=hashlib.sha256(policy).hexdigest(),
               headers={"Content-Length": str(len(policy)), "Content-Type": "application/json"}, ok=(200, 204))
    wait_until_older_than(owner, "gc/untagged/" + family.b[7:], 11)
    env = dict(s3_env, AWS_ACCESS_KEY_ID=reader.access_key, AWS_SECRET_ACCESS_KEY=reader.secret_key)

    line = one_error_line(run_dogestry("gc", store, "--grace", "10s", env=env), "AccessDenied")

    assert "DeleteObjects" in line
    assert owner.age("images/%s/manifest.json" % family.b[7:]) is not None


# -- the one interleaving that matters, forced: gc re-checks an old image, a push refreshes it,
#    gc's delete lands (within its window), the push checks before it tags --

class PausingStore(dogestry.LocalStore):
    """A directory store whose deletes wait (at most `hold` seconds) until another thread has
    refreshed something, and land `in_flight` seconds after that: the interleaving above, made
    certain."""

    def __init__(self, root, hold, in_flight):
        super().__init__(root)
        self.hold, self.in_flight = hold, in_flight
        self.touched, self.rechecked = threading.Event(), threading.Event()

    def touch(self, key):
        self.touched.set()
        return super().touch(key)

    def delete_many(self, keys, racing_writes_win=False):
        self.rechecked.set()
        if self.touched.wait(self.hold):
            time.sleep(self.in_flight)  # the delete is on its way while the push refreshes everything
        super().delete_many(keys, racing_writes_win)


def test_a_push_that_refreshes_an_image_a_gc_is_deleting_never_tags_it_half_gone(docker_host, docker_env, family,
                                                                                  tmp_path):
    root = tmp_path / "store"
    ok(docker_env, "push", root, "dggc/a:1")
    ok(docker_env, "push", root, "dggc/b:1")
    ok(docker_env, "rm", root, "dggc/b:1")
    age_store(root)  # b: untagged long ago, every object of it old
    store = PausingStore(str(root), hold=30, in_flight=0.4 * dogestry.GC_RECHECK_WINDOW)
    progress = dogestry.Progress(open(os.devnull, "w"), quiet=True)
    gc = threading.Thread(target=dogestry.collect_garbage, args=(store, HOUR, progress))
    gc.start()
    assert store.rechecked.wait(30)  # gc found b's record old and is about to delete it
    docker = dogestry.DockerClient(dogestry.docker_endpoint(docker_env["DOCKER_HOST"], docker_env, str(tmp_path)))

    dogestry.push_image(docker, store, "dggc/b:1", progress, dogestry.PushOptions(gc_min_grace=float(MIN_GRACE)))
    gc.join()

    assert store.touched.is_set()  # the push did refresh what it found old
    consistent(store)              # and pushed again what gc took: the tag's image is whole
    assert pulls_back(docker_host, docker_env, str(root), "dggc/b:1", family.b)


def test_the_shortest_grace_is_ten_minutes_unless_tests_say_otherwise(docker_env, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    env = {k: v for k, v in docker_env.items() if k != "DOGESTRY_GC_MIN_GRACE"}
    one_error_line(run_dogestry("gc", store, "--grace", "9m", env=env), "at least 10m")
    assert run_dogestry("gc", store, "--grace", "10m", env=env).returncode == 0
    one_error_line(run_dogestry("gc", store, env=dict(env, DOGESTRY_GC_MIN_GRACE="soon")), "DOGESTRY_GC_MIN_GRACE")


def test_touch_on_s3_makes_an_object_young_without_moving_its_bytes(rgw, bucket):
    client = s3_client(rgw, bucket)
    store = dogestry.S3Store(dogestry.S3Location(bucket, "t/", "us-east-1", rgw.endpoint), client)
    store.put_bytes("layers/x.json", b'{"some": "record"}\n')
    wait_until_older_than(client, "t/layers/x.json", 2)

    assert store.touch("layers/x.json")

    assert store.age("layers/x.json") < 2
    assert store.get_bytes("layers/x.json") == b'{"some": "record"}\n'
    assert not store.touch("layers/missing.json")


def test_a_push_that_finds_its_layer_blob_stored_but_unnamed_refreshes_it(docker_env, family, tmp_path):
    store = tmp_path / "store"
    ok(docker_env, "push", store, "dggc/a:1")
    for path in list((store / "layers").iterdir()) + list((store / "images").rglob("*.json")):
        path.unlink()  # what a killed gc (or push) can leave: blobs no index entry names
    age_store(store)
    blobs = sorted((store / "blobs" / "sha256").iterdir())

    ok(docker_env, "push", store, "dggc/a:1")

    assert sorted((store / "blobs" / "sha256").iterdir()) == blobs  # the same blobs...
    assert all(time.time() - p.stat().st_mtime < 60 for p in blobs)  # ...but each made young for gc
    ok(docker_env, "gc", store)
    assert pulls_back(docker_env["DOCKER_HOST"], docker_env, str(store), "dggc/a:1", family.a)


def test_deletes_that_race_writes_of_their_keys_never_fail_on_radosgw(rgw, bucket):
    """radosgw answers a DeleteObjects key whose object is being written at that moment with its own
    UnknownError: a plain delete sends such keys again (rm), gc's leaves them as the write made them
    (someone relies on them); neither fails, and with the writers gone the keys are deleted."""
    client = s3_client(rgw, bucket)
    keys = ["race/%d" % i for i in range(20)]
    data = b"x" * 1000
    stop, raced = threading.Event(), []

    def writer():
        while not stop.is_set():
            for key in keys:
                client.put(key, lambda: data, len(data), hashlib.sha256(data).hexdigest())

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(150):
            raced.extend(code for _, code in client._delete_batch(keys))  # what radosgw answers, for the record
            client.delete_many(keys)
            client.delete_many(keys, racing_writes_win=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert raced and set(raced) == {"UnknownError"}  # the race happened, and that is how radosgw says so
    client.delete_many(keys)
    assert [k for k, _ in client.list("race/")] == []
