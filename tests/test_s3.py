"""Every command against a real, signature-checking S3 (Ceph radosgw), with the seed's URL syntax."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dogestry
from faultproxy import Overlap
from realdocker import build_image, docker_cli, image_id, random_bytes, run_dogestry, text_bytes

pytestmark = pytest.mark.integration


def ok(env, *args):
    proc = run_dogestry(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc



def s3_client(rgw, bucket, **kw):
    """An in-process client with the right credentials, to look behind dogestry's back."""
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    return dogestry.S3Client(dogestry.S3Location(bucket, "", None, rgw.endpoint),
                             dogestry.CredentialChain(config), config, **kw)


def s3_keys(rgw, bucket, prefix=""):
    """Every key in the bucket."""
    return [k for k, _ in s3_client(rgw, bucket).list(prefix)]


@pytest.fixture(scope="module")
def s3_image(docker_host):
    return build_image(docker_host, "dgtest/s3app:1", [
        {"bin/blob": random_bytes(1 << 20, 21)},
        {"doc/readme.txt": text_bytes(1 << 20, 22)},
        {"etc/conf": b"s3 = yes\n"}])


def test_seed_readme_forms_round_trip(docker_host, rgw, s3_env, s3_image, bucket):
    env = dict(s3_env)
    env["AWS_ACCESS_KEY"], env["AWS_SECRET_KEY"] = env.pop("AWS_ACCESS_KEY_ID"), env.pop("AWS_SECRET_ACCESS_KEY")
    ok(env, "push", "s3://%s?region=us-east-1" % bucket, "dgtest/s3app:1")
    ok(env, "push", "s3://%s/docker-repo/" % bucket, "dgtest/s3app:1")
    docker_cli(docker_host, "tag", "dgtest/s3app:1", "dgtest/s3app:keep")
    docker_cli(docker_host, "rmi", "dgtest/s3app:1", "dgtest/s3app:keep")

    ok(env, "pull", "s3://%s/docker-repo/" % bucket, "dgtest/s3app:1")

    assert image_id(docker_host, "dgtest/s3app:1") == s3_image
    keys = s3_keys(rgw, bucket)
    assert "repositories/dgtest/s3app/1" in keys
    assert "docker-repo/repositories/dgtest/s3app/1" in keys
    assert "docker-repo/images/%s/manifest.json" % s3_image[7:] in keys


def test_endpoint_in_the_url(s3_env, s3_image, bucket):
    env = dict(s3_env)
    endpoint = env.pop("AWS_ENDPOINT_URL")
    url = "s3://%s/via-url/?region=us-east-1&endpoint=%s" % (bucket, endpoint)
    ok(env, "push", url, "dgtest/s3app:1")
    assert "dgtest/s3app" in ok(env, "list", url).stdout


def test_list_inspect_remote_rm(s3_env, s3_image, bucket):
    url = "s3://%s/repo/" % bucket
    ok(s3_env, "push", url, "dgtest/s3app:1")
    listing = ok(s3_env, "list", url).stdout.splitlines()
    assert listing[1].split() == ["dgtest/s3app", "1", s3_image[7:19]]
    doc = json.loads(ok(s3_env, "inspect", url, "dgtest/s3app:1").stdout)
    assert doc["Id"] == s3_image
    assert "S3 bucket %s" % bucket in ok(s3_env, "remote", url).stdout
    ok(s3_env, "rm", url, "dgtest/s3app:1")
    assert "dgtest/s3app" not in ok(s3_env, "list", url).stdout


@pytest.mark.parametrize("prefix", ["with space/", "plus+equals=tilde~/", "unicodé-ünï/ñ/"])
def test_awkward_prefixes_round_trip(docker_host, rgw, s3_env, s3_image, bucket, prefix):
    url = "s3://%s/%s" % (bucket, prefix)
    ok(s3_env, "push", url, "dgtest/s3app:1")
    assert "dgtest/s3app" in ok(s3_env, "list", url).stdout
    docker_cli(docker_host, "tag", "dgtest/s3app:1", "dgtest/s3app:awkward")
    docker_cli(docker_host, "rmi", "dgtest/s3app:awkward")
    ok(s3_env, "pull", url, "dgtest/s3app:1")
    keys = s3_keys(rgw, bucket, prefix)
    assert prefix + "repositories/dgtest/s3app/1" in keys


