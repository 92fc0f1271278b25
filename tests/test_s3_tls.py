"""S3 over HTTPS: dogestry verifies the endpoint's certificate, with AWS_CA_BUNDLE or ca_bundle.

Real AWS is always https.  Here radosgw (plain HTTP) sits behind a TLS-terminating relay
(tests/tlsrelay.py) whose certificate comes from a throwaway CA made with the openssl CLI:
the server certificate names IP 127.0.0.1 and DNS localhost, a second one only
example.invalid.  The relay passes bytes on unchanged, so SigV4 signatures stay valid.
"""

from collections import namedtuple
from pathlib import Path

import pytest

import dogestry
from realdocker import (build_image, docker_cli, image_id, ok, one_error_line, random_bytes,
                        run_dogestry, text_bytes)
from testcerts import ca_dir, make_leaf, server_ext
from faultproxy import started_servers
from tlsrelay import TLSRelay

pytestmark = pytest.mark.integration

IMAGE = "dgtest/tlsapp:1"


Certs = namedtuple("Certs", "dir ca ca_key server server_key wrong_name wrong_name_key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The test CA, a server certificate for 127.0.0.1 and localhost, and one for example.invalid."""
    d = ca_dir(tmp_path_factory, "s3tls")
    make_leaf(d, "ca", "server", "/CN=127.0.0.1", server_ext("IP:127.0.0.1, DNS:localhost"))
    make_leaf(d, "ca", "wrong-name", "/CN=example.invalid", server_ext("DNS:example.invalid"))
    return Certs(d, d / "ca.pem", d / "ca-key.pem", d / "server-cert.pem", d / "server-key.pem",
                 d / "wrong-name-cert.pem", d / "wrong-name-key.pem")


# --- the HTTPS endpoint: a TLS relay in front of radosgw ---

@pytest.fixture
def tls_relay(rgw, certs):
    """Factory: start(cert="server") -> a running TLSRelay to radosgw; all stopped after the test."""
    def make(cert="server"):
        return TLSRelay(rgw.endpoint, certs.dir / (cert + "-cert.pem"), certs.dir / (cert + "-key.pem"))

    with started_servers(make) as start:
        yield start


@pytest.fixture
def relay(tls_relay):
    """https://127.0.0.1:<port>, serving the certificate for 127.0.0.1 and localhost."""
    return tls_relay()


def https_env(s3_env, ca_bundle=None, endpoint=None):
    """s3_env without its plain-HTTP endpoint; AWS_CA_BUNDLE and AWS_ENDPOINT_URL if given."""
    env = {k: v for k, v in s3_env.items() if k != "AWS_ENDPOINT_URL"}
    if ca_bundle is not None:
        env["AWS_CA_BUNDLE"] = str(ca_bundle)
    if endpoint is not None:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def s3_keys(rgw, bucket, prefix=""):
    """Every key in the bucket, read behind dogestry's back through radosgw's plain endpoint."""
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    client = dogestry.S3Client(dogestry.S3Location(bucket, "", None, rgw.endpoint),
                               dogestry.CredentialChain(config), config)
    return [k for k, _ in client.list(prefix)]


def write_aws_config(s3_env, text):
    """$HOME/.aws/config (HOME is the test's own, from s3_env)."""
    aws = Path(s3_env["HOME"]) / ".aws"
    aws.mkdir(exist_ok=True)
    (aws / "config").write_text(text)


@pytest.fixture(scope="module")
def tls_image(docker_host):
    return build_image(docker_host, IMAGE, [
        {"bin/blob": random_bytes(1 << 20, 41)},
        {"doc/readme.txt": text_bytes(1 << 20, 42)},
        {"etc/conf": b"tls = yes\n"}])


# --- a trusted endpoint works like plain HTTP ---

def test_push_and_pull_over_https_with_aws_ca_bundle(docker_host, rgw, s3_env, certs, relay, bucket):
    built = build_image(docker_host, "dgtest/tlsround:1", [
        {"bin/blob": random_bytes(2 << 20, 43)},
        {"doc/readme.txt": text_bytes(1 << 20, 44)}])
    env = https_env(s3_env, ca_bundle=certs.ca)
    url = "s3://%s/tls/?endpoint=%s" % (bucket, relay.url)

    ok(run_dogestry("push", url, "dgtest/tlsround:1", env=env))
    assert "tls/repositories/dgtest/tlsround/1" in s3_keys(rgw, bucket, "tls/")  # it is in radosgw
    docker_cli(docker_host, "rmi", "dgtest/tlsround:1")
    assert image_id(docker_host, "dgtest/tlsround:1") is None

    ok(run_dogestry("pull", url, "dgtest/tlsround:1", env=env))

    assert image_id(docker_host, "dgtest/tlsround:1") == built
    listing = ok(run_dogestry("list", url, env=env)).stdout.splitlines()
    assert listing[1].split() == ["dgtest/tlsround", "1", built[7:19]]
    assert relay.handshakes >= 3 and relay.failed_handshakes == []
    assert relay.bytes_up > 2 << 20  # the layers went up through TLS
    docker_cli(docker_host, "rmi", "dgtest/tlsround:1")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_aws_endpoint_url_with_https(rgw, s3_env, certs, relay, tls_image, bucket, host):
    """AWS_ENDPOINT_URL=https://...; the certificate names the IP and the DNS name."""
    env = https_env(s3_env, ca_bundle=certs.ca, endpoint="https://%s:%d" % (host, relay.port))
    url = "s3://%s/env/" % bucket

    ok(run_dogestry("push", url, IMAGE, env=env))

    assert "dgtest/tlsapp" in ok(run_dogestry("list", url, env=env)).stdout
    assert "env/repositories/dgtest/tlsapp/1" in s3_keys(rgw, bucket)
    assert relay.handshakes >= 1 and relay.failed_handshakes == []


def test_ca_bundle_in_the_aws_config_file(rgw, s3_env, certs, relay, tls_image, bucket):
    write_aws_config(s3_env, "[default]\nca_bundle = %s\n" % certs.ca)
    env = https_env(s3_env, endpoint=relay.url)
    url = "s3://%s/cfg/" % bucket

    ok(run_dogestry("push", url, IMAGE, env=env))

    assert "dgtest/tlsapp" in ok(run_dogestry("list", url, env=env)).stdout
    assert "cfg/repositories/dgtest/tlsapp/1" in s3_keys(rgw, bucket)


def test_ca_bundle_of_a_named_profile(s3_env, certs, relay, tls_image, bucket):
    write_aws_config(s3_env, "[default]\nregion = us-east-1\n\n[profile tls]\nca_bundle = %s\n" % certs.ca)
    env = dict(https_env(s3_env, endpoint=relay.url), AWS_PROFILE="tls")
    url = "s3://%s/profile/" % bucket

    ok(run_dogestry("push", url, IMAGE, env=env))

    assert "dgtest/tlsapp" in ok(run_dogestry("list", url, env=env)).stdout


def test_aws_ca_bundle_beats_the_config_file(s3_env, certs, relay, tls_image, bucket):
    """As in the AWS SDKs, the environment variable wins over the profile's ca_bundle."""
    write_aws_config(s3_env, "[default]\nca_bundle = %s\n" % (certs.dir / "no-such-ca.pem"))
    env = https_env(s3_env, ca_bundle=certs.ca, endpoint=relay.url)
    url = "s3://%s/both/" % bucket

    ok(run_dogestry("push", url, IMAGE, env=env))

    assert "dgtest/tlsapp" in ok(run_dogestry("list", url, env=env)).stdout


# --- an endpoint dogestry must not trust ---

def test_untrusted_certificate_fails_cleanly_and_writes_nothing(rgw, s3_env, certs, relay, tls_image, bucket):
    """Without the test CA, the system CAs do not vouch for the relay: not one byte is sent."""
    url = "s3://%s/untrusted/" % bucket

    proc = run_dogestry("push", url, IMAGE, env=https_env(s3_env, endpoint=relay.url))

    one_error_line(proc, "certificate verify failed", "unable to get local issuer certificate", bucket,
                   relay.url, "AWS_CA_BUNDLE")
    assert proc.returncode == 1 and "attempt" not in proc.stderr  # no retries: trying again cannot help
    assert relay.handshakes == 0 and relay.bytes_up == 0
    assert len(relay.failed_handshakes) == 1  # dogestry hung up in the handshake, once
    assert s3_keys(rgw, bucket) == []
    trusted = https_env(s3_env, ca_bundle=certs.ca, endpoint=relay.url)
    assert ok(run_dogestry("list", url, env=trusted)).stdout.splitlines()[1:] == []


def test_pull_from_an_untrusted_endpoint_loads_nothing(docker_host, s3_env, certs, relay, tls_image, bucket):
    url = "s3://%s/pull/" % bucket
    docker_cli(docker_host, "tag", IMAGE, "dgtest/tlsapp:untrusted")
    ok(run_dogestry("push", url, "dgtest/tlsapp:untrusted", env=https_env(s3_env, certs.ca, relay.url)))
    docker_cli(docker_host, "rmi", "dgtest/tlsapp:untrusted")

    env = https_env(s3_env, endpoint=relay.url)
    proc = run_dogestry("pull", url, "dgtest/tlsapp:untrusted", env=env)

    one_error_line(proc, "certificate verify failed")
    assert image_id(docker_host, "dgtest/tlsapp:untrusted") is None


def not_pem(certs):
    path = certs.dir / "not-pem.txt"
    path.write_text("this is not a certificate\n")
    return path


def empty_file(certs):
    path = certs.dir / "empty.pem"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("bundle", [
    lambda certs: certs.dir / "no-such-ca.pem",
    not_pem,
    empty_file,
    lambda certs: certs.ca_key,  # a PEM file, but a key, not a certificate
    lambda certs: certs.dir,
], ids=["missing", "not-pem", "empty", "key-not-cert", "directory"])
def test_unusable_aws_ca_bundle_is_one_clear_error(s3_env, certs, relay, bucket, bundle):
    path = bundle(certs)
    env = https_env(s3_env, ca_bundle=path, endpoint=relay.url)

    proc = run_dogestry("list", "s3://%s/" % bucket, env=env)

    one_error_line(proc, "CA bundle", str(path))
    assert proc.returncode == 1
    assert relay.handshakes == 0 and relay.failed_handshakes == []  # it never got as far as connecting


def test_unusable_ca_bundle_in_the_config_file_is_one_clear_error(s3_env, certs, relay, bucket):
    missing = certs.dir / "no-such-ca.pem"
    write_aws_config(s3_env, "[default]\nca_bundle = %s\n" % missing)

    proc = run_dogestry("list", "s3://%s/" % bucket, env=https_env(s3_env, endpoint=relay.url))

    one_error_line(proc, "CA bundle", str(missing))
    assert proc.returncode == 1


@pytest.mark.parametrize("host, mismatch", [
    ("127.0.0.1", "IP address mismatch"),
    ("localhost", "Hostname mismatch"),
])
def test_certificate_for_another_host_name_is_refused(rgw, s3_env, certs, tls_relay, tls_image, bucket,
                                                       host, mismatch):
    """Signed by the trusted CA, but for example.invalid: the name check still refuses it."""
    wrong = tls_relay("wrong-name")
    env = https_env(s3_env, ca_bundle=certs.ca, endpoint="https://%s:%d" % (host, wrong.port))

    proc = run_dogestry("push", "s3://%s/wrong-name/" % bucket, IMAGE, env=env)

    one_error_line(proc, "certificate verify failed", mismatch, host)
    assert proc.returncode == 1
    assert s3_keys(rgw, bucket) == []
    assert wrong.handshakes == 0 and wrong.bytes_up == 0
