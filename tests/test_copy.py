"""`dogestry copy SRC DST IMAGE... | --all`: images from one store to another, real dockerd and radosgw.

What users get: only the blobs DST lacks are sent; tags are written last, so an interrupted copy
leaves no tag (run it again: only what is missing is sent); between two S3 stores on the same
endpoint the blobs are copied by S3 itself (CopyObject: no layer bytes through the machine);
images of the original dogestry layout arrive in the current layout; `?profile=NAME` picks the
credentials of each store; stdout has `Copied NAME:TAG (sha256:<hex>)` per tag.

S3 traffic is watched through a FaultProxy (tests/faultproxy.py) in front of radosgw, which
records every request and injects the faults a rule asks for.
"""

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket
from faultproxy import s3_error
from realdocker import (DOGESTRY, build_image, client_env, docker_cli, image_id, image_layers, ok, one_error_line,
                        random_bytes, run_dogestry, text_bytes)

pytestmark = pytest.mark.integration

WAIT = 30.0  # the longest a test waits for something the copy is expected to do


# --- images and stores ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def origin(docker_host, tmp_path_factory):
    """A directory store with dgcopy/base:1 (a 256 KiB random and a 64 KiB text layer) and
    dgcopy/app:1 = dgcopy/app:2 (the same two layers plus a 2 MiB random one), pushed once."""
    work = tmp_path_factory.mktemp("copy")
    token = uuid.uuid4().hex[:8]
    seed = int(token, 16)
    l0 = {"base/lib.bin": random_bytes(256 << 10, seed)}
    l1 = {"base/words.txt": text_bytes(64 << 10, seed + 1)}
    l2 = {"app/data.bin": random_bytes(2 << 20, seed + 2)}
    base = build_image(docker_host, "dgcopy/base:1", [l0, l1], workdir=work, extra_lines=["LABEL t=" + token])
    app = build_image(docker_host, "dgcopy/app:1", [l0, l1, l2], workdir=work, extra_lines=["LABEL app=" + token])
    docker_cli(docker_host, "tag", app, "dgcopy/app:2")
    store = work / "origin"
    (work / "origin-link").symlink_to(store)
    ok(run_dogestry("push", store, "dgcopy/base:1", "dgcopy/app:1", "dgcopy/app:2", env=client_env(docker_host)))
    return types.SimpleNamespace(store=store, base=base, app=app, work=work)


def manifest(store, image):
    return json.loads((Path(store) / "images" / image[7:] / "manifest.json").read_text())


def blob_hexes(store, image):
    """The blob names (hex) of IMAGE's layers in a directory store, bottom layer first."""
    return [layer["digest"][7:] for layer in manifest(store, image)["layers"]]


def files(store):
    return sorted(str(p.relative_to(store)) for p in Path(store).rglob("*") if p.is_file())


def copied(ref, image):
    return "Copied %s (%s)" % (ref, image)


def fresh_pull(docker_host, env, store, ref, image):
    """Remove IMAGE from the engine, pull REF from STORE; the ID it arrives as (dockerd checks every diffID)."""
    docker_cli(docker_host, "rmi", "-f", image, check=False)
    assert image_id(docker_host, image) is None
    ok(run_dogestry("pull", store, ref, env=env))
    return image_id(docker_host, ref)


# --- S3 helpers ----------------------------------------------------------------------------------

def s3_client(rgw, bucket, access_key=None, secret_key=None):
    """An in-process client straight to radosgw (no proxy)."""
    env = {"AWS_ACCESS_KEY_ID": access_key or rgw.access_key, "AWS_SECRET_ACCESS_KEY": secret_key or rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    return dogestry.S3Client(dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint),
                             dogestry.CredentialChain(config), config)


def s3_keys(client, prefix):
    return {key[len(prefix):] for key, _ in client.list(prefix)}


def via(env, proxy):
    return dict(env, AWS_ENDPOINT_URL=proxy.url)


def copy_source(entry):
    """The source key (bucket/key) of a CopyObject request, or None."""
    source = entry["headers"].get("x-amz-copy-source")
    return urllib.parse.unquote(source.split("?")[0]).lstrip("/") if source else None


