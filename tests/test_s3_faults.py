"""S3 under faults: dogestry against radosgw through a fault-injecting proxy (tests/faultproxy.py).

Every test runs a real dockerd and a real radosgw; dogestry is pointed at a FaultProxy on
127.0.0.1 (AWS_ENDPOINT_URL), which forwards requests byte for byte (so SigV4 signatures, made
for the proxy's host:port, still verify at radosgw) and injects the faults a rule asks for.
"""

import collections
import hashlib
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

import dogestry
from faultproxy import Reply, Reset, Truncate, s3_error
from realdocker import (DOGESTRY, build_image, docker_cli, image_id, image_layers, ok, one_error_line, random_bytes,
                        run_dogestry, text_bytes)

pytestmark = pytest.mark.integration

PART = dogestry.S3_MIN_PART            # dogestry's part size for blobs under ~80 GB
BIG = dogestry.S3_SINGLE_PUT_MAX + (1 << 20)  # a random layer this big is stored raw, in parts


# --- fixtures and helpers ------------------------------------------------------------------------



def via(env, proxy, **extra):
    """A copy of ENV that sends dogestry's S3 requests through PROXY.  Layers are stored whole
    (DOGESTRY_CHUNKS=0): these tests are about multipart uploads and ranged reads of big blobs;
    tests/test_chunks_faults.py puts chunked pushes and pulls through faults."""
    out = dict(env, AWS_ENDPOINT_URL=proxy.url, DOGESTRY_CHUNKS="0")
    out.update({k: str(v) for k, v in extra.items()})
    return out


def whole(env):
    """A copy of ENV whose pushes store layers whole (see via)."""
    return dict(env, DOGESTRY_CHUNKS="0")


def store_url(bucket):
    return "s3://%s/faults/" % bucket


def direct_client(rgw, bucket, **kw):
    """An in-process S3Client talking straight to radosgw (no faults)."""
    return client_for(rgw, bucket, rgw.endpoint, **kw)


def client_for(rgw, bucket, endpoint, region="us-east-1", **kw):
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, "", region, endpoint)
    return dogestry.S3Client(location, dogestry.CredentialChain(config), config, **kw)


def keys(rgw, bucket, prefix="faults/"):
    return [k for k, _ in direct_client(rgw, bucket).list(prefix)]


def open_uploads(rgw, bucket):
    """(key, upload id) of every multipart upload not completed or aborted (ListMultipartUploads)."""
    resp = direct_client(rgw, bucket).request("GET", query=[("uploads", "")])
    root = dogestry._parse_xml(resp.read())
    assert root is not None and root.tag == "ListMultipartUploadsResult"
    return [(u.findtext("Key"), u.findtext("UploadId")) for u in root.findall("Upload")]


def unique_image(docker_host, tmp_path, big=False):
    """Build a small FROM-scratch image with content no other image has; return (ref, id)."""
    token = uuid.uuid4().hex[:10]
    seed = int(token, 16)
    layers = [{"data/random.bin": random_bytes(300 << 10, seed)},
              {"data/words.txt": text_bytes(600 << 10, seed + 1)},
              {"etc/token": token.encode()}]
    if big:
        layers.insert(0, {"data/big.bin": random_bytes(BIG, seed + 2)})
    ref = "dgfault/img%s:t%s" % (token[:4], token[4:])
    image = build_image(docker_host, ref, layers, workdir=tmp_path, extra_lines=["LABEL token=" + token])
    return ref, image



def forget(docker_host, ref):
    """Remove the image (and so its unique layers) from the engine."""
    docker_cli(docker_host, "rmi", "-f", ref)
    assert image_id(docker_host, ref) is None




def round_trip(docker_host, env, bucket, ref, image, pull_env=None):
    """push, rmi, pull; the engine ends up with the same image ID and layers."""
    layers = image_layers(docker_host, ref)
    ok(run_dogestry("push", store_url(bucket), ref, env=env))
    forget(docker_host, ref)
    ok(run_dogestry("pull", store_url(bucket), ref, env=pull_env or env))
    assert image_id(docker_host, ref) == image
    assert image_layers(docker_host, ref) == layers


