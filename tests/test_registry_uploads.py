"""`dogestry -server STORE` takes blob uploads: the push side of the OCI Distribution Spec v1.1.

Until manifests can be pushed no real client can finish a push, so these tests speak the
spec's upload requests themselves, as its conformance suite does ("Pushing blobs": POST,
PATCH with and without Content-Range, GET of a session, PUT ?digest=, DELETE, mounts,
monolithic POST ?digest= and POST-then-PUT), and docker's own way of sending a layer (one
chunked PATCH, then an empty PUT).  The server is the real one, as a subprocess, on a
directory store and on a real radosgw; a counting proxy (FaultProxy) in front of radosgw
shows what the server sends to S3.
"""

import hashlib
import os
import re
import select
import socket
import time
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket
from realdocker import loopback_addresses, random_bytes, run_dogestry
from serverkit import PORT, call, read_until_closed, registry_error_code

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(2)
NAME = "team/app"
MiB = 1 << 20


# --- the stores and the servers ---------------------------------------------------------------

class Target:
    """A store the server pushes into: its STORE argument, the server's environment, and what
    it holds (every key, and on S3 the multipart uploads in progress)."""

    def __init__(self, kind, store, env, client=None):
        self.kind, self.store, self.env, self.client = kind, store, env, client

    def keys(self):
        if self.client is None:
            return sorted(str(p.relative_to(self.store)) for p in Path(self.store).rglob("*") if p.is_file())
        return sorted(key for key, _ in self.client.list(""))

    def multipart_uploads(self):
        return [] if self.client is None else self.client.uploads_under("")

    def leftovers(self):
        """Anything an upload left: keys under uploads/ or blobs/, temp files, multipart uploads."""
        return [k for k in self.keys() if k.startswith(("uploads/", "blobs/")) or ".tmp-" in k] + \
            self.multipart_uploads()