def blob_puts(proxy, prefix):
    """Blob names (hex) PUT under PREFIX, in order; a CopyObject of an object onto itself (a
    refresh that keeps an old blob young) is not a transfer and is left out."""
    out = []
    for e in proxy.log:
        if e["method"] != "PUT" or not e["key"].startswith(prefix + "blobs/sha256/"):
            continue
        if copy_source(e) == e["path"].lstrip("/"):
            continue
        out.append(e["key"][len(prefix + "blobs/sha256/"):])
    return out


def body_bytes(proxy):
    """Request and response body bytes that went through the proxy."""
    sent = sum(int(e["headers"].get("content-length") or 0) for e in proxy.log)
    return sent + sum(e["body_sent"] or 0 for e in proxy.log)


def copy_to_s3(env, src, url, *refs):
    """Set-up: copy REFS straight to radosgw (env's endpoint)."""
    return ok(run_dogestry("copy", src, url, *refs, env=env))


def wait_for(condition, timeout=WAIT):
    """Poll CONDITION (something another process or thread does) until true; False on timeout."""
    deadline, pause = time.monotonic() + timeout, threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.02)
    return True


def put_done(proxy, key):
    """True once radosgw has answered 200 to a PUT of KEY through PROXY."""
    return any(e["method"] == "PUT" and e["key"] == key and e["status"] == 200 for e in list(proxy.log))


# --- 1. directory -> S3 -> directory -------------------------------------------------------------

def test_directory_to_bucket_to_directory_pulls_the_same_image(docker_host, s3_env, rgw, origin, bucket, tmp_path):
    """An image copied dir -> S3 -> dir pulls into the engine with its original ID; each copy
    prints `Copied NAME:TAG (ID)` and writes the tag in DST."""
    url = "s3://%s/team/" % bucket
    first = ok(run_dogestry("copy", origin.store, url, "dgcopy/app:1", env=s3_env))
    assert first.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    client = s3_client(rgw, bucket)
    assert client.get("team/repositories/dgcopy/app/1").read().decode().strip() == origin.app[7:]
    assert {"blobs/sha256/" + h for h in blob_hexes(origin.store, origin.app)} <= s3_keys(client, "team/")

    final = tmp_path / "final"
    second = ok(run_dogestry("copy", url, final, "dgcopy/app:1", env=s3_env))

    assert second.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    assert (final / "repositories" / "dgcopy" / "app" / "1").read_text().strip() == origin.app[7:]
    assert blob_hexes(final, origin.app) == blob_hexes(origin.store, origin.app)  # blobs as stored, not redone
    assert fresh_pull(docker_host, s3_env, final, "dgcopy/app:1", origin.app) == origin.app


# --- 2. S3 -> S3 on one endpoint: CopyObject -----------------------------------------------------

def test_bucket_to_bucket_on_one_endpoint_sends_no_layer_bytes(docker_host, s3_env, rgw, origin, fault_proxy):
    """Between two buckets of one S3 endpoint the blobs are copied by S3 itself (CopyObject):
    what passes through the machine is a few KB of documents, not the 2.3 MiB of layers."""
    suffix = uuid.uuid4().hex[:10]
    src_bucket, dst_bucket = make_bucket(rgw, "dgcopy-src-" + suffix), make_bucket(rgw, "dgcopy-dst-" + suffix)
    copy_to_s3(s3_env, origin.store, "s3://%s/img/" % src_bucket, "dgcopy/app:1")
    proxy = fault_proxy()
    endpoint = urllib.parse.quote(proxy.url, safe="")
    # the URLs name the proxy; AWS_ENDPOINT_URL (radosgw itself) must not be used for them
    src, dst = ("s3://%s/img/?endpoint=%s" % (b, endpoint) for b in (src_bucket, dst_bucket))

    proc = ok(run_dogestry("copy", src, dst, "dgcopy/app:1", env=s3_env))

    assert proc.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    hexes = blob_hexes(origin.store, origin.app)
    blob_writes = [e for e in proxy.log if e["method"] == "PUT" and "/blobs/sha256/" in e["path"]]
    assert sorted(blob_puts(proxy, "img/")) == sorted(hexes)
    assert {(copy_source(e), e["path"]) for e in blob_writes} == {
        ("%s/img/blobs/sha256/%s" % (src_bucket, h), "/%s/img/blobs/sha256/%s" % (dst_bucket, h)) for h in hexes}
    assert not [e for e in proxy.log if e["method"] == "GET" and "/blobs/sha256/" in e["path"]]
    layer_bytes = sum(layer["size"] for layer in manifest(origin.store, origin.app)["layers"])
    assert layer_bytes > 2 << 20
    assert body_bytes(proxy) < 128 << 10, [(e["method"], e["key"], e["headers"].get("content-length"),
                                            e["body_sent"]) for e in proxy.log]
    assert fresh_pull(docker_host, s3_env, "s3://%s/img/" % dst_bucket, "dgcopy/app:1", origin.app) == origin.app


