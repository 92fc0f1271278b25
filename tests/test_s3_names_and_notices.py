"""S3 endpoints that cannot be reached, as users meet them: a bucket host name that does not
resolve (the S3 endpoint forgotten) fails at once, naming the host and where an endpoint is set;
a temporary resolver failure is retried; and a request that keeps failing for seconds says so
on stderr, in one line, even with -q.

Name resolution is made deterministic by running dogestry in a mount namespace of its own
(`unshare -m`, the suite runs as root) with /etc/nsswitch.conf and /etc/resolv.conf bind-mounted:
`hosts: files` (no DNS: EAI_NONAME), or `hosts: dns` with a name server on a loopback address
where nothing listens (EAI_AGAIN)."""

import os
import random
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from conftest import skip_or_fail
from faultproxy import s3_error
from realdocker import DOGESTRY, build_image, ok, one_error_line, random_bytes, run_dogestry

pytestmark = pytest.mark.integration

WARNING = "dogestry: warning:"


@pytest.fixture
def aws_env(tmp_path):
    """Keys set, no endpoint: dogestry addresses the bucket on AWS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="secret",
               AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.fixture
def resolver(tmp_path):
    """Factory: command(args, dns) -> a command line running dogestry ARGS with name resolution from
    /etc/hosts only (dns=False) or from a name server nobody answers for (dns=True)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        skip_or_fail("needs root and unshare(1) to give dogestry a resolver configuration of its own")
    nsswitch = tmp_path / "nsswitch.conf"
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.%d.%d.%d\noptions timeout:1 attempts:1\n"
                      % (random.randrange(100, 255), random.randrange(256), random.randrange(2, 255)))

    def command(args, dns):
        nsswitch.write_text("hosts: dns\n" if dns else "hosts: files\n")
        script = 'mount --bind "$1" /etc/nsswitch.conf && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, "sh", str(nsswitch), str(resolv),
                sys.executable, str(DOGESTRY)] + [str(a) for a in args]
    return command


def aws_host(bucket):
    return "%s.s3.us-east-1.amazonaws.com" % bucket


def test_a_bucket_host_that_does_not_resolve_fails_at_once_naming_it_and_the_endpoint_settings(aws_env, resolver):
    bucket = "dgtest-" + uuid.uuid4().hex[:10]
    started = time.monotonic()

    proc = subprocess.run(resolver(["list", "s3://%s/repo/" % bucket], dns=False), env=aws_env, timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)

    line = one_error_line(proc, "cannot resolve the host name %s" % aws_host(bucket), "Name or service not known",
                          "no endpoint is set", "?endpoint=", "AWS_ENDPOINT_URL")
    assert "attempt" not in line  # not worth a retry
    assert time.monotonic() - started < 20


def test_a_temporary_name_resolution_failure_is_retried_and_the_error_names_the_host(aws_env, resolver):
    bucket = "dgtest-" + uuid.uuid4().hex[:10]

    proc = subprocess.run(resolver(["list", "s3://%s/" % bucket], dns=True), env=dict(aws_env, AWS_MAX_ATTEMPTS="3"),
                          timeout=60, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)

    one_error_line(proc, "cannot resolve the host name %s" % aws_host(bucket), "Temporary failure in name resolution",
                   "after 3 attempts", "?endpoint=", "AWS_ENDPOINT_URL")


def test_a_resolver_failing_for_seconds_gets_one_warning_naming_the_host_even_with_q(aws_env, resolver):
    """The retries of a request last up to two minutes: after a few seconds of them a line says
    what is going on (a warning, so -q shows it too: a silent minute looks like a hang)."""
    bucket = "dgtest-" + uuid.uuid4().hex[:10]
    proc = subprocess.Popen(resolver(["-q", "list", "s3://%s/" % bucket], dns=True), env=aws_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        first = proc.stderr.readline()  # blocks until dogestry writes its first line
    finally:
        proc.terminate()
    rest = proc.communicate(timeout=30)[1]

    assert first.startswith(WARNING), first + rest
    assert "S3 requests to %s keep failing" % aws_host(bucket) in first
    assert "Temporary failure in name resolution" in first and "retrying for up to 2m" in first
    assert WARNING not in rest and proc.returncode != 0


def test_s3_failing_for_six_seconds_gets_one_warning_and_the_push_succeeds(docker_host, s3_env, bucket, fault_proxy):
    """Every blob upload is answered 503 SlowDown for six seconds, in two upload threads: one line
    says so, naming the endpoint, and the push rides it out."""
    token = uuid.uuid4().hex[:8]
    ref = "dgnotice/app:%s" % token
    build_image(docker_host, ref, [{"a.bin": random_bytes(300 << 10, int(token, 16))},
                                   {"b.bin": random_bytes(300 << 10, int(token, 16) + 1)},
                                   {"c.bin": random_bytes(300 << 10, int(token, 16) + 2)}])
    first_upload = []

    def slow_down_for_six_seconds(req):
        if req.method == "PUT" and "/blobs/sha256/" in req.path:
            first_upload.append(time.monotonic())
            if time.monotonic() - first_upload[0] < 6.0:
                return s3_error(503, "SlowDown", "Please reduce your request rate.", req.path)
        return None

    proxy = fault_proxy(slow_down_for_six_seconds)
    store = "s3://%s/notice/" % bucket

    proc = ok(run_dogestry("-q", "push", store, ref, env=dict(s3_env, AWS_ENDPOINT_URL=proxy.url)))

    warnings = [line for line in proc.stderr.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1, proc.stderr
    assert "S3 requests to %s keep failing" % proxy.url[len("http://"):] in warnings[0]
    assert "SlowDown, HTTP 503" in warnings[0]
    assert len([e for e in proxy.log if e["status"] == 503]) >= 2
    assert token in ok(run_dogestry("list", store, env=s3_env)).stdout
