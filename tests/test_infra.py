"""Quick checks that the real-docker test fixtures work."""

import zlib

import pytest

from realdocker import build_image, docker_cli, image_layers, loopback_addresses, ping, random_bytes, text_bytes

pytestmark = pytest.mark.integration


def test_daemon_answers(docker_host):
    """The session daemon answers `docker version` and /_ping."""
    out = docker_cli(docker_host, "version", "--format", "{{.Server.Version}}").stdout
    assert out.strip()
    assert ping(docker_host)


def test_build_two_layer_image(docker_host, tmp_path):
    """build_image makes one layer per dict, and identical layers share a diffID."""
    layers = [{"a.txt": b"hello\n"}, {"dir/b.bin": random_bytes(4096, 1)}]
    image_id = build_image(docker_host, "dgst-infra:two", layers, workdir=tmp_path,
                           extra_lines=["LABEL purpose=infra"])
    assert image_id.startswith("sha256:") and len(image_id) == 71
    diff_ids = image_layers(docker_host, "dgst-infra:two")
    assert len(diff_ids) == 2
    build_image(docker_host, "dgst-infra:again", layers[:1])
    assert image_layers(docker_host, "dgst-infra:again") == diff_ids[:1]
    docker_cli(docker_host, "rmi", "dgst-infra:two", "dgst-infra:again")


def test_second_dockerd_with_tcp(dockerd_fleet, docker_host):
    """A second dockerd runs side by side and serves plain TCP on a loopback address of its own."""
    (address,) = loopback_addresses(1)
    second = dockerd_fleet(address + ":2375")
    assert second.tcp == "tcp://%s:2375" % address
    assert second.host != docker_host
    out = docker_cli(second.tcp, "version", "--format", "{{.Server.Version}}").stdout
    assert out.strip()
    assert docker_cli(docker_host, "version").returncode == 0
    second.stop()
    assert not ping(second.tcp)


def test_data_helpers_are_deterministic():
    """random_bytes/text_bytes are reproducible; text compresses, random does not."""
    assert random_bytes(1000, 7) == random_bytes(1000, 7) != random_bytes(1000, 8)
    assert len(random_bytes(0, 1)) == 0
    text = text_bytes(100000, 3)
    assert len(text) == 100000 and text == text_bytes(100000, 3)
    assert len(zlib.compress(text)) < len(text) // 3
    assert len(zlib.compress(random_bytes(100000, 3))) > 99000