# --- 3. only what DST lacks ----------------------------------------------------------------------

def test_only_the_blobs_dst_lacks_are_sent_and_a_repeated_copy_sends_none(s3_env, rgw, origin, bucket, fault_proxy):
    """DST already has the base image: copying an image built on it sends its one new layer;
    copying it again sends no blob at all."""
    url = "s3://%s/shared/" % bucket
    copy_to_s3(s3_env, origin.store, url, "dgcopy/base:1")
    app_blobs = blob_hexes(origin.store, origin.app)
    assert app_blobs[:2] == blob_hexes(origin.store, origin.base)  # the layers they share
    first = fault_proxy()

    proc = ok(run_dogestry("copy", origin.store, url, "dgcopy/app:1", env=via(s3_env, first)))

    assert proc.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    assert blob_puts(first, "shared/") == [app_blobs[2]]
    sent = [int(e["headers"].get("x-amz-decoded-content-length") or e["headers"]["content-length"])
            for e in first.log if e["method"] == "PUT" and "/blobs/sha256/" in e["path"]]
    assert sent == [manifest(origin.store, origin.app)["layers"][2]["size"]]

    again = fault_proxy()
    proc = ok(run_dogestry("copy", origin.store, url, "dgcopy/app:1", env=via(s3_env, again)))

    assert proc.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    assert blob_puts(again, "shared/") == []
    client = s3_client(rgw, bucket)
    assert client.get("shared/repositories/dgcopy/app/1").read().decode().strip() == origin.app[7:]
    assert client.get("shared/repositories/dgcopy/base/1").read().decode().strip() == origin.base[7:]


# --- 4. faults and resume ------------------------------------------------------------------------

def test_failing_puts_are_retried_and_the_copy_completes(docker_host, s3_env, rgw, origin, bucket, fault_proxy):
    """Every PUT first gets a 500 InternalError, and each blob PUT then a 503 SlowDown: the copy
    retries them and the image pulls back exact."""
    def rule(req):
        if req.method == "PUT" and req.attempt == 1:
            return s3_error(500, "InternalError", "We encountered an internal error.", req.path)
        if req.method == "PUT" and "/blobs/sha256/" in req.path and req.attempt == 2:
            return s3_error(503, "SlowDown", "Please reduce your request rate.", req.path)
        return None

    proxy = fault_proxy(rule)
    url = "s3://%s/flaky/" % bucket

    proc = ok(run_dogestry("copy", origin.store, url, "dgcopy/app:1", env=via(s3_env, proxy)))

    assert proc.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    refused = [e for e in proxy.log if e["action"] == "reply"]
    assert {e["status"] for e in refused} == {500, 503}
    assert {e["key"] for e in refused if e["status"] == 503} == {
        "flaky/blobs/sha256/" + h for h in blob_hexes(origin.store, origin.app)}
    for key in {e["key"] for e in refused}:  # each was sent again until radosgw stored it
        assert put_done(proxy, key), key
    assert fresh_pull(docker_host, s3_env, url, "dgcopy/app:1", origin.app) == origin.app