def s3_client(rgw, bucket, endpoint=None):
    config = dogestry.AwsConfig({"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}, "/x")
    location = dogestry.S3Location(bucket, "", "us-east-1", endpoint or rgw.endpoint)
    return dogestry.S3Client(location, dogestry.CredentialChain(config), config)


def s3_target(rgw, base_env, docker_host, endpoint=None):
    bucket = make_bucket(rgw, "dgpush-" + uuid.uuid4().hex[:10])
    env = dict(base_env, DOCKER_HOST=docker_host, AWS_ACCESS_KEY_ID=rgw.access_key,
               AWS_SECRET_ACCESS_KEY=rgw.secret_key, AWS_ENDPOINT_URL=endpoint or rgw.endpoint)
    return Target("s3", "s3://%s/" % bucket, env, s3_client(rgw, bucket))


def dir_target(base_env, docker_host, tmp_path):
    (tmp_path / "store").mkdir()
    return Target("dir", tmp_path / "store", dict(base_env, DOCKER_HOST=docker_host))


@pytest.fixture(params=["dir", "s3"])
def target(request, base_env, docker_host, tmp_path):
    """A directory store, and a radosgw bucket."""
    if request.param == "dir":
        return dir_target(base_env, docker_host, tmp_path)
    return s3_target(request.getfixturevalue("rgw"), base_env, docker_host)


def serve(servers, target, *args, host=0):
    """A server taking anonymous pushes into TARGET (blobs streamed through it, not redirected)."""
    return servers(HOSTS[host], target.env, store=target.store,
                   args=["-anonymous-push", "-redirect=false"] + [str(a) for a in args])


# --- the spec's requests ------------------------------------------------------------------------

def v2(method, path, body=None, headers=None, host=0):
    answer = call(HOSTS[host], method, path, headers, body)
    assert answer.headers.getheader("Docker-Distribution-API-Version") == "registry/2.0", answer
    return answer


error_code = registry_error_code


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def start_upload(name=NAME, host=0):
    """POST /v2/<name>/blobs/uploads/: the new session's Location."""
    answer = v2("POST", "/v2/%s/blobs/uploads/" % name, b"", host=host)
    assert answer.status == 202, answer
    location = answer.headers.getheader("Location")
    upload_id = location.rsplit("/", 1)[1]
    assert location == "/v2/%s/blobs/uploads/%s" % (name, upload_id) and re.match(r"^[0-9a-f]{32}$", upload_id)
    assert answer.headers.getheader("Docker-Upload-UUID") == upload_id
    assert answer.headers.getheader("Range") == "0-0"
    return location


def patch(location, data, first=None, host=0):
    """PATCH a chunk (with its Content-Range if FIRST is given, as the spec's chunked upload sends it)."""
    headers = {"Content-Type": "application/octet-stream"}
    if first is not None:
        headers["Content-Range"] = "%d-%d" % (first, first + len(data) - 1)
    return v2("PATCH", location, data, headers, host=host)


def chunked(data, piece=256 << 10):
    """DATA as a generator: http.client sends it with Transfer-Encoding: chunked, as docker does."""
    for offset in range(0, len(data), piece):
        yield data[offset:offset + piece]


def finish(location, digest, data=b"", first=None, host=0):
    headers = {"Content-Type": "application/octet-stream"}
    if data and first is not None:
        headers["Content-Range"] = "%d-%d" % (first, first + len(data) - 1)
    return v2("PUT", "%s?digest=%s" % (location, digest), data, headers, host=host)


def assert_created(answer, digest, name=NAME):
    assert answer.status == 201, answer
    assert answer.headers.getheader("Location") == "/v2/%s/blobs/%s" % (name, digest)
    assert answer.headers.getheader("Docker-Content-Digest") == digest
    assert answer.headers.getheader("Content-Length") == "0" and answer.body == b""


def assert_served(data, name=NAME, host=0):
    """GET /v2/<name>/blobs/<digest> answers DATA."""
    got = v2("GET", "/v2/%s/blobs/%s" % (name, digest_of(data)), host=host)
    assert got.status == 200 and len(got.body) == len(data), got
    assert got.body == data


def blobs_and_uploads(target):
    return [k for k in target.keys() if k.startswith(("blobs/", "uploads/"))]


# === uploads that become blobs ==================================================================

def test_a_chunked_upload_in_content_ranges_becomes_its_blob(target, servers):
    """The spec's chunked upload: chunks in order with Content-Range (a chunk out of order is a
    416 saying where the session is), GET says how far it got, the last chunk comes with the
    PUT; the blob is then served with its bytes and the session's keys are gone."""
    serve(servers, target)
    blob = random_bytes(13 * MiB + 12345, 1)
    location = start_upload()
    assert patch(location, blob[:6 * MiB], first=0).headers.getheader("Range") == "0-%d" % (6 * MiB - 1)
    assert patch(location, blob[6 * MiB:7 * MiB], first=6 * MiB).status == 202  # a short one (S3: the tail)

    skipped = patch(location, blob[8 * MiB:9 * MiB], first=8 * MiB)
    assert skipped.status == 416 and error_code(skipped) == "BLOB_UPLOAD_INVALID"
    assert skipped.headers.getheader("Range") == "0-%d" % (7 * MiB - 1)
    assert skipped.headers.getheader("Location") == location
    again = patch(location, blob[:MiB], first=0)
    assert again.status == 416 and again.headers.getheader("Range") == "0-%d" % (7 * MiB - 1)

    status = v2("GET", location)
    assert status.status == 204 and status.body == b""
    assert status.headers.getheader("Range") == "0-%d" % (7 * MiB - 1)
    assert status.headers.getheader("Location") == location
    assert patch(location, blob[7 * MiB:12 * MiB], first=7 * MiB).headers.getheader("Range") == \
        "0-%d" % (12 * MiB - 1)
    assert_created(finish(location, digest_of(blob), blob[12 * MiB:], first=12 * MiB), digest_of(blob))
    assert_served(blob)
    assert v2("HEAD", "/v2/%s/blobs/%s" % (NAME, digest_of(blob))).headers.getheader("Content-Length") == str(len(blob))
    assert blobs_and_uploads(target) == ["blobs/sha256/" + digest_of(blob)[7:]]
    assert target.multipart_uploads() == []
    gone = v2("GET", location)
    assert gone.status == 404 and error_code(gone) == "BLOB_UPLOAD_UNKNOWN"


def test_monolithic_uploads_go_straight_to_the_blobs_key(target, servers):
    """POST ?digest= with the blob, and POST then one PUT ?digest= with all of it: no session
    bytes are kept anywhere, small and multipart-sized blobs alike."""
    serve(servers, target)
    small, large = random_bytes(300 << 10, 2), random_bytes(17 * MiB + 3, 3)
    for blob in (small, large):
        assert_created(v2("POST", "/v2/%s/blobs/uploads/?digest=%s" % (NAME, digest_of(blob)), blob,
                          {"Content-Type": "application/octet-stream"}), digest_of(blob))
        assert_served(blob)
    other = random_bytes(9 * MiB, 4)
    location = start_upload()
    assert_created(finish(location, digest_of(other), other), digest_of(other))
    assert_served(other)
    empty = start_upload()
    assert_created(finish(empty, digest_of(b"")), digest_of(b""))  # the empty blob, with an empty PUT
    assert v2("GET", "/v2/%s/blobs/%s" % (NAME, digest_of(b""))).body == b""
    assert sorted(blobs_and_uploads(target)) == sorted("blobs/sha256/" + digest_of(b)[7:]
                                                       for b in (small, large, other, b""))
    assert target.multipart_uploads() == []


def test_docker_sends_a_layer_to_s3_once_and_the_blob_is_made_by_a_server_side_copy(
        rgw, base_env, docker_host, servers, fault_proxy):
    """docker pushes a layer as one chunked PATCH without Content-Range, then an empty PUT. The
    bytes go to S3 once, as the parts of one multipart upload (8 MiB each) and the short tail, in
    parallel with the reading; the finish adds the tail as the last part and copies the upload
    into blobs/sha256/<hex> inside S3 (UploadPartCopy, CopyObject): no byte is read back."""
    proxy = fault_proxy()
    target = s3_target(rgw, base_env, docker_host, endpoint=proxy.url)
    serve(servers, target)
    blob = random_bytes(20 * MiB + 777, 5)
    location = start_upload()
    upload_id = location.rsplit("/", 1)[1]
    before = len(proxy.log)
    sent = v2("PATCH", location, chunked(blob), {"Content-Type": "application/octet-stream"})
    assert sent.status == 202 and sent.headers.getheader("Range") == "0-%d" % (len(blob) - 1)
    assert_created(finish(location, digest_of(blob)), digest_of(blob))

    requests = proxy.log[before:]
    uploaded = [(r["key"], dict(r["query"]).get("partNumber"), int(r["headers"].get("content-length", 0)))
                for r in requests if r["method"] == "PUT" and "x-amz-copy-source" not in r["headers"]]
    data_key, tail_key = "uploads/%s/data" % upload_id, "uploads/%s/tail" % upload_id
    assert sorted((key, part, n) for key, part, n in uploaded if key in (data_key, tail_key)) == \
        [(data_key, "1", 8 * MiB), (data_key, "2", 8 * MiB), (tail_key, None, len(blob) - 16 * MiB)]
    assert sum(n for key, _, n in uploaded if key != "uploads/%s/state.json" % upload_id) == len(blob)
    copies = [(r["key"], r["headers"]["x-amz-copy-source"].split("/", 2)[2], dict(r["query"]).get("partNumber"))
              for r in requests if "x-amz-copy-source" in r["headers"]]
    assert copies == [(data_key, tail_key, "3"), ("blobs/sha256/" + digest_of(blob)[7:], data_key, None)]
    assert not [r for r in requests if r["method"] == "GET" and r["key"] in (data_key, tail_key)]  # nothing read back
    assert_served(blob)
    assert blobs_and_uploads(target) == ["blobs/sha256/" + digest_of(blob)[7:]]
    assert target.multipart_uploads() == []


# === what is refused, and leaves nothing behind =================================================

def test_bytes_that_do_not_match_their_digest_are_refused_and_leave_nothing(target, servers):
    """A chunked upload finished with another digest, and monolithic uploads (one part and
    several) with a wrong digest: 400 DIGEST_INVALID, no blob, no session, no multipart upload."""
    serve(servers, target)
    blob = random_bytes(11 * MiB, 6)
    wrong = digest_of(b"something else")
    location = start_upload()
    assert patch(location, blob).status == 202
    refused = finish(location, wrong)
    assert refused.status == 400 and error_code(refused) == "DIGEST_INVALID"
    assert "nothing was stored" in refused.json()["errors"][0]["message"]
    assert v2("GET", location).status == 404  # the session is gone with its bytes
    for data in (blob[:100], blob):
        answer = v2("POST", "/v2/%s/blobs/uploads/?digest=%s" % (NAME, wrong), data)
        assert answer.status == 400 and error_code(answer) == "DIGEST_INVALID", answer
    whole = start_upload()
    answer = finish(whole, wrong, blob)
    assert answer.status == 400 and error_code(answer) == "DIGEST_INVALID"
    missing = v2("HEAD", "/v2/%s/blobs/%s" % (NAME, wrong))
    assert missing.status == 404
    assert target.leftovers() == []


def test_a_session_answers_only_to_its_repository_and_to_ids_the_server_made(target, servers):
    """Another repository's name, forged and malformed ids: 404 BLOB_UPLOAD_UNKNOWN for every
    verb, before any key is built; the session itself is untouched."""
    server = serve(servers, target)
    blob = random_bytes(100 << 10, 7)
    location = start_upload()
    upload_id = location.rsplit("/", 1)[1]
    assert patch(location, blob[:1000], first=0).status == 202
    elsewhere = ["/v2/team/other/blobs/uploads/" + upload_id, "/v2/app/blobs/uploads/" + upload_id]
    forged = ["/v2/%s/blobs/uploads/%s" % (NAME, bad) for bad in (
        uuid.uuid4().hex, upload_id.upper(), upload_id[:31], upload_id + "0", "..%2F..%2Fetc", "state.json",
        "%2E%2E", "x" * 300)]
    for path in elsewhere + forged:
        for method, body in (("GET", None), ("PATCH", b"abc"), ("PUT", b""), ("DELETE", None)):
            target_path = path + ("?digest=" + digest_of(blob) if method == "PUT" else "")
            answer = v2(method, target_path, body)
            assert answer.status == 404 and error_code(answer) == "BLOB_UPLOAD_UNKNOWN", (method, path, answer)
    assert v2("GET", location).headers.getheader("Range") == "0-999"
    assert_created(finish(location, digest_of(blob), blob[1000:], first=1000), digest_of(blob))
    assert_served(blob)
    server.assert_no_traceback()


def test_delete_cancels_a_session_and_its_bytes(target, servers):
    serve(servers, target)
    location = start_upload()
    assert patch(location, random_bytes(10 * MiB, 8)).status == 202  # S3: a part and a tail
    cancelled = v2("DELETE", location)
    assert cancelled.status == 204 and cancelled.body == b""
    assert v2("GET", location).status == 404
    assert v2("DELETE", location).status == 404
    assert target.leftovers() == []


def test_a_mount_of_a_stored_blob_or_config_is_201_else_a_session_starts(tmp_path, base_env, docker_host, servers):
    """The store is content addressed: a blob any repository pushed, or an image's config (as GET
    serves them), mounts at once; an unknown digest, or arguments that are not valid, start a
    session instead (the spec's fallback)."""
    target = dir_target(base_env, docker_host, tmp_path)
    config = b'{"rootfs": {"type": "layers", "diff_ids": []}}'
    store = dogestry.LocalStore(str(target.store))
    store.put_bytes(dogestry.image_key(digest_of(config)[7:], "config.json"), config)
    serve(servers, target)
    blob = random_bytes(1000, 9)
    assert_created(v2("POST", "/v2/one/blobs/uploads/?digest=" + digest_of(blob), blob), digest_of(blob), "one")
    for digest in (digest_of(blob), digest_of(config)):
        mounted = v2("POST", "/v2/two/blobs/uploads/?mount=%s&from=one" % digest, b"")
        assert_created(mounted, digest, "two")
    assert_created(v2("POST", "/v2/two/blobs/uploads/?mount=" + digest_of(blob), b""), digest_of(blob), "two")
    for query in ("mount=%s&from=one" % digest_of(b"unknown"), "mount=sha256:xyz&from=one",
                  "mount=%s&from=Not..Valid" % digest_of(blob)):
        fallback = v2("POST", "/v2/two/blobs/uploads/?" + query, b"")
        assert fallback.status == 202 and fallback.headers.getheader("Location").startswith("/v2/two/blobs/uploads/")


# === sessions across requests, processes and restarts =========================================

def test_two_servers_on_one_store_share_a_chunked_upload(target, servers):
    """Behind a load balancer a session's requests reach different servers: each PATCH goes on
    where the store says the session is, and a server that did not see every byte reads them
    back to check the digest at the finish (a wrong one is still refused, leaving nothing)."""
    serve(servers, target, host=0)
    serve(servers, target, host=1)
    blob = random_bytes(14 * MiB + 5, 10)
    location = start_upload(host=0)
    assert patch(location, blob[:9 * MiB], first=0, host=0).status == 202
    assert patch(location, blob[9 * MiB:10 * MiB], first=9 * MiB, host=1).status == 202
    stale = patch(location, blob[9 * MiB:10 * MiB], first=9 * MiB, host=0)  # server 0 learns from the store
    assert stale.status == 416 and stale.headers.getheader("Range") == "0-%d" % (10 * MiB - 1)
    assert patch(location, blob[10 * MiB:], first=10 * MiB, host=0).status == 202
    assert_created(finish(location, digest_of(blob), host=1), digest_of(blob))
    assert_served(blob, host=0)

    other = random_bytes(3 * MiB, 11)
    location = start_upload(host=1)
    assert patch(location, other[:MiB], host=1).status == 202
    assert patch(location, other[MiB:], host=0).status == 202
    refused = finish(location, digest_of(blob), host=1)
    assert refused.status == 400 and error_code(refused) == "DIGEST_INVALID"
    assert blobs_and_uploads(target) == ["blobs/sha256/" + digest_of(blob)[7:]]
    assert target.multipart_uploads() == []


def test_a_session_outlives_a_restart_of_the_server(target, servers):
    server = serve(servers, target)
    blob = random_bytes(12 * MiB, 12)
    location = start_upload()
    assert patch(location, blob[:10 * MiB]).status == 202
    server.stop()
    serve(servers, target)
    assert v2("GET", location).headers.getheader("Range") == "0-%d" % (10 * MiB - 1)
    assert patch(location, blob[10 * MiB:], first=10 * MiB).status == 202
    assert_created(finish(location, digest_of(blob)), digest_of(blob))
    assert_served(blob)
    assert blobs_and_uploads(target) == ["blobs/sha256/" + digest_of(blob)[7:]]


# === slow and stopped clients, limits ==========================================================

def send_then_wait(address, head, body, stop_after):
    """Send HEAD and the first STOP_AFTER bytes of BODY, then nothing: the seconds until the
    server closed the connection (None if it did not within a minute)."""
    with socket.create_connection((address, PORT), timeout=60) as sock:
        sock.sendall(head + body[:stop_after])
        started = time.monotonic()
        sock.settimeout(60)
        try:
            read_until_closed(sock)
        except socket.timeout:
            return None
        return time.monotonic() - started


def test_a_client_that_stops_mid_chunk_is_cut_off_and_nothing_of_the_chunk_counts(target, servers):
    """A PATCH that promised 12 MiB and stopped after 9 (S3: one part already uploaded) is cut
    off once the client sent nothing for -read-timeout; the session holds what it held before,
    no part or temp file of the chunk is left, and the session can go on."""
    server = serve(servers, target, "-read-timeout", "2")
    blob = random_bytes(12 * MiB, 13)
    location = start_upload()
    head = b"PATCH %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (location.encode(), len(blob))
    took = send_then_wait(HOSTS[0], head, blob, 9 * MiB)
    assert took is not None and 1.5 <= took <= 10, took
    assert "request timed out" in server.stdout
    assert v2("GET", location).headers.getheader("Range") == "0-0"
    upload_id = location.rsplit("/", 1)[1]
    deadline = time.monotonic() + 30  # the abort of the chunk's multipart upload follows the cut
    while target.multipart_uploads() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert target.leftovers() == ["uploads/%s/state.json" % upload_id]
    assert patch(location, blob, first=0).status == 202
    assert_created(finish(location, digest_of(blob)), digest_of(blob))


def test_a_chunk_framed_wrongly_is_refused_and_nothing_of_it_counts(tmp_path, base_env, docker_host, servers):
    """A chunked body that breaks its framing halfway (a chunk without its CRLF): 400, the
    connection closed (the rest is never read as a request), the session as it was."""
    target = dir_target(base_env, docker_host, tmp_path)
    serve(servers, target)
    location = start_upload()
    assert patch(location, b"0123456789", first=0).status == 202
    head = b"PATCH %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % location.encode()
    with socket.create_connection((HOSTS[0], PORT), timeout=30) as sock:
        sock.sendall(head + b"5\r\nabcde\r\n5\r\nfghijXX0\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"BLOB_UPLOAD_INVALID"' in answer, answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert v2("GET", location).headers.getheader("Range") == "0-9"
    assert_created(finish(location, digest_of(b"0123456789")), digest_of(b"0123456789"))


def test_a_slow_but_steady_upload_outlives_the_read_timeout(tmp_path, base_env, docker_host, servers):
    """While a body streams, each piece gets the read timeout anew: 3 s of trickling through a
    server with -read-timeout 1 is not cut off (a request's head still must arrive within it)."""
    target = dir_target(base_env, docker_host, tmp_path)
    serve(servers, target, "-read-timeout", "1")
    blob = random_bytes(60 << 10, 14)
    location = start_upload()
    with socket.create_connection((HOSTS[0], PORT), timeout=30) as sock:
        sock.sendall(b"PATCH %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (location.encode(), len(blob)))
        started = time.monotonic()
        for offset in range(0, len(blob) - (5 << 10), 5 << 10):
            sock.sendall(blob[offset:offset + (5 << 10)])
            assert not select.select([sock], [], [], 0.25)[0]  # no answer, no close while it sends
        sock.sendall(blob[-(5 << 10):])
        answer = sock.recv(65536)
    assert time.monotonic() - started > 2.5
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert_created(finish(location, digest_of(blob)), digest_of(blob))


def test_twelve_uploads_at_once_keep_the_server_small(rgw, base_env, docker_host, servers):
    """Four docker pushes send about 12 layers at once: with 12 chunked PATCHes of 48 MiB
    streaming into radosgw together, the server's peak RSS stays under 100 MiB (each upload
    holds 256 KiB pieces in memory; its parts wait in small temp files)."""
    target = s3_target(rgw, base_env, docker_host)
    server = serve(servers, target)
    base = [random_bytes(MiB, 100 + n) for n in range(4)]

    def push(n):
        sha, location = hashlib.sha256(), start_upload("team/app%d" % n)

        def body():
            for k in range(48):
                piece = bytes([n]) + base[(n + k) % 4][1:]
                sha.update(piece)
                yield piece

        assert v2("PATCH", location, body()).status == 202
        assert_created(finish(location, "sha256:" + sha.hexdigest()), "sha256:" + sha.hexdigest(), "team/app%d" % n)

    with dogestry.thread_pool(12, "test-pushes") as pool:
        list(pool.map(push, range(12)))
    with open("/proc/%d/status" % server.proc.pid) as f:
        peak_kib = int([line for line in f if line.startswith("VmHWM:")][0].split()[1])
    assert peak_kib < 100 << 10, peak_kib
    assert len([k for k in target.keys() if k.startswith("blobs/")]) == 12 and target.multipart_uploads() == []


def test_sessions_in_progress_are_bounded(tmp_path, base_env, docker_host, servers):
    """A server serves at most 64 sessions at a time (429 TOOMANYREQUESTS beyond); a finished or
    cancelled one makes room."""
    target = dir_target(base_env, docker_host, tmp_path)
    serve(servers, target)
    locations = [start_upload() for _ in range(dogestry.UPLOAD_SESSIONS)]
    refused = v2("POST", "/v2/%s/blobs/uploads/" % NAME, b"")
    assert refused.status == 429 and error_code(refused) == "TOOMANYREQUESTS"
    assert refused.headers.getheader("Retry-After")
    assert v2("DELETE", locations[0]).status == 204
    start_upload()


def test_a_blob_larger_than_s3s_10000_parts_is_refused_before_its_bytes(tmp_path, base_env, docker_host, servers):
    target = dir_target(base_env, docker_host, tmp_path)
    serve(servers, target)
    location = start_upload()
    for path in (location, "/v2/%s/blobs/uploads/?digest=%s" % (NAME, digest_of(b"x"))):
        with socket.create_connection((HOSTS[0], PORT), timeout=30) as sock:
            method = b"PATCH" if path == location else b"POST"
            sock.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % (method, path.encode(), dogestry.UPLOAD_MAX + 1))
            answer = read_until_closed(sock)  # answered, and closed: the body is never read
        assert answer.startswith(b"HTTP/1.1 413 ") and b'"SIZE_INVALID"' in answer, answer
    assert v2("GET", location).headers.getheader("Range") == "0-0"


# === gc ==========================================================================================

def test_gc_deletes_abandoned_sessions_and_their_multipart_uploads_on_s3(rgw, base_env, docker_host, servers):
    """A session nobody added to for the grace period goes with its keys and its multipart
    upload; one a client added to since keeps its multipart upload however old, and finishes."""
    target = s3_target(rgw, base_env, docker_host)
    target.env["DOGESTRY_GC_MIN_GRACE"] = "10"
    serve(servers, target)
    abandoned, kept = start_upload(), start_upload()
    blob = random_bytes(11 * MiB, 15)
    assert patch(abandoned, random_bytes(10 * MiB, 16)).status == 202
    assert patch(kept, blob[:9 * MiB]).status == 202  # its multipart upload begins now
    state = "uploads/%s/state.json" % abandoned.rsplit("/", 1)[1]
    deadline = time.monotonic() + 60
    while target.client.age(state) < 11:  # gc judges ages on S3's own clock
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert patch(kept, blob[9 * MiB:], first=9 * MiB).status == 202  # young again

    gc = run_dogestry("gc", target.store, "--grace", "10s", env=target.env)
    assert gc.returncode == 0, gc.stderr
    assert "deleted upload %s" % abandoned.rsplit("/", 1)[1] in gc.stdout
    assert "1 abandoned upload session" in gc.stdout and "1 leftovers of killed pushes removed" in gc.stdout
    kept_id = kept.rsplit("/", 1)[1]
    assert [k for k in target.keys() if k.startswith("uploads/")] == \
        ["uploads/%s/state.json" % kept_id, "uploads/%s/tail" % kept_id]
    assert [key for key, _, _ in target.multipart_uploads()] == ["uploads/%s/data" % kept_id]
    assert v2("GET", abandoned).status == 404
    assert_created(finish(kept, digest_of(blob)), digest_of(blob))
    assert_served(blob)


def test_gc_deletes_abandoned_sessions_in_a_directory_store(tmp_path, base_env, docker_host, servers):
    target = dir_target(base_env, docker_host, tmp_path)
    serve(servers, target)
    abandoned, young = start_upload(), start_upload()
    assert patch(abandoned, random_bytes(MiB, 17)).status == 202
    assert patch(young, random_bytes(MiB, 18)).status == 202
    for path in (Path(target.store) / "uploads" / abandoned.rsplit("/", 1)[1]).iterdir():
        os.utime(path, (time.time() - 7200,) * 2)
    gc = run_dogestry("gc", target.store, "--grace", "1h", env=target.env)
    assert gc.returncode == 0, gc.stderr
    assert "1 abandoned upload session" in gc.stdout
    young_id = young.rsplit("/", 1)[1]
    assert target.keys() == ["uploads/%s/data" % young_id, "uploads/%s/state.json" % young_id]
