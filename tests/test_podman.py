"""podman as the engine: its Docker API service (`podman system service`) is what users point
DOCKER_HOST at.  A real podman (vfs storage, a root of its own) serves the module; images move
podman -> store -> dockerd, dockerd -> store -> podman and podman -> store -> podman, IDs intact.

podman's own ways, which dogestry meets here: `podman save` names layers <diffID>.tar (with
<v1 id>/layer.tar symlinks to them), bare names become localhost/NAME, and a failed load is an
HTTP 500 rather than an error line.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import skip_or_fail
from realdocker import (_die_with_parent, build_image, docker_cli, image_id, one_error_line, ping, random_bytes, remove_tree,
                        run_dogestry, text_bytes, write_context)

pytestmark = pytest.mark.integration


class ServiceProcess:
    """A daemon the tests started (self.proc, logging to self.log): stop() ends it (SIGTERM, then SIGKILL)."""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Podman(ServiceProcess):
    """A podman API service on a unix socket, and the podman CLI on the same storage."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.socket = self.workdir / "podman.sock"
        self.host = "unix://%s" % self.socket
        self.base = ["podman", "--storage-driver", "vfs", "--root", str(self.workdir / "root"),
                     "--runroot", str(self.workdir / "run")]
        self.log = open(str(self.workdir / "service.log"), "wb")
        self.proc = subprocess.Popen(self.base + ["system", "service", "--time=0", self.host],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)

    def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("podman service exited: %s" % (self.workdir / "service.log").read_text())
            if ping(self.host):
                return self
            time.sleep(0.05)
        raise RuntimeError("podman service not ready: %s" % (self.workdir / "service.log").read_text())

    def cli(self, *args, check=True):
        proc = subprocess.run(self.base + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def build(self, tag, layers, workdir):
        ctx = Path(tempfile.mkdtemp(prefix="ctx", dir=str(workdir)))
        write_context(ctx, layers)
        self.cli("build", "-q", "-t", tag, ctx)
        return self.image_id(tag)

    def image_id(self, ref):
        proc = self.cli("image", "inspect", "--format", "{{.Id}}", ref, check=False)
        return "sha256:" + proc.stdout.strip() if proc.returncode == 0 else None



@contextlib.contextmanager
def running_service(make, prefix):
    """A service make(workdir) started in a fresh temp dir, ready (a start that fails is
    skip_or_fail), then stopped and its dir removed."""
    workdir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    service = make(workdir)
    try:
        try:
            service.wait_ready()
        except RuntimeError as e:
            skip_or_fail(str(e))
        yield service
    finally:
        service.stop()
        remove_tree(workdir)


@pytest.fixture(scope="module")
def podman():
    if not shutil.which("podman"):
        skip_or_fail("podman not installed (apt-get install podman)")
    with running_service(Podman, "dgpm") as service:
        yield service


def env_for(host):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["DOCKER_HOST"] = host
    return env


@pytest.fixture(scope="module")
def podman_image(podman, tmp_path_factory):
    """An image podman built: incompressible data, then compressible text."""
    work = tmp_path_factory.mktemp("pmbuild")
    ref = "dgpod/app:1"
    return ref, podman.build(ref, [{"data/random.bin": random_bytes(400 << 10, 41)},
                                   {"data/words.txt": text_bytes(800 << 10, 42)}], work)


def test_podman_to_dockerd_keeps_the_image_id(podman, podman_image, docker_host, tmp_path):
    ref, image = podman_image
    store = tmp_path / "store"
    pushed = run_dogestry("push", store, ref, env=env_for(podman.host))
    assert pushed.returncode == 0, pushed.stderr
    assert (store / "repositories" / "dgpod" / "app" / "1").read_text() == image[7:]
    docker_cli(docker_host, "rmi", "-f", ref, check=False)
    pulled = run_dogestry("pull", store, ref, env=env_for(docker_host))
    assert pulled.returncode == 0, pulled.stderr
    assert image_id(docker_host, ref) == image
    docker_cli(docker_host, "rmi", ref)


def test_dockerd_to_podman_keeps_the_image_id(podman, docker_host, tmp_path):
    """Layers big enough to go to dockerd in batches (DOGESTRY_LOAD_BATCH=1 MiB) go to podman in
    one load: podman looks for every layer in the tar, so partial images are for Docker only."""
    ref = "dgpod/fromdocker:1"
    image = build_image(docker_host, ref, [{"big.bin": random_bytes(1536 << 10, 43)},
                                           {"words.txt": text_bytes(1536 << 10, 44)}], workdir=tmp_path)
    store = tmp_path / "store"
    assert run_dogestry("push", store, ref, env=env_for(docker_host)).returncode == 0
    pulled = run_dogestry("pull", store, ref, env=dict(env_for(podman.host), DOGESTRY_LOAD_BATCH="1"))
    assert pulled.returncode == 0, pulled.stderr
    assert podman.image_id(ref) == image
    again = run_dogestry("pull", store, ref, env=env_for(podman.host))
    assert again.returncode == 0 and "already on the Docker host" in again.stderr, again.stderr
    podman.cli("rmi", ref)
    docker_cli(docker_host, "rmi", ref)


def test_an_image_sharing_a_layer_podman_has_pulls_into_podman(podman, docker_host, tmp_path):
    """podman reads every layer from the tar, even one it has: a pull sends them all to podman
    (to dockerd only the layers it lacks)."""
    base, app = "dgpod/base:1", "dgpod/onbase:1"
    build_image(docker_host, base, [{"base.bin": random_bytes(200 << 10, 45)}], workdir=tmp_path)
    image = build_image(docker_host, app, [{"base.bin": random_bytes(200 << 10, 45)},
                                           {"app.txt": text_bytes(100 << 10, 46)}], workdir=tmp_path)
    store = tmp_path / "store"
    assert run_dogestry("push", store, base, app, env=env_for(docker_host)).returncode == 0
    assert run_dogestry("pull", store, base, env=env_for(podman.host)).returncode == 0

    pulled = run_dogestry("pull", store, app, env=env_for(podman.host))

    assert pulled.returncode == 0, pulled.stderr
    assert podman.image_id(app) == image
    podman.cli("rmi", app, base)
    docker_cli(docker_host, "rmi", app, base)


def test_podman_round_trip_and_a_corrupt_blob(podman, podman_image, tmp_path):
    ref, image = podman_image
    store, broken_store = tmp_path / "store", tmp_path / "broken"
    assert run_dogestry("push", store, ref, env=env_for(podman.host)).returncode == 0
    shutil.copytree(str(store), str(broken_store))
    blob = max((broken_store / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x40
    blob.write_bytes(bytes(data))

    podman.cli("rmi", "-f", ref)
    broken = run_dogestry("pull", broken_store, ref, env=env_for(podman.host))
    one_error_line(broken, "corrupt")
    assert podman.image_id(ref) is None  # podman got nothing it could tag
    pulled = run_dogestry("pull", store, ref, env=env_for(podman.host))
    assert pulled.returncode == 0, pulled.stderr
    assert podman.image_id(ref) == image