@pytest.mark.parametrize("how", ["refused", "killed"])
def test_an_interrupted_copy_leaves_no_tag_and_the_next_sends_only_what_is_missing(how, s3_env, rgw, origin,
                                                                                  bucket, fault_proxy):
    """The 2 MiB blob's PUT is refused for good (403) or the copy is killed (SIGKILL) while that
    PUT is in flight, after the other blobs were stored: DST gets no tag; the next copy sends
    only the blob that did not arrive, then tags."""
    prefix = "resume-%s/" % how
    url = "s3://%s/%s" % (bucket, prefix)
    hexes = blob_hexes(origin.store, origin.app)
    big, others = hexes[-1], hexes[:-1]
    held, release = threading.Event(), threading.Event()
    proxies = []

    def others_stored():
        return all(put_done(proxies[0], prefix + "blobs/sha256/" + h) for h in others)

    def rule(req):
        if req.method == "PUT" and req.key == prefix + "blobs/sha256/" + big:
            held.set()
            if how == "killed":
                release.wait(WAIT)
                return s3_error(503, "SlowDown", "Please reduce your request rate.", req.path)
            wait_for(others_stored)
            return s3_error(403, "AccessDenied", "Access Denied", req.path)
        return None

    proxies.append(fault_proxy(rule))
    env = via(s3_env, proxies[0])
    if how == "refused":
        one_error_line(run_dogestry("copy", origin.store, url, "dgcopy/app:1", env=env), "AccessDenied")
    else:
        proc = subprocess.Popen([sys.executable, str(DOGESTRY), "copy", str(origin.store), url, "dgcopy/app:1"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        try:
            assert held.wait(WAIT) and wait_for(others_stored), proxies[0].log
            proc.send_signal(signal.SIGKILL)
        finally:
            out, err = proc.communicate(timeout=WAIT)
            release.set()
        assert proc.returncode == -signal.SIGKILL and out == "", err

    client = s3_client(rgw, bucket)
    after = s3_keys(client, prefix)
    assert not [k for k in after if k.startswith("repositories/")]
    stored = {k[len("blobs/sha256/"):] for k in after if k.startswith("blobs/sha256/")}
    assert set(others) <= stored and big not in stored

    again = fault_proxy()
    proc = ok(run_dogestry("copy", origin.store, url, "dgcopy/app:1", env=via(s3_env, again)))

    assert proc.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    assert blob_puts(again, prefix) == [big]
    assert client.get(prefix + "repositories/dgcopy/app/1").read().decode().strip() == origin.app[7:]


# --- 5. --all, and the original layout -----------------------------------------------------------

def test_all_copies_every_tag(docker_env, origin, tmp_path):
    """--all: every tag of SRC arrives in DST, pointing at the same image; one line per tag."""
    dst = tmp_path / "all"

    proc = ok(run_dogestry("copy", origin.store, dst, "--all", env=docker_env))

    assert sorted(proc.stdout.splitlines()) == sorted([
        copied("dgcopy/app:1", origin.app), copied("dgcopy/app:2", origin.app), copied("dgcopy/base:1", origin.base)])
    tags = [f for f in files(origin.store) if f.startswith("repositories/")]
    assert [f for f in files(dst) if f.startswith("repositories/")] == tags
    for tag in tags:
        assert (dst / tag).read_text().strip() == (origin.store / tag).read_text().strip()
    for image in (origin.app, origin.base):
        assert blob_hexes(dst, image) == blob_hexes(origin.store, image)


def legacy_store(docker_host, ref, store, name, tag):
    """The original dogestry layout, by hand from a real `docker save` (20.10: v1 directories):
    images/<v1id>/{VERSION,json,layer.tar} and repositories/NAME/TAG = the top v1 id."""
    import posixpath
    import tarfile
    saved = store.parent / (store.name + "-save.tar")
    docker_cli(docker_host, "save", "-o", str(saved), ref)
    with tarfile.open(str(saved)) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 2 or len(parts[0]) != 64:
                continue
            if member.issym():  # a repeated layer: the file it links to
                member = tar.getmember(posixpath.normpath(posixpath.join(parts[0], member.linkname)))
            target = store / "images" / parts[0] / parts[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
        repo, _, saved_tag = ref.rpartition(":")
        top = json.loads(tar.extractfile("repositories").read())[repo][saved_tag]
    (store / "repositories" / name).mkdir(parents=True)
    (store / "repositories" / name / tag).write_text(top)
    return top


def test_an_original_layout_image_arrives_in_the_current_layout(docker_host, docker_env, origin, tmp_path):
    """An image of the original dogestry layout is written to DST as images/<id>/manifest.json
    (no v1 json), with the ID a pull from SRC gives, and pulls from DST with that ID."""
    src = tmp_path / "legacy"
    top = legacy_store(docker_host, "dgcopy/base:1", src, "oldcopy", "1")
    docker_cli(docker_host, "rmi", "-f", "oldcopy:1", check=False)
    ok(run_dogestry("pull", src, "oldcopy:1", env=docker_env))
    from_src = image_id(docker_host, "oldcopy:1")
    assert from_src.startswith("sha256:")
    dst = tmp_path / "current"

    proc = ok(run_dogestry("copy", src, dst, "oldcopy:1", env=docker_env))

    assert proc.stdout == copied("oldcopy:1", from_src) + "\n"
    assert (dst / "repositories" / "oldcopy" / "1").read_text().strip() == from_src[7:]
    assert (dst / "images" / from_src[7:] / "manifest.json").is_file()
    assert not list(dst.glob("images/*/json")) and not (dst / "images" / top).exists()
    assert [layer["diffID"] for layer in manifest(dst, from_src)["layers"]] == image_layers(docker_host, origin.base)
    docker_cli(docker_host, "rmi", "-f", "oldcopy:1")
    assert image_id(docker_host, from_src) is None
    ok(run_dogestry("pull", dst, "oldcopy:1", env=docker_env))
    assert image_id(docker_host, "oldcopy:1") == from_src


# --- 6. ?profile=NAME ----------------------------------------------------------------------------

@pytest.fixture
def second_user(rgw):
    """Another radosgw user, with keys of its own."""
    suffix = uuid.uuid4().hex[:10]
    user = types.SimpleNamespace(uid="copier-" + suffix, access_key="COPIER" + suffix.upper(),
                                 secret_key="copier-secret-" + suffix)
    rgw.radosgw_admin("user", "create", "--uid=" + user.uid, "--display-name=Copier",
                      "--access-key=" + user.access_key, "--secret-key=" + user.secret_key)
    return user


def make_bucket_as(rgw, name, user):
    """A bucket owned by USER."""
    s3_client(rgw, name, user.access_key, user.secret_key).request("PUT").read()
    return name


def test_profile_picks_the_credentials_of_each_store(docker_host, s3_env, rgw, origin, second_user, tmp_path):
    """s3://a/?profile=one -> s3://b/?profile=two: each store uses its own profile of
    ~/.aws/credentials, over wrong keys in AWS_ACCESS_KEY_ID; neither user could do it alone."""
    suffix = uuid.uuid4().hex[:10]
    one = make_bucket(rgw, "dgcopy-one-" + suffix)
    two = make_bucket_as(rgw, "dgcopy-two-" + suffix, second_user)
    copy_to_s3(s3_env, origin.store, "s3://%s/" % one, "dgcopy/app:1")
    home = tmp_path / "profiles"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[one]\naws_access_key_id = %s\naws_secret_access_key = %s\n\n"
        "[two]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
        % (rgw.access_key, rgw.secret_key, second_user.access_key, second_user.secret_key))
    env = dict(s3_env, HOME=str(home), AWS_ACCESS_KEY_ID="WRONGKEY0000", AWS_SECRET_ACCESS_KEY="wrong-secret")

    proc = ok(run_dogestry("copy", "s3://%s/?profile=one" % one, "s3://%s/?profile=two" % two, "dgcopy/app:1",
                           env=env))

    assert proc.stdout == copied("dgcopy/app:1", origin.app) + "\n"
    owner = s3_client(rgw, two, second_user.access_key, second_user.secret_key)
    assert owner.get("repositories/dgcopy/app/1").read().decode().strip() == origin.app[7:]
    assert {"blobs/sha256/" + h for h in blob_hexes(origin.store, origin.app)} <= s3_keys(owner, "")
    with pytest.raises(dogestry.S3Error) as denied:  # user one may not write to b ...
        s3_client(rgw, two).put("x", lambda: b"x", 1, hashlib.sha256(b"x").hexdigest())
    assert denied.value.status == 403
    with pytest.raises(dogestry.S3Error) as denied:  # ... nor user two read a
        s3_client(rgw, one, second_user.access_key, second_user.secret_key).get("repositories/dgcopy/app/1")
    assert denied.value.status == 403
    assert fresh_pull(docker_host, env, "s3://%s/?profile=two" % two, "dgcopy/app:1", origin.app) == origin.app

    bad = run_dogestry("copy", "s3://%s/?profile=nosuchprofile" % one, "s3://%s/?profile=two" % two,
                       "dgcopy/app:1", env=env)
    one_error_line(bad, "nosuchprofile")


# --- 7. bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["unknown image", "missing source", "same store", "same store as file URL",
                                  "same store through a symlink", "no image"])
