"""Talking to a dockerd over TCP with TLS, the docker CLI way (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH)."""

import shutil

import pytest

from conftest import skip_or_fail
from realdocker import (DockerdError, build_image, client_env, docker_cli, find_docker, image_id,
                        loopback_addresses, random_bytes, run_dogestry, start_dockerd)
from testcerts import CLIENT_EXT, ca_dir, make_ca, make_leaf, server_ext

pytestmark = pytest.mark.integration

TLS_IP = loopback_addresses(1, ports=(2376,))[0]  # a loopback address of its own
TLS_HOST = "tcp://%s:2376" % TLS_IP
IMAGE = "dgst-tls/app:v1"


# --- certificates, as in docker's "Protect the Docker daemon socket" guide ---

SERVER_EXT = server_ext("IP:%s" % TLS_IP)


def cert_dir(path, ca, cert, key):
    """A DOCKER_CERT_PATH-style directory holding copies as ca.pem, cert.pem, key.pem."""
    path.mkdir(parents=True)
    for src, dst in ((ca, "ca.pem"), (cert, "cert.pem"), (key, "key.pem")):
        shutil.copyfile(str(src), str(path / dst))
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The CA, server and client files; plus cert dirs: good, wrong CA, broken key."""
    d = ca_dir(tmp_path_factory, "tls")
    make_leaf(d, "ca", "server", "/CN=%s" % TLS_IP, SERVER_EXT)
    make_leaf(d, "ca", "client", "/CN=client", CLIENT_EXT)
    make_ca(d, "other-ca")
    good = cert_dir(d / "good", d / "ca.pem", d / "client-cert.pem", d / "client-key.pem")
    wrong_ca = cert_dir(d / "wrong-ca", d / "other-ca.pem", d / "client-cert.pem", d / "client-key.pem")
    broken_key = cert_dir(d / "broken-key", d / "ca.pem", d / "client-cert.pem", d / "client-key.pem")
    (broken_key / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    return {"dir": d, "good": good, "wrong_ca": wrong_ca, "broken_key": broken_key}


@pytest.fixture(scope="module")
def tls_dockerd(certs, tmp_path_factory):
    """A dockerd with --tlsverify on TLS_HOST (and a plain unix socket for the test's own CLI use)."""
    if not find_docker():
        skip_or_fail("docker CLI not found on PATH (install docker.io)")
    d = certs["dir"]
    args = ["--tlsverify", "--tlscacert", d / "ca.pem", "--tlscert", d / "server-cert.pem",
            "--tlskey", d / "server-key.pem"]
    try:
        handle = start_dockerd(tmp_path_factory.mktemp("tlsd"), TLS_HOST, extra_args=args)
    except DockerdError as e:
        reason = "cannot start a TLS dockerd: %s" % e
    else:
        try:
            yield handle
        finally:
            handle.stop()
        return
    skip_or_fail(reason)



@pytest.fixture
def app_image(tls_dockerd, tmp_path):
    """IMAGE present on the TLS daemon (built if an earlier test left it missing); its ID."""
    found = image_id(tls_dockerd.host, IMAGE)
    if found:
        return found
    layers = [{"data/random.bin": random_bytes(256 << 10, 5)}, {"etc/hello.txt": b"hello over TLS\n"}]
    return build_image(tls_dockerd.host, IMAGE, layers, workdir=tmp_path, extra_lines=["LABEL tls=yes"])


@pytest.fixture
def home(tmp_path):
    """An empty HOME, so the developer's ~/.docker never leaks into a test."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def tls_env(home, **variables):
    """Environment for dogestry: DOCKER_HOST=TLS_HOST, HOME, no inherited DOCKER_TLS*, plus VARIABLES."""
    env = client_env(TLS_HOST)
    env["HOME"] = str(home)
    env.update({k: str(v) for k, v in variables.items()})
    return env


def round_trip(daemon, env, store, image):
    """push, remove from the engine (over the unix socket), pull: the same image comes back."""
    proc = run_dogestry("push", store, IMAGE, env=env)
    assert proc.returncode == 0, proc.stderr
    docker_cli(daemon.host, "rmi", "-f", IMAGE)
    assert image_id(daemon.host, IMAGE) is None
    proc = run_dogestry("pull", store, IMAGE, env=env)
    assert proc.returncode == 0, proc.stderr
    assert image_id(daemon.host, IMAGE) == image


def assert_clean_failure(proc):
    """Exit 1 with exactly one 'dogestry: error:' line and no traceback; return that line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("dogestry: error:"), proc.stderr
    return lines[0]


def test_tls_verify_with_cert_path(tls_dockerd, certs, app_image, home, tmp_path):
    """DOCKER_TLS_VERIFY=1 + DOCKER_CERT_PATH: push and pull over TLS with a client cert."""
    env = tls_env(home, DOCKER_TLS_VERIFY="1", DOCKER_CERT_PATH=certs["good"])
    round_trip(tls_dockerd, env, tmp_path / "store", app_image)


def test_tls_verify_with_home_docker_dir(tls_dockerd, certs, app_image, home, tmp_path):
    """DOCKER_TLS_VERIFY=1 without DOCKER_CERT_PATH reads $HOME/.docker/{ca,cert,key}.pem."""
    shutil.copytree(str(certs["good"]), str(home / ".docker"))
    env = tls_env(home, DOCKER_TLS_VERIFY="1")
    round_trip(tls_dockerd, env, tmp_path / "store", app_image)


def test_tls_without_verify(tls_dockerd, certs, app_image, home, tmp_path):
    """DOCKER_TLS=1 does TLS with the client cert but does not check the server (wrong ca.pem is fine)."""
    env = tls_env(home, DOCKER_TLS="1", DOCKER_CERT_PATH=certs["wrong_ca"])
    proc = run_dogestry("push", tmp_path / "store", IMAGE, env=env)
    assert proc.returncode == 0, proc.stderr


def test_server_signed_by_another_ca_is_refused(tls_dockerd, certs, app_image, home, tmp_path):
    """DOCKER_TLS_VERIFY=1 with a ca.pem that did not sign the server: one clear error line."""
    env = tls_env(home, DOCKER_TLS_VERIFY="1", DOCKER_CERT_PATH=certs["wrong_ca"])
    line = assert_clean_failure(run_dogestry("push", tmp_path / "store", IMAGE, env=env))
    assert "certificate" in line.lower() or "verify" in line.lower(), line


def test_plain_http_to_tls_port_fails_cleanly(tls_dockerd, app_image, home, tmp_path):
    """No TLS variables against the TLS port: a clean error, not a traceback."""
    assert_clean_failure(run_dogestry("push", tmp_path / "store", IMAGE, env=tls_env(home)))


def test_broken_client_key_fails_cleanly(tls_dockerd, certs, app_image, home, tmp_path):
    """A DOCKER_CERT_PATH whose key.pem is garbage: a clean error naming the TLS files."""
    env = tls_env(home, DOCKER_TLS_VERIFY="1", DOCKER_CERT_PATH=certs["broken_key"])
    line = assert_clean_failure(run_dogestry("push", tmp_path / "store", IMAGE, env=env))
    assert str(certs["broken_key"] / "key.pem") in line, line