def identity(req):
    return (req.method, req.target, req.headers.get("range", ""))


def slow_down(req):
    return s3_error(503, "SlowDown", "Please reduce your request rate.", req.path)


def replies(proxy, status=None):
    return [e for e in proxy.log if e["action"] == "reply" and (status is None or e["status"] == status)]


def blob_gets(proxy):
    return [e for e in proxy.log if e["method"] == "GET" and "/blobs/sha256/" in e["path"]]


# --- the proxy itself ----------------------------------------------------------------------------

def test_proxy_forwards_signed_requests_unchanged(rgw, bucket, fault_proxy):
    """Signed for the proxy's host:port and forwarded with that Host, requests verify at radosgw."""
    proxy = fault_proxy()
    client = client_for(rgw, bucket, proxy.url)
    data = random_bytes(3 << 20, 5)
    client.put("a dir/blob+1", lambda: data, len(data), hashlib.sha256(data).hexdigest())
    assert int(client.head("a dir/blob+1").getheader("Content-Length")) == len(data)
    assert client.get("a dir/blob+1").read() == data
    assert client.get("a dir/blob+1", 10, 19).read() == data[10:20]
    assert list(client.list("a dir/")) == [("a dir/blob+1", len(data))]
    assert [e["status"] for e in proxy.log] == [200, 200, 200, 206, 200]
    assert all(e["headers"]["host"] == "127.0.0.1:%d" % proxy.port for e in proxy.log)
    assert proxy.log[0]["path"] == "/%s/a dir/blob+1" % bucket


# --- 1. periodic 503 SlowDown --------------------------------------------------------------------