def test_bad_input_is_one_error_line(case, docker_env, origin, tmp_path):
    """An unknown image, a SRC that does not exist, DST == SRC, or nothing to copy: one
    `dogestry: error:` line, and no tag written anywhere."""
    dst = tmp_path / "dst"
    args, needles = {
        "unknown image": ([origin.store, dst, "dgcopy/nosuch:1"], ["nosuch"]),
        "missing source": ([tmp_path / "nowhere", dst, "dgcopy/app:1"], ["nowhere"]),
        "same store": ([origin.store, origin.store, "dgcopy/app:1"], []),
        "same store as file URL": ([origin.store, "file://%s/" % origin.store, "dgcopy/app:1"], []),
        "same store through a symlink": ([origin.store, origin.work / "origin-link", "dgcopy/app:1"], []),
        "no image": ([origin.store, dst], []),
    }[case]
    before = files(origin.store)

    one_error_line(run_dogestry("copy", *args, env=docker_env), *needles)

    assert not (dst / "repositories").exists()
    assert files(origin.store) == before


# --- 8. verified by digest, and images named by ID -----------------------------------------------

def corrupt_copy(origin, src, blob_hex):
    """A copy of the origin store at SRC whose blob BLOB_HEX has one byte flipped (same size)."""
    import shutil
    shutil.copytree(str(origin.store), str(src))
    blob = src / "blobs" / "sha256" / blob_hex
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return src


