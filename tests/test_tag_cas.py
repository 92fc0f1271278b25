"""Compare-and-swap writes of the store seam: read_versioned gives a key's bytes and a version,
put_if_version writes only over that version (or only where the key is absent), so writers that
read, change and write one key at the same time never lose each other's updates -- on a real
radosgw (S3 If-Match / If-None-Match) and on a directory store (flock of the key's directory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dogestry
from faultproxy import s3_error

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
KEY = "repositories/dgcas/app/1"
WRITERS, ROUNDS = 8, 25


def s3_store(endpoint, access_key, secret_key, bucket):
    """An S3 store of the bucket, through ENDPOINT (radosgw, or a proxy in front of it)."""
    env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, "", "us-east-1", endpoint)
    return dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))


@pytest.fixture(params=["directory", "radosgw"])
def store(request, tmp_path):
    """A fresh store: a directory, or a bucket of the test radosgw."""
    if request.param == "directory":
        return dogestry.LocalStore(str(tmp_path / "store"))
    rgw, bucket = request.getfixturevalue("rgw"), request.getfixturevalue("bucket")
    return s3_store(rgw.endpoint, rgw.access_key, rgw.secret_key, bucket)


# A writer process: opens the store, says "ready", waits for "go", then appends its entries to the
# JSON list at KEY one read-modify-write at a time; prints how many attempts the writes took.
WRITER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import dogestry
url, bucket, name, rounds = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
if bucket:
    config = dogestry.AwsConfig(os.environ, "/nonexistent")
    location = dogestry.S3Location(bucket, "", "us-east-1", url)
    store = dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))
else:
    store = dogestry.LocalStore(url)
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
attempts = 0
for n in range(rounds):
    entry = "%s-%d" % (name, n)
    def append(current):
        global attempts
        attempts += 1
        items = json.loads(current) if current is not None else []
        return current if entry in items else json.dumps(items + [entry]).encode()
    dogestry.swap_versioned(store, sys.argv[6], append, "the list", attempts=10000)
print("attempts", attempts, flush=True)
"""


def run_writers(store, environ, count, rounds):
    """COUNT writer processes appending ROUNDS entries each to KEY, all let go at once; the total
    number of attempts they took."""
    if isinstance(store, dogestry.S3Store):
        url, bucket = store.client.endpoint, store.location.bucket
    else:
        url, bucket = store.root, ""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), url, bucket, "w%d" % i, str(rounds), KEY],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=environ, text=True) for i in range(count)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        total = 0
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            total += int(out.split()[-1])
        return total
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def writer_env(store, request):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if isinstance(store, dogestry.S3Store):
        rgw = request.getfixturevalue("rgw")
        env.update(AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
                   AWS_EC2_METADATA_DISABLED="true")
    return env


def test_concurrent_read_modify_write_loses_no_update(store, request):
    """Eight processes appending to one JSON list at once, each write conditional on the version it
    read, end with every entry in the list exactly once -- and they did collide (retries happened)."""
    store.ensure()

    attempts = run_writers(store, writer_env(store, request), WRITERS, ROUNDS)

    entries = json.loads(store.get_bytes(KEY))
    assert sorted(entries) == sorted("w%d-%d" % (w, n) for w in range(WRITERS) for n in range(ROUNDS))
    assert attempts > WRITERS * ROUNDS  # some writes lost their race and were made again from a fresh read


def test_a_write_over_a_stale_version_is_refused(store):
    """put_if_version writes over the version read; once the key changed, that version no longer
    works and the key keeps the newer bytes."""
    store.ensure()
    assert store.put_if_version(KEY, b"one", None)
    data, first = store.read_versioned(KEY)
    assert data == b"one"
    assert store.put_if_version(KEY, b"two", first)
    data, second = store.read_versioned(KEY)

    assert store.put_if_version(KEY, b"three", first) is False

    assert data == b"two" and second != first
    assert store.read_versioned(KEY) == (b"two", second)


def test_a_write_only_if_absent_is_refused_when_the_key_exists(store):
    """put_if_version with no version creates the key, and is refused once the key is there."""
    store.ensure()
    with pytest.raises(dogestry.NotFound):
        store.read_versioned(KEY)
    assert store.put_if_version(KEY, b"first", None)

    assert store.put_if_version(KEY, b"second", None) is False

    assert store.read_versioned(KEY)[0] == b"first"