def test_periodic_slowdown_push_and_pull_succeed(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """Every 3rd request answers 503 SlowDown (at most twice for the same request): retries win."""
    failed, lock = collections.Counter(), threading.Lock()

    def rule(req):
        with lock:
            if req.n % 3 == 0 and failed[identity(req)] < 2:
                failed[identity(req)] += 1
                return slow_down(req)
        return None

    proxy = fault_proxy(rule)
    ref, image = unique_image(docker_host, tmp_path)
    round_trip(docker_host, via(s3_env, proxy), bucket, ref, image)

    refused = replies(proxy, 503)
    assert len(refused) >= 5
    # every refused request was sent again and then got through
    for entry in refused:
        later = [e for e in proxy.log if e["n"] > entry["n"] and e["method"] == entry["method"]
                 and e["target"] == entry["target"] and e["range"] == entry["range"]]
        assert any(e["action"] == "forward" and e["status"] < 500 for e in later), (
            entry["n"], entry["method"], entry["target"], [(e["n"], e["status"]) for e in later])
    assert any(e["method"] == "PUT" for e in refused) and any(e["method"] == "GET" for e in refused)
    assert blob_gets(proxy), "the pull read no layer blobs"


# --- 2. connection reset in the middle of GET bodies ---------------------------------------------

def test_pull_resumes_after_resets_mid_body(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """The first GET of each object (or of each range) is reset half-way; S3Reader resumes with Range."""
    ref, image = unique_image(docker_host, tmp_path, big=True)
    ok(run_dogestry("push", store_url(bucket), ref, env=whole(s3_env)))
    forget(docker_host, ref)

    def rule(req):
        rng = req.headers.get("range")
        first_piece = rng is None or int(rng[6:].split("-")[0]) % dogestry.S3_RANGE == 0
        if req.method == "GET" and req.key and req.attempt == 1 and first_piece:
            return Reset(0.5)
        return None

    proxy = fault_proxy(rule)
    ok(run_dogestry("pull", store_url(bucket), ref, env=via(s3_env, proxy)))
    assert image_id(docker_host, ref) == image

    resets = [e for e in proxy.log if e["action"].startswith("reset@")]
    assert len([e for e in resets if "/blobs/sha256/" in e["path"]]) >= 4  # 3 blobs, one read in ranges
    mid_body = 0
    for entry in resets:  # each reset GET is resumed from the byte the client had got to
        start = range_start(entry)
        resumed = [range_start(e) for e in proxy.log if e["n"] > entry["n"] and e["path"] == entry["path"]
                   and e["status"] in (200, 206) and start <= range_start(e) <= start + entry["body_sent"]]
        assert resumed, entry
        mid_body += resumed[0] > start
    # (a client may lose bytes it had not read yet when the RST came, and start that piece again)
    assert mid_body >= 1


def range_start(entry):
    return int(re.match(r"bytes=(\d+)-", entry["range"] or "bytes=0-").group(1))


# --- 3. truncated GET responses ------------------------------------------------------------------

def test_pull_recovers_from_truncated_bodies(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """First GETs declare the full Content-Length but stop half-way (FIN); the image is still exact."""
    ref, image = unique_image(docker_host, tmp_path, big=True)
    ok(run_dogestry("push", store_url(bucket), ref, env=whole(s3_env)))
    forget(docker_host, ref)

    def rule(req):
        if req.method == "GET" and req.key and req.attempt == 1 and "range" not in req.headers:
            return Truncate(0.5)
        if req.method == "GET" and req.key and req.attempt == 1 and req.headers["range"].startswith("bytes=0-"):
            return Truncate(0.3)  # the first piece of a parallel ranged read
        return None

    proxy = fault_proxy(rule)
    ok(run_dogestry("pull", store_url(bucket), ref, env=via(s3_env, proxy)))
    assert image_id(docker_host, ref) == image
    truncated = [e for e in proxy.log if e["action"].startswith("truncate@")]
    assert len([e for e in truncated if "/blobs/sha256/" in e["path"]]) >= 3
    assert all(e["body_sent"] < e["body_length"] for e in truncated)


def test_always_truncated_blob_is_never_loaded(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """When every blob GET comes back short, the pull fails cleanly and the engine gets nothing."""
    ref, image = unique_image(docker_host, tmp_path)
    ok(run_dogestry("push", store_url(bucket), ref, env=whole(s3_env)))
    forget(docker_host, ref)

    def rule(req):
        if req.method == "GET" and "/blobs/sha256/" in req.path:
            return Truncate(0.5)
        return None

    proxy = fault_proxy(rule)
    proc = run_dogestry("pull", store_url(bucket), ref, env=via(s3_env, proxy, AWS_MAX_ATTEMPTS=3))
    one_error_line(proc, "blobs/sha256/")
    assert image_id(docker_host, ref) is None
    assert image_id(docker_host, image) is None
    tries = collections.Counter(e["path"] for e in blob_gets(proxy))
    assert tries[blob_gets(proxy)[0]["path"]] == 3  # the GET and two resumes, then it gives up
    assert max(tries.values()) == 3


# --- 4. multipart uploads ------------------------------------------------------------------------

def part_number(req):
    return dict(req.query).get("partNumber") if req.method == "PUT" else None


def test_multipart_part_failing_fails_push_and_aborts(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """UploadPart 2 always answers 500 InternalError: one error line, no tag, the upload is aborted."""
    def rule(req):
        if part_number(req) == "2":
            return s3_error(500, "InternalError", "We encountered an internal error. Please try again.", req.path)
        return None

    proxy = fault_proxy(rule)
    ref, _ = unique_image(docker_host, tmp_path, big=True)
    proc = run_dogestry("push", store_url(bucket), ref, env=via(s3_env, proxy, AWS_MAX_ATTEMPTS=3))

    one_error_line(proc, "InternalError", "blobs/sha256/")
    stored = keys(rgw, bucket)
    assert not [k for k in stored if k.startswith("faults/repositories/")], stored
    assert not [k for k in stored if k.endswith("/manifest.json")], stored
    assert len(upload_ids(proxy)) == 1
    assert not upload_ids(proxy) & {upload for _, upload in open_uploads(rgw, bucket)}  # aborted
    assert len([e for e in proxy.log if part_number_of(e) == "2"]) == 3  # AWS_MAX_ATTEMPTS
    aborts = [e for e in proxy.log if e["method"] == "DELETE" and "uploadId" in dict(e["query"])]
    assert len(aborts) == 1 and aborts[0]["status"] == 204


def part_number_of(entry):
    return dict(entry["query"]).get("partNumber") if entry["method"] == "PUT" else None


def upload_ids(proxy):
    """The multipart upload IDs dogestry sent parts for."""
    return {dict(e["query"])["uploadId"] for e in proxy.log if part_number_of(e)}


def test_multipart_transient_part_failures_push_and_pull(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """The first attempt of every UploadPart fails; the push completes a real multipart object."""
    def rule(req):
        if part_number(req) and req.attempt == 1:
            return s3_error(500, "InternalError", "We encountered an internal error. Please try again.", req.path)
        return None

    proxy = fault_proxy(rule)
    ref, image = unique_image(docker_host, tmp_path, big=True)
    layers = image_layers(docker_host, ref)
    ok(run_dogestry("push", store_url(bucket), ref, env=via(s3_env, proxy)))

    client = direct_client(rgw, bucket)
    big = [(k, size) for k, size in client.list("faults/blobs/") if size > dogestry.S3_SINGLE_PUT_MAX]
    assert len(big) == 1, big
    key, size = big[0]
    parts = -(-size // PART)
    etag = client.head(key).getheader("ETag").strip('"')
    assert etag.endswith("-%d" % parts), etag
    failed = replies(proxy, 500)
    assert sorted(int(part_number_of(e)) for e in failed) == list(range(1, parts + 1))
    assert len(upload_ids(proxy)) == 1
    assert not upload_ids(proxy) & {upload for _, upload in open_uploads(rgw, bucket)}  # completed

    forget(docker_host, ref)
    ok(run_dogestry("pull", store_url(bucket), ref, env=via(s3_env, proxy)))
    assert image_id(docker_host, ref) == image
    assert image_layers(docker_host, ref) == layers
    ranged = [e for e in blob_gets(proxy) if e["path"].endswith(key) and e["range"]]
    assert len(ranged) == -(-size // dogestry.S3_RANGE)  # read back as parallel ranged GETs


# --- 5. region redirects -------------------------------------------------------------------------

REGION = "eu-west-1"


def permanent_redirect(req):
    """S3's answer to a request signed for the wrong region: 301 + x-amz-bucket-region."""
    return s3_error(301, "PermanentRedirect",
                    "The bucket you are attempting to access must be addressed using the specified endpoint.",
                    req.path, "<Bucket>%s</Bucket><Endpoint>s3.%s.amazonaws.com</Endpoint><Region>%s</Region>"
                    % (req.path.strip("/").split("/")[0], REGION, REGION),
                    headers={"x-amz-bucket-region": REGION})


def header_malformed(req):
    """400 AuthorizationHeaderMalformed naming the region only in the XML body (no header).

    A HEAD answer has no body: S3 sends 400 with the x-amz-bucket-region header instead (dogestry's
    commands start with a GET, check_bucket, so they learn the region before any HEAD).
    """
    if req.method == "HEAD":
        return s3_error(400, "AuthorizationHeaderMalformed", "", req.path, headers={"x-amz-bucket-region": REGION})
    return s3_error(400, "AuthorizationHeaderMalformed",
                    "The authorization header is malformed; the region '%s' is wrong; expecting '%s'"
                    % (req.region, REGION), req.path, "<Region>%s</Region>" % REGION)


def header_malformed_body_only(req):
    """Like header_malformed, but HEADs (which carry no body) pass: the XML <Region> alone steers."""
    return None if req.method == "HEAD" else header_malformed(req)


def check_region_following(docker_host, s3_env, bucket, fault_proxy, tmp_path, answer):
    proxy = fault_proxy(lambda req: answer(req) if req.region != REGION else None)
    ref, image = unique_image(docker_host, tmp_path)
    round_trip(docker_host, via(s3_env, proxy), bucket, ref, image)

    redirects = replies(proxy)
    assert all(e["region"] != REGION for e in redirects)
    # each command (push, pull) is redirected once, by its first redirectable request (made
    # before any worker thread starts), and then signs everything for eu-west-1
    assert len(redirects) == 2, [(e["method"], e["path"]) for e in redirects]
    bounds = [0, redirects[1]["n"], len(proxy.log) + 1]
    for redirect, first, last in zip(redirects, bounds, bounds[1:]):
        command = [e for e in proxy.log if first <= e["n"] < last]
        assert all(e["region"] != REGION for e in command if e["n"] < redirect["n"])
        after = [e for e in command if e["n"] > redirect["n"]]
        assert after and all(e["region"] == REGION and e["action"] != "reply" for e in after)
    forwarded = [e for e in proxy.log if e["action"] != "reply" and e["method"] != "HEAD"]
    assert forwarded and all(e["region"] == REGION for e in forwarded)
    assert proxy.log[-1]["region"] == REGION


def test_region_redirect_301(docker_host, s3_env, bucket, fault_proxy, tmp_path):
    check_region_following(docker_host, s3_env, bucket, fault_proxy, tmp_path, permanent_redirect)


def test_region_redirect_400_authorization_header_malformed(docker_host, s3_env, bucket, fault_proxy, tmp_path):
    check_region_following(docker_host, s3_env, bucket, fault_proxy, tmp_path, header_malformed)


def test_region_redirect_400_xml_region(docker_host, s3_env, bucket, fault_proxy, tmp_path):
    check_region_following(docker_host, s3_env, bucket, fault_proxy, tmp_path, header_malformed_body_only)


# --- 6. the tag PUT always fails -----------------------------------------------------------------

def test_tag_put_failing_leaves_no_tag(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """PUTs under repositories/ always answer 503: the push fails with one line, and no tag exists."""
    def rule(req):
        if req.method == "PUT" and "/repositories/" in req.path:
            return slow_down(req)
        return None

    proxy = fault_proxy(rule)
    ref, _ = unique_image(docker_host, tmp_path)
    name, tag = ref.rsplit(":", 1)
    proc = run_dogestry("push", store_url(bucket), ref, env=via(s3_env, proxy, AWS_MAX_ATTEMPTS=3))

    one_error_line(proc, "faults/repositories/%s/%s" % (name, tag), "SlowDown", "503")
    assert len([e for e in proxy.log if e["method"] == "PUT" and "/repositories/" in e["path"]]) == 3
    listing = ok(run_dogestry("list", store_url(bucket), env=s3_env)).stdout
    assert name not in listing and listing.splitlines()[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID"]
    assert len(listing.splitlines()) == 1
    proc = run_dogestry("pull", store_url(bucket), ref, env=s3_env)
    one_error_line(proc, "not found", ref)


# --- 7. the retry budget, in-process -------------------------------------------------------------

def test_retry_budget_and_jittered_backoff(rgw, bucket, fault_proxy):
    """max_attempts=3 against an always-503 S3: 3 requests, 2 full-jitter sleeps, then S3Error."""
    proxy = fault_proxy(slow_down)
    sleeps, draws = [], []
    rng = random.Random(42)

    def rand():
        draws.append(rng.random())
        return draws[-1]

    client = client_for(rgw, bucket, proxy.url, sleep=sleeps.append, rand=rand, max_attempts=3)
    started = time.monotonic()
    with pytest.raises(dogestry.S3Error) as caught:
        client.get("faults/some/key")
    assert time.monotonic() - started < 5.0  # no real sleeping
    error = caught.value
    assert error.code == "SlowDown" and error.status == 503
    assert "SlowDown" in str(error) and "faults/some/key" in str(error), str(error)
    assert len(proxy.log) == 3
    assert {(e["method"], e["path"]) for e in proxy.log} == {("GET", "/%s/faults/some/key" % bucket)}
    # full jitter: sleep n is uniform in [0, 0.25 * 2**n], no sleep after the last attempt
    caps = [0.25 * 2 ** n for n in (1, 2)]
    assert sleeps == pytest.approx([d * c for d, c in zip(draws, caps)])
    assert all(0 <= s <= c for s, c in zip(sleeps, caps))

    # PUTs spend the same budget; the default random jitter stays within the caps and varies
    sleeps.clear()
    client = client_for(rgw, bucket, proxy.url, sleep=sleeps.append, max_attempts=3)
    for _ in range(10):
        with pytest.raises(dogestry.S3Error, match="SlowDown"):
            client.put("faults/k", lambda: b"data", 4, hashlib.sha256(b"data").hexdigest())
    assert len(proxy.log) == 3 + 30
    assert len(sleeps) == 20
    assert all(0 <= s <= caps[i % 2] for i, s in enumerate(sleeps))
    assert len(set(sleeps)) > 10

    # one attempt: one request, no sleep
    sleeps.clear()
    with pytest.raises(dogestry.S3Error):
        client_for(rgw, bucket, proxy.url, sleep=sleeps.append, max_attempts=1).get("faults/x")
    assert len(proxy.log) == 34 and sleeps == []


def test_head_follows_region_from_400_header(rgw, bucket, fault_proxy):
    proxy = fault_proxy(lambda req: header_malformed(req) if req.region != REGION else None)
    client = client_for(rgw, bucket, proxy.url)
    assert client.head("faults/missing") is None
    assert client.region == REGION


# --- an unread HEAD answer must not poison the connection -------------------------------------------------------

def test_request_after_a_head_404_is_sent_once(rgw, bucket, fault_proxy):
    proxy = fault_proxy()
    sleeps = []
    client = client_for(rgw, bucket, proxy.url, sleep=sleeps.append)
    assert client.head("faults/missing") is None
    client.put("faults/k", lambda: b"data", 4, hashlib.sha256(b"data").hexdigest())
    assert [(e["method"], e["status"]) for e in proxy.log] == [("HEAD", 404), ("PUT", 200)]
    assert sleeps == []


def test_push_leaves_no_multipart_upload_behind(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    proxy = fault_proxy()
    ref, _ = unique_image(docker_host, tmp_path, big=True)
    ok(run_dogestry("push", store_url(bucket), ref, env=via(s3_env, proxy)))
    creates = [e for e in proxy.log if e["method"] == "POST" and ("uploads", "") in e["query"]]
    assert open_uploads(rgw, bucket) == []
    assert len(creates) == 1


# --- broken bodies of small answers are retried -------------------------------------

def test_list_survives_a_reset_listing(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    ref, _ = unique_image(docker_host, tmp_path)
    ok(run_dogestry("push", store_url(bucket), ref, env=whole(s3_env)))

    def rule(req):
        if req.method == "GET" and ("list-type", "2") in req.query and req.attempt == 1:
            return Reset(0.5)
        return None

    proxy = fault_proxy(rule)
    proc = run_dogestry("list", store_url(bucket), env=via(s3_env, proxy))
    assert [e for e in proxy.log if e["action"].startswith("reset@")]
    ok(proc)
    assert ref.rsplit(":", 1)[0] in proc.stdout


# --- 8. multipart uploads never left behind ------------------------------------------------------

def creates(proxy):
    return [e for e in proxy.log if e["method"] == "POST" and ("uploads", "") in e["query"]]


def test_a_cut_off_create_answer_leaves_no_second_upload(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """S3 created the upload but its answer broke off: the retry creates another; the first is aborted."""
    def rule(req):
        if req.method == "POST" and ("uploads", "") in req.query and req.attempt == 1:
            return Truncate(0.3)
        return None

    proxy = fault_proxy(rule)
    ref, _ = unique_image(docker_host, tmp_path, big=True)
    ok(run_dogestry("push", store_url(bucket), ref, env=via(s3_env, proxy)))
    assert len(creates(proxy)) == 2
    assert open_uploads(rgw, bucket) == []


def test_an_abort_that_meets_an_outage_is_retried(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """A part fails for good, and S3 is unavailable for the first aborts: the push still leaves nothing."""
    def rule(req):
        if part_number(req) == "2":
            return s3_error(403, "AccessDenied", "Access Denied", req.path)
        if req.method == "DELETE" and "uploadId" in dict(req.query) and req.attempt <= 2:
            return s3_error(503, "ServiceUnavailable", "Please reduce your request rate.", req.path)
        return None

    proxy = fault_proxy(rule)
    ref, _ = unique_image(docker_host, tmp_path, big=True)
    proc = run_dogestry("push", store_url(bucket), ref, env=via(s3_env, proxy))
    one_error_line(proc, "AccessDenied")
    aborts = [e["status"] for e in proxy.log if e["method"] == "DELETE"]
    assert aborts == [503, 503, 204], aborts
    assert open_uploads(rgw, bucket) == []


def test_the_next_push_of_a_blob_aborts_its_abandoned_uploads(rgw, bucket, tmp_path, monkeypatch):
    """An upload a killed run left (S3 unreachable for its abort) is aborted by the next push of that
    blob once it is STALE_UPLOAD_AGE old (here: at once)."""
    client = direct_client(rgw, bucket)
    key = "faults/blobs/sha256/" + "ab" * 32
    abandoned = dogestry._xml_text(dogestry._parse_xml(client.call("POST", key, query=[("uploads", "")])[1]),
                                   ".//UploadId")
    assert (key, abandoned) in open_uploads(rgw, bucket)
    path = tmp_path / "blob"
    path.write_bytes(random_bytes(BIG, 77))
    monkeypatch.setattr(dogestry, "STALE_UPLOAD_AGE", 0.0)
    store = dogestry.S3Store(dogestry.S3Location(bucket, "faults/", None, rgw.endpoint), client)
    store.put_file("blobs/sha256/" + "ab" * 32, str(path), BIG)
    assert open_uploads(rgw, bucket) == []
    assert client.head_size(key) == BIG


def push_interrupted_at_once(url, ref, env, started, never_started):
    """Start `dogestry push URL REF`, send it SIGINT once `started` is set (else fail with
    never_started) and insist it ends within 2 s: exit 130, 'dogestry: interrupted', no traceback."""
    proc = subprocess.Popen([sys.executable, str(DOGESTRY), "push", url, ref], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        assert started.wait(120), never_started
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert took < 2.0, (took, err)
    assert "Traceback" not in err and err.rstrip().endswith("dogestry: interrupted"), err


def test_ctrl_c_during_a_big_push_ends_in_two_seconds_and_leaves_nothing(docker_host, s3_env, rgw, bucket,
                                                                        fault_proxy, tmp_path):
    """Ctrl-C with parts in flight and layers queued: exit 130 within 2 s, no tag, no open upload."""
    started = threading.Event()

    def slow_parts(req):
        if part_number(req):
            started.set()
            time.sleep(3.0)  # S3 answers each part slowly: parts are in flight when Ctrl-C comes
        return None

    proxy = fault_proxy(slow_parts)
    token = uuid.uuid4().hex[:10]
    layers = [{"data/%d.bin" % n: random_bytes(3 * PART, int(token, 16) + n)} for n in range(3)]
    ref = "dgfault/big%s:t1" % token[:6]
    build_image(docker_host, ref, layers, workdir=tmp_path)
    push_interrupted_at_once(store_url(bucket), ref, via(s3_env, proxy), started, "no part upload began")
    assert not [k for k in keys(rgw, bucket) if k.startswith("faults/repositories/")]
    assert open_uploads(rgw, bucket) == []


def test_a_layer_that_fails_stops_the_push_at_once(docker_host, s3_env, rgw, bucket, fault_proxy, tmp_path):
    """One layer's upload is refused for good while another's parts go up slowly: the push fails
    without waiting for the rest, and leaves no upload."""
    def rule(req):
        if part_number(req):
            time.sleep(0.5)
        elif req.method == "PUT" and "/blobs/sha256/" in req.path:
            return s3_error(403, "AccessDenied", "Access Denied", req.path)
        return None

    proxy = fault_proxy(rule)
    token = uuid.uuid4().hex[:10]
    layers = [{"data/big.bin": random_bytes(8 * PART, int(token, 16))}, {"small.txt": text_bytes(1 << 20, 5)}]
    ref = "dgfault/fail%s:t1" % token[:6]
    build_image(docker_host, ref, layers, workdir=tmp_path)
    started = time.monotonic()
    proc = run_dogestry("push", store_url(bucket), ref, env=via(s3_env, proxy))
    took = time.monotonic() - started
    one_error_line(proc, "AccessDenied")
    parts = [e for e in proxy.log if part_number_of(e)]
    assert len(parts) < 8, len(parts)  # it did not wait for all the big layer's parts
    assert took < 8 * 0.5 / 2 + 5, took
    assert open_uploads(rgw, bucket) == []


# --- 9. the retry budget rides out an outage -----------------------------------------------------

class FakeTime:
    """A clock that moves only when the client sleeps (so a minute's outage takes no real minute)."""

    def __init__(self):
        self.now = time.time()
        self.slept = 0.0

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.slept += seconds


@pytest.mark.parametrize("outage,survives", [(60.0, True), (300.0, False)], ids=["60s", "300s"])
def test_the_default_retry_budget_rides_out_a_minute_of_outage(outage, survives, rgw, bucket, fault_proxy):
    fake = FakeTime()
    ends = fake.now + outage
    client = client_for(rgw, bucket, None, clock=fake.clock, sleep=fake.sleep)
    direct_client(rgw, bucket).put("faults/budget", lambda: b"data", 4, hashlib.sha256(b"data").hexdigest())

    def down_until_then(req):
        if fake.now < ends:
            return s3_error(503, "ServiceUnavailable", "Please reduce your request rate.", req.path)
        return None

    proxy = fault_proxy(down_until_then)
    client.endpoint = proxy.url
    if survives:
        resp = client.get("faults/budget")
        assert resp.read() == b"data"
        assert outage <= fake.slept < outage + 25
    else:
        with pytest.raises(dogestry.S3Error, match="ServiceUnavailable"):
            client.get("faults/budget")
        assert dogestry.S3_RETRY_BUDGET <= fake.slept < dogestry.S3_RETRY_BUDGET + 25


# --- 10. answers that do not add up ---------------------------------------------------------------

@pytest.mark.parametrize("date", ["not a date", "", "Sun, 99 Foo 2026 99:99:99 GMT"], ids=["text", "empty", "nonsense"])
def test_a_skew_complaint_with_an_unparsable_date_is_retried_not_a_traceback(date, rgw, bucket, fault_proxy):
    direct_client(rgw, bucket).put("faults/dated", lambda: b"data", 4, hashlib.sha256(b"data").hexdigest())

    def rule(req):
        if req.attempt == 1:
            return s3_error(403, "RequestTimeTooSkewed", "The difference is too large.", req.path,
                            headers={"Date": date})
        return None

    proxy = fault_proxy(rule)
    client = client_for(rgw, bucket, proxy.url, sleep=lambda s: None)
    assert client.get("faults/dated").read() == b"data"
    assert len(proxy.log) == 2


def test_a_ranged_read_answered_from_the_wrong_offset_is_refused(docker_host, s3_env, rgw, bucket, fault_proxy,
                                                                 tmp_path):
    """A 206 that does not start at the byte asked for would splice the wrong bytes in: one clean error."""
    ref, _ = unique_image(docker_host, tmp_path, big=True)
    ok(run_dogestry("push", store_url(bucket), ref, env=whole(s3_env)))
    forget(docker_host, ref)

    def rule(req):
        wanted = re.match(r"bytes=(\d+)-", req.headers.get("range", ""))
        if req.method == "GET" and wanted and int(wanted.group(1)) > 0:
            return Reply(206, b"x" * 10, {"Content-Range": "bytes 0-9/%d" % BIG})
        return None

    proxy = fault_proxy(rule)
    proc = run_dogestry("pull", store_url(bucket), ref, env=via(s3_env, proxy))
    one_error_line(proc, "asked for the bytes from")
    assert image_id(docker_host, ref) is None


def test_an_oversized_answer_is_refused_not_read_whole(rgw, bucket, fault_proxy, docker_host, s3_env):
    """A listing answer bigger than any S3 would send (here 20 MiB) is one clear error, not memory."""
    def rule(req):
        if req.method == "GET" and ("list-type", "2") in req.query:
            return Reply(200, b"<ListBucketResult>" + b" " * (20 << 20) + b"</ListBucketResult>",
                         {"Content-Type": "application/xml"})
        return None

    proxy = fault_proxy(rule)
    proc = run_dogestry("list", store_url(bucket), env=via(s3_env, proxy))
    one_error_line(proc, "larger than")