@pytest.mark.parametrize("direction", ["directory to S3", "S3 to directory"])
def test_a_corrupt_blob_in_src_fails_the_copy_and_writes_no_tag(direction, s3_env, rgw, origin, bucket, tmp_path):
    """A blob of SRC whose bytes no longer match its digest (same size, one byte flipped) is
    refused: one error line naming it, no tag in DST, and DST does not get the bad blob."""
    big = blob_hexes(origin.store, origin.app)[-1]
    if direction == "directory to S3":
        src = corrupt_copy(origin, tmp_path / "src", big)
        dst = "s3://%s/bad/" % bucket
    else:
        src = "s3://%s/bad/" % bucket
        copy_to_s3(s3_env, origin.store, src, "dgcopy/app:1")
        data = bytearray((origin.store / "blobs" / "sha256" / big).read_bytes())
        data[len(data) // 2] ^= 0xFF
        s3_client(rgw, bucket).put("bad/blobs/sha256/" + big, lambda: bytes(data), len(data),
                                   hashlib.sha256(bytes(data)).hexdigest())
        dst = tmp_path / "dst"

    one_error_line(run_dogestry("copy", src, dst, "dgcopy/app:1", env=s3_env), big[:12])

    if direction == "directory to S3":
        after = s3_keys(s3_client(rgw, bucket), "bad/")
        assert not [k for k in after if k.startswith("repositories/")] and "blobs/sha256/" + big not in after
    else:
        assert not (dst / "repositories").exists() and not (dst / "blobs" / "sha256" / big).exists()


def test_an_image_named_by_id_is_copied(docker_env, origin, tmp_path):
    """IMAGE may be an image ID prefix: the image (config, manifest, blobs) arrives in DST."""
    dst = tmp_path / "by-id"

    proc = ok(run_dogestry("copy", origin.store, dst, origin.app[7:19], env=docker_env))

    assert origin.app in proc.stdout
    assert blob_hexes(dst, origin.app) == blob_hexes(origin.store, origin.app)
    assert hashlib.sha256((dst / "images" / origin.app[7:] / "config.json").read_bytes()).hexdigest() == \
        origin.app[7:]


def test_a_corrupt_blob_sent_in_parts_is_deleted_again(s3_env, rgw, origin, bucket, tmp_path, monkeypatch):
    """S3 checks a single PUT's payload against the digest, not a multipart upload as a whole:
    the copy hashes the file with its parts, and completes the upload only if the file is the
    blob.  (The single-PUT limit is lowered so that the 2 MiB layer goes in parts.)"""
    import io
    monkeypatch.setattr(dogestry, "S3_VERIFIED_PUT_MAX", 1 << 20)
    big = blob_hexes(origin.store, origin.app)[-1]
    src = corrupt_copy(origin, tmp_path / "src", big)
    stderr = io.StringIO()

    code = dogestry.main(["-q", "copy", str(src), "s3://%s/parts/" % bucket, "dgcopy/app:1"],
                         environ=s3_env, stdout=io.StringIO(), stderr=stderr)

    assert code == 1
    assert stderr.getvalue().count("\n") == 1 and big[:12] in stderr.getvalue(), stderr.getvalue()
    client = s3_client(rgw, bucket)
    after = s3_keys(client, "parts/")
    assert "blobs/sha256/" + big not in after and not [k for k in after if k.startswith("repositories/")]
    assert client.uploads_under("") == []
