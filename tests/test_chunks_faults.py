"""Chunked layers under S3 faults: dogestry against radosgw through the fault-injecting proxy
(tests/faultproxy.py), as tests/test_s3_faults.py does for layers stored whole."""

import json
import threading
import time
import uuid

import pytest

from faultproxy import Reset, s3_error
from realdocker import build_image, docker_cli, image_id, ok, one_error_line, random_bytes, run_dogestry
from test_command_line import s3_store
from test_s3_faults import push_interrupted_at_once

pytestmark = pytest.mark.integration


def via(env, proxy):
    """A copy of ENV that sends dogestry's S3 requests through PROXY."""
    return dict(env, AWS_ENDPOINT_URL=proxy.url)


def layer_files():
    """A new layer's files (~24 MiB, stored chunked), and the token that names its image."""
    token = uuid.uuid4().hex[:10]
    return {"data/f%02d.bin" % n: random_bytes(768 << 10, int(token, 16) + n) for n in range(32)}, token


def chunked_image(docker_host, tmp_path):
    """A new image whose one layer (~24 MiB of files) is stored chunked; (ref, image ID)."""
    files, token = layer_files()
    ref = "dgchunkfault/app%s:1" % token[:6]
    return ref, build_image(docker_host, ref, [files], workdir=tmp_path)


def chunk_requests(proxy, method):
    return [e for e in proxy.log if e["method"] == method and "/chunks/sha256/" in e["path"]]


def test_chunk_uploads_that_fail_once_are_retried_and_the_image_pulls_back(docker_host, s3_env, bucket,
                                                                          fault_proxy, tmp_path):
    """Every chunk's first PUT gets a 500 or a reset: the push retries each and succeeds; a pull whose
    first GET of each chunk is reset resumes, and loads the same image."""
    ref, image = chunked_image(docker_host, tmp_path)
    url = "s3://%s/chunkfaults/" % bucket

    def flaky(req):
        if "/chunks/sha256/" in req.path and req.attempt == 1:
            if req.method == "PUT":
                return s3_error(500, "InternalError", "try again") if hash(req.path) % 2 else Reset(0.0)
            if req.method == "GET":
                return Reset(0.5)
        return None

    proxy = fault_proxy(flaky)
    ok(run_dogestry("push", url, ref, env=via(s3_env, proxy)))
    puts = chunk_requests(proxy, "PUT")
    refused = {e["path"] for e in puts if e["attempt"] == 1 and e["status"] == 500}
    assert len({e["path"] for e in puts}) >= 12 and refused
    assert all(any(e["path"] == path and e["attempt"] > 1 for e in puts) for path in refused)  # each sent again
    docker_cli(docker_host, "rmi", "-f", ref)
    ok(run_dogestry("pull", url, ref, env=via(s3_env, proxy)))
    assert image_id(docker_host, ref) == image


def test_a_chunk_refused_for_good_fails_the_push_with_one_line_and_no_tag(docker_host, s3_env, rgw, bucket,
                                                                          fault_proxy, tmp_path):
    ref, _ = chunked_image(docker_host, tmp_path)
    url = "s3://%s/chunkdenied/" % bucket

    def deny(req):
        if req.method == "PUT" and "/chunks/sha256/" in req.path:
            return s3_error(403, "AccessDenied", "Access Denied", req.path)
        return None

    proc = run_dogestry("push", url, ref, env=via(s3_env, fault_proxy(deny)))
    one_error_line(proc, "AccessDenied")
    listed = ok(run_dogestry("list", url, env=s3_env)).stdout
    assert ref.split(":")[0] not in listed


def test_ctrl_c_during_a_chunked_push_ends_in_two_seconds_with_no_tag(docker_host, s3_env, bucket, fault_proxy,
                                                                      tmp_path):
    """Ctrl-C with chunk uploads in flight and more queued: exit 130 within 2 s, no tag."""
    started = threading.Event()

    def slow_chunks(req):
        if req.method == "PUT" and "/chunks/sha256/" in req.path:
            started.set()
            time.sleep(3.0)
        return None

    proxy = fault_proxy(slow_chunks)
    ref, _ = chunked_image(docker_host, tmp_path)
    url = "s3://%s/chunkint/" % bucket
    push_interrupted_at_once(url, ref, via(s3_env, proxy), started, "no chunk upload began")
    listed = ok(run_dogestry("list", url, env=s3_env)).stdout
    assert ref.split(":")[0] not in listed


# --- A rebuilt image: the chunks its repository's newest image names are not asked about -----

@pytest.fixture(scope="module")
def rebuilt(docker_host, tmp_path_factory):
    """Two builds of one repository's ~24 MiB layer, the second with one file edited: (ref1, ref2, its ID)."""
    tmp_path = tmp_path_factory.mktemp("rebuilt")
    files, token = layer_files()
    first = "dgchunkhint/app%s:1" % token[:6]
    build_image(docker_host, first, [files], workdir=tmp_path)
    edited = bytearray(files["data/f09.bin"])
    edited[1000:1016] = b"edited by a test"
    second = first[:-1] + "2"
    return first, second, build_image(docker_host, second, [dict(files, **{"data/f09.bin": bytes(edited)})],
                                      workdir=tmp_path)