def test_a_delete_of_a_stale_version_is_refused(store):
    """delete_if_version removes the key only while it holds the version read."""
    store.ensure()
    store.put_if_version(KEY, b"one", None)
    _, old = store.read_versioned(KEY)
    store.put_if_version(KEY, b"two", old)
    _, current = store.read_versioned(KEY)

    assert store.delete_if_version(KEY, old) is False
    assert store.read_versioned(KEY)[0] == b"two"
    assert store.delete_if_version(KEY, current) is True

    with pytest.raises(dogestry.NotFound):
        store.read_versioned(KEY)


def test_swap_versioned_retries_from_a_fresh_read_and_writes_nothing_unchanged(store):
    """swap_versioned applies its change to what the key holds now; a change that leaves the bytes
    as they are writes nothing; a change to None removes the key."""
    store.ensure()
    seen = []

    def add(item):
        def change(current):
            seen.append(current)
            items = json.loads(current) if current is not None else []
            return json.dumps(items + [item]).encode()
        return change

    dogestry.swap_versioned(store, KEY, add("a"), "the list")
    dogestry.swap_versioned(store, KEY, add("b"), "the list")
    _, version = store.read_versioned(KEY)
    assert dogestry.swap_versioned(store, KEY, lambda current: current, "the list") == b'["a", "b"]'
    assert store.read_versioned(KEY)[1] == version
    assert dogestry.swap_versioned(store, KEY, lambda current: None, "the list") is None

    assert seen == [None, b'["a"]']
    with pytest.raises(dogestry.NotFound):
        store.read_versioned(KEY)


def test_a_key_that_keeps_changing_ends_the_swap_with_a_clear_error(store):
    """A change that never gets its write in (another writer changes the key every time) gives up
    after the attempts allowed, saying so."""
    store.ensure()
    store.put_if_version(KEY, b"0", None)

    def change(current):
        data, version = store.read_versioned(KEY)
        store.put_if_version(KEY, str(int(data) + 1).encode(), version)  # someone else got there first
        return current + b"!"

    with pytest.raises(dogestry.SwapConflict, match="changed under every one of 3 attempts"):
        dogestry.swap_versioned(store, KEY, change, "tag dgcas/app:1", sleep=lambda s: None, attempts=3)
    assert store.read_versioned(KEY)[0] == b"3"


def test_directory_store_leaves_no_lock_or_temp_files_among_the_tags(tmp_path):
    """The directory store locks the tag's directory itself: after swaps, the directory holds the
    tags and nothing else."""
    store = dogestry.LocalStore(str(tmp_path / "store"))
    for tag in ("1", "2"):
        key = "repositories/dgcas/app/" + tag
        dogestry.swap_versioned(store, key, lambda current: b"a", "tag")
        dogestry.swap_versioned(store, key, lambda current: current + b"b", "tag")

    assert sorted(os.listdir(tmp_path / "store" / "repositories" / "dgcas" / "app")) == ["1", "2"]
    assert store.get_bytes("repositories/dgcas/app/1") == b"ab"


def test_an_s3_store_without_conditional_writes_is_refused_not_overwritten(rgw, bucket, fault_proxy):
    """A store that answers 501 NotImplemented to If-Match / If-None-Match gets no unconditional
    write instead: the update fails with an error saying the store cannot do it."""
    def no_conditions(req):
        if req.method == "PUT" and ("if-match" in req.headers or "if-none-match" in req.headers):
            return s3_error(501, "NotImplemented", "A header you provided implies functionality that is not "
                            "implemented", req.path)
        return None

    proxy = fault_proxy(no_conditions)
    store = s3_store(proxy.url, rgw.access_key, rgw.secret_key, bucket)

    with pytest.raises(dogestry.StoreError, match="cannot write an object only if it is unchanged"):
        dogestry.swap_versioned(store, KEY, lambda current: b"new", "tag dgcas/app:1")

    assert store.stat(KEY) is None


def test_a_concurrent_conditional_write_conflict_is_retried_from_a_fresh_read(rgw, bucket, fault_proxy):
    """S3's 409 ConditionalRequestConflict (another conditional write of the key in flight) counts as
    a lost race: swap_versioned reads the key again and its next write goes through."""
    conflicts = []

    def first_put_conflicts(req):
        if req.method == "PUT" and req.key == KEY and not conflicts:
            conflicts.append(req.n)
            return s3_error(409, "ConditionalRequestConflict", "A conflicting operation occurred", req.path)
        return None

    proxy = fault_proxy(first_put_conflicts)
    store = s3_store(proxy.url, rgw.access_key, rgw.secret_key, bucket)
    reads = []

    def change(current):
        reads.append(current)
        return b"written"

    assert dogestry.swap_versioned(store, KEY, change, "tag dgcas/app:1", sleep=lambda s: None) == b"written"

    assert len(conflicts) == 1 and reads == [None, None]
    assert store.read_versioned(KEY)[0] == b"written"