def test_tags_with_awkward_characters(docker_host, s3_env, s3_image, bucket):
    docker_cli(docker_host, "tag", "dgtest/s3app:1", "dgtest/s3app:v1.0_rc-2")
    url = "s3://%s/" % bucket
    ok(s3_env, "push", url, "dgtest/s3app:v1.0_rc-2")
    docker_cli(docker_host, "rmi", "dgtest/s3app:v1.0_rc-2")
    ok(s3_env, "pull", url, "dgtest/s3app:v1.0_rc-2")
    assert image_id(docker_host, "dgtest/s3app:v1.0_rc-2") == s3_image


def test_wrong_secret_is_one_clear_line_and_writes_nothing(rgw, s3_env, s3_image, bucket):
    env = dict(s3_env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    proc = run_dogestry("push", "s3://%s/repo/" % bucket, "dgtest/s3app:1", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dogestry: error:")
    assert "SignatureDoesNotMatch" in proc.stderr and bucket in proc.stderr
    assert s3_keys(rgw, bucket) == []


def test_missing_bucket_is_a_clear_error(s3_env):
    proc = run_dogestry("list", "s3://no-such-bucket-dgtest/", env=s3_env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no-such-bucket-dgtest" in proc.stderr and "does not exist" in proc.stderr


def test_unreachable_endpoint_is_a_clear_error(s3_env):
    env = dict(s3_env, AWS_ENDPOINT_URL="http://127.0.0.1:1", AWS_MAX_ATTEMPTS="2")
    proc = run_dogestry("list", "s3://bucket/", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refused" in proc.stderr


@pytest.mark.parametrize("url, needle", [
    ("s3://", "invalid S3 URL"),
    ("s3://x/", "bucket names"),
    ("s3://bkt/?colour=blue", "unknown S3 URL option"),
    ("s3://bkt/?endpoint=ftp://x", "invalid S3 endpoint"),
    ("s3://bkt/a/../b/", "unsafe"),
])
def test_bad_s3_urls(s3_env, url, needle):
    proc = run_dogestry("list", url, env=s3_env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr


def test_large_layers_use_multipart_and_parallel_ranges(docker_host, rgw, s3_env, bucket):
    built = build_image(docker_host, "dgtest/s3big:1", [{"big.bin": random_bytes(40 << 20, 23)}])
    url = "s3://%s/big/" % bucket
    ok(dict(s3_env, DOGESTRY_CHUNKS="0"), "push", url, "dgtest/s3big:1")  # stored whole, not as chunks
    layer = json.loads(ok(s3_env, "inspect", url, "dgtest/s3big:1").stdout)["Layers"][0]
    assert layer["compression"] == "none" and layer["size"] > 40 << 20
    etag = s3_client(rgw, bucket).head("big/blobs/sha256/" + layer["digest"][7:]).getheader("ETag")
    assert etag.strip('"').endswith("-6")  # 40 MiB in 8 MiB parts
    docker_cli(docker_host, "rmi", "dgtest/s3big:1")

    ok(s3_env, "pull", url, "dgtest/s3big:1")

    assert image_id(docker_host, "dgtest/s3big:1") == built
    docker_cli(docker_host, "rmi", "dgtest/s3big:1")


def test_clock_skew_is_corrected_from_the_server_date(rgw, bucket):
    client = s3_client(rgw, bucket, clock=lambda: time.time() - 3600, sleep=lambda s: None)
    assert list(client.list("")) == []


def test_listing_follows_every_page_and_rm_deletes_many_tags(docker_host, rgw, s3_env, s3_image, bucket):
    url = "s3://%s/paged/" % bucket
    tags = ["t%d" % i for i in range(5)]
    for tag in tags:
        docker_cli(docker_host, "tag", "dgtest/s3app:1", "dgtest/s3app:" + tag)
    ok(s3_env, "push", url, *["dgtest/s3app:" + t for t in tags])
    paged = [k for k, _ in s3_client(rgw, bucket).list("paged/repositories/", page_size=2)]
    assert paged == ["paged/repositories/dgtest/s3app/" + t for t in tags]

    ok(s3_env, "rm", url, *["dgtest/s3app:" + t for t in tags[:4]])

    assert s3_keys(rgw, bucket, "paged/repositories/") == ["paged/repositories/dgtest/s3app/t4"]
    for tag in tags:
        docker_cli(docker_host, "rmi", "dgtest/s3app:" + tag)


def test_list_reads_the_tags_concurrently(docker_host, rgw, s3_env, s3_image, bucket, fault_proxy):
    """One GET per tag file: on S3 they go out several at a time, and the table keeps its order."""
    url = "s3://%s/many/" % bucket
    tags = ["v%02d" % i for i in range(12)]
    for tag in tags:
        docker_cli(docker_host, "tag", "dgtest/s3app:1", "dgtest/s3app:" + tag)
    ok(s3_env, "push", url, *["dgtest/s3app:" + t for t in tags])
    for tag in tags:
        docker_cli(docker_host, "rmi", "dgtest/s3app:" + tag)
    tag_reads = Overlap(lambda req: req.method == "GET" and "/repositories/" in req.path, delay=0.2)
    proxy = fault_proxy(tag_reads)
    listed = ok(dict(s3_env, AWS_ENDPOINT_URL=proxy.url), "list", url).stdout.splitlines()[1:]

    assert [line.split()[:2] for line in listed] == [["dgtest/s3app", t] for t in tags]
    assert tag_reads.most > 1  # the tag GETs overlapped
    assert len([e for e in proxy.log if "/repositories/" in e["path"] and e["method"] == "GET"]) == len(tags)


def test_concurrent_pushes_of_images_sharing_a_layer(docker_host, rgw, s3_env, bucket):
    """Two pushes at once into one S3 prefix (one multipart-sized shared layer): both finish, each
    blob is stored once, no multipart upload is left open, and both images pull back."""
    base = {"data/base.bin": random_bytes(20 << 20, 31)}
    one = build_image(docker_host, "dgtest/s3twin:one", [base, {"one.txt": text_bytes(2 << 20, 32)}])
    two = build_image(docker_host, "dgtest/s3twin:two", [base, {"two.txt": text_bytes(2 << 20, 33)}])
    url = "s3://%s/twins/" % bucket
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "dogestry.py"), "push", url]
    procs = [subprocess.Popen(cmd + [ref], env=s3_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True) for ref in ("dgtest/s3twin:one", "dgtest/s3twin:two")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    blob_keys = [k for k in s3_keys(rgw, bucket, "twins/blobs/")]
    assert len(blob_keys) == 3, blob_keys  # the shared layer once, each top layer once
    uploads = s3_client(rgw, bucket).call("GET", "", query=[("uploads", "")])[1]
    assert b"<Upload>" not in uploads  # no multipart upload left behind
    docker_cli(docker_host, "rmi", "dgtest/s3twin:one", "dgtest/s3twin:two")
    ok(s3_env, "pull", url, "dgtest/s3twin:one")
    ok(s3_env, "pull", url, "dgtest/s3twin:two")
    assert (image_id(docker_host, "dgtest/s3twin:one"), image_id(docker_host, "dgtest/s3twin:two")) == (one, two)


def test_server_side_copy_above_the_single_copy_limit_goes_in_parts(rgw):
    """Objects larger than one CopyObject may copy (5 GiB on AWS) are copied with UploadPartCopy:
    the same bytes arrive, and no multipart upload is left open.  (The limits are lowered here.)"""
    from conftest import make_bucket
    source, target = make_bucket(rgw, "dgcopy-src-%d" % time.time_ns()), make_bucket(rgw, "dgcopy-dst-%d" % time.time_ns())
    data = random_bytes(12 << 20, 41)
    src = s3_client(rgw, source)
    src.put("blob", lambda: data, len(data), hashlib.sha256(data).hexdigest())
    dst = s3_client(rgw, target)

    dst.copy_object(source, "blob", "copied/blob", len(data), single_max=1 << 20, part_size=5 << 20)

    assert dst.get("copied/blob").read() == data
    assert dst.uploads_under("") == []