def test_a_rebuilt_image_asks_s3_only_about_the_chunks_its_repositorys_newest_image_lacks(
        docker_host, s3_env, bucket, fault_proxy, rebuilt):
    """app:2 differs from app:1 in one file: its push reads app:1's recipe, asks about (HEAD) and
    sends only the chunks that recipe does not name, and the image pulls back the same."""
    first, second, image = rebuilt
    url = "s3://%s/hints/" % bucket
    ok(run_dogestry("push", url, first, env=s3_env))
    proxy = fault_proxy()
    pushed = ok(run_dogestry("push", "--json", url, second, env=via(s3_env, proxy)))
    [doc] = json.loads(pushed.stdout)["images"]
    heads, puts = chunk_requests(proxy, "HEAD"), chunk_requests(proxy, "PUT")
    assert doc["chunks_skipped"] >= 20 and 1 <= doc["chunks_sent"] <= 2
    assert len(puts) == doc["chunks_sent"]
    assert len(heads) == doc["chunks_sent"], [e["path"] for e in heads]  # only the new chunks were asked about
    docker_cli(docker_host, "rmi", "-f", second)
    ok(run_dogestry("pull", url, second, env=s3_env))
    assert image_id(docker_host, second) == image


def test_a_push_relying_on_a_recipe_a_gc_deletes_meanwhile_writes_no_tag(s3_env, rgw, bucket, fault_proxy, rebuilt):
    """The recipe app:2's push relies on (app:1's, older than a quarter of the gc grace) and its chunks
    are deleted while app:2's new chunk is being sent: the push checks the recipe before its tag,
    fails with one line, and writes no tag (never a tag whose chunks are gone)."""
    first, second, _ = rebuilt
    url = "s3://%s/hintgone/" % bucket
    env = dict(s3_env, DOGESTRY_GC_MIN_GRACE="10")
    ok(run_dogestry("push", url, first, env=env))
    store = s3_store(rgw, bucket, "hintgone/")
    [recipe] = [k for k in store.list("blobs/sha256/") if store.stat(k) < (1 << 20)
                and store.get_bytes(k, limit=1 << 20)[:2] == b"\x1f\x8b"]
    while store.age(recipe) < 4.0:  # older than a quarter of the grace: a push must check it
        time.sleep(0.2)
    gone = threading.Event()

    def gc_meanwhile(req):
        if req.method == "PUT" and "/chunks/sha256/" in req.path and not gone.is_set():
            store.delete_many([recipe] + list(store.list("chunks/sha256/")))
            gone.set()
        return None

    proc = run_dogestry("push", url, second, env=via(env, fault_proxy(gc_meanwhile)))
    assert gone.is_set()
    one_error_line(proc, recipe)
    assert store.stat("repositories/%s" % second.replace(":", "/")) is None



def test_copy_of_a_rebuilt_image_asks_the_destination_only_about_chunks_it_lacks(docker_host, s3_env, bucket,
                                                                                fault_proxy, rebuilt):
    """copy of app:2 into a bucket that holds app:1 reads app:1's recipe there and asks about (HEAD)
    and copies only the chunks it does not name; the copied tag pulls the same image."""
    first, second, image = rebuilt
    src, dst = "s3://%s/copysrc/" % bucket, "s3://%s/copydst/" % bucket
    for ref in (first, second):
        ok(run_dogestry("push", src, ref, env=s3_env))
    ok(run_dogestry("copy", src, dst, first, env=s3_env))
    proxy = fault_proxy()
    copied = ok(run_dogestry("copy", "--json", src, dst, second, env=via(s3_env, proxy)))
    doc = json.loads(copied.stdout)
    asked = [e for e in chunk_requests(proxy, "HEAD") if "/copydst/" in e["path"]]
    assert doc["chunks_skipped"] >= 20 and 1 <= doc["chunks_sent"] <= 2
    assert len(asked) == doc["chunks_sent"], [e["path"] for e in asked]
    docker_cli(docker_host, "rmi", "-f", second)
    ok(run_dogestry("pull", dst, second, env=s3_env))
    assert image_id(docker_host, second) == image


def test_import_of_a_rebuilt_image_given_its_tag_asks_only_about_chunks_the_store_lacks(
        docker_host, s3_env, bucket, fault_proxy, rebuilt, tmp_path):
    """`import STORE app2.tar app:2` into a store holding app:1: the import reads app:1's recipe (the
    repository's newest tag) and asks about (HEAD) only the chunks it does not name."""
    first, second, image = rebuilt
    url = "s3://%s/hintimport/" % bucket
    ok(run_dogestry("push", url, first, env=s3_env))
    archive = tmp_path / "app2.tar"
    docker_cli(docker_host, "save", "-o", str(archive), second)
    proxy = fault_proxy()
    ok(run_dogestry("import", url, str(archive), second, env=via(s3_env, proxy)))
    heads, puts = chunk_requests(proxy, "HEAD"), chunk_requests(proxy, "PUT")
    assert 1 <= len(puts) <= 2
    assert len(heads) == len(puts), [e["path"] for e in heads]
    docker_cli(docker_host, "rmi", "-f", second)
    ok(run_dogestry("pull", url, second, env=s3_env))
    assert image_id(docker_host, second) == image
