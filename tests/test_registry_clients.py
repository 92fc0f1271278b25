"""The real OCI clients push into `dogestry -server STORE` and pull back: docker, podman, buildah, skopeo.

Each pushes as the user `ci` of -htpasswd (push rights) onto a directory store and onto a radosgw
bucket: docker 20.10 (`docker login`, then `docker push`: a POST, one streamed PATCH, a PUT per
blob), skopeo and podman (from a docker-archive), buildah (an image it builds, and a manifest list
of two architectures).  What they pushed is then pulled by every client with the digest the pusher
computed, and by `dogestry pull`, which gives the engine the same image ID.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket, skip_or_fail
from realdocker import (build_image, docker_cli, image_id, loopback_addresses, ok, random_bytes, run_dogestry,
                        text_bytes, write_context)
from serverkit import PORT, call, server_env
from test_podman import podman  # noqa: F401  (a podman of that module's own)
from test_registry import puller  # noqa: F401  (a dockerd of that module's own, pulling from the registry)

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
REGISTRY = "%s:%d" % (HOSTS[0], PORT)
PASSWORD = "ci-secret"
BASE = [{"base/lib.bin": random_bytes(12 << 20, 91)}, {"base/etc.txt": text_bytes(300 << 10, 92)}]


@pytest.fixture(scope="module")
def images(docker_host, tmp_path_factory):
    """dgcli/base:1 (a 12 MiB random layer: S3 multipart; and a text one) and dgcli/app:1 (the
    same two layers and one of its own), built by docker; a docker-archive of app for the others."""
    work = tmp_path_factory.mktemp("clients")
    base = build_image(docker_host, "dgcli/base:1", BASE, workdir=work)
    app = build_image(docker_host, "dgcli/app:1", BASE + [{"app/run.txt": text_bytes(200 << 10, 93)}], workdir=work)
    archive = work / "app.tar"
    docker_cli(docker_host, "save", "-o", archive, "dgcli/app:1")
    return {"base": base, "app": app, "archive": archive, "work": work}


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory):
    line = ok(run_dogestry("passwd", "ci", "--push", input=PASSWORD + "\n")).stdout
    path = tmp_path_factory.mktemp("users") / "htpasswd"
    path.write_text(line)
    return path


@pytest.fixture(params=["dir", "s3"])
def store(request, tmp_path, rgw):
    """A directory store, or a radosgw bucket (with the environment a server needs for it)."""
    if request.param == "dir":
        (tmp_path / "store").mkdir()
        return str(tmp_path / "store"), {}
    bucket = make_bucket(rgw, "dgcli-" + uuid.uuid4().hex[:10])
    return "s3://%s/reg/" % bucket, {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key,
                                     "AWS_ENDPOINT_URL": rgw.endpoint}


@pytest.fixture
def server(servers, base_env, puller, store, htpasswd):  # noqa: F811
    url, env = store
    return servers(HOSTS[0], dict(server_env(base_env, puller, env.get("AWS_ENDPOINT_URL", "")), **env), store=url,
                   args=["-htpasswd", htpasswd])


def docker_as_ci(docker_host, config_dir, *args):
    """docker with a config of its own, logged in to the registry as ci."""
    config_dir.mkdir(exist_ok=True)
    if not (config_dir / "config.json").exists():
        docker_cli(docker_host, "--config", config_dir, "login", "-u", "ci", "--password-stdin", REGISTRY,
                   input=PASSWORD + "\n")
    return docker_cli(docker_host, "--config", config_dir, *args)


def served_digest(name, tag):
    answer = call(HOSTS[0], "HEAD", "/v2/%s/manifests/%s" % (name, tag),
                  {"Accept": ", ".join(dogestry.MANIFEST_TYPES),
                   "Authorization": "Basic " + base64.b64encode(("ci:" + PASSWORD).encode()).decode()})
    assert answer.status == 200, answer
    return answer.headers.getheader("Docker-Content-Digest")


def skopeo(*args):
    proc = subprocess.run(["skopeo"] + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def dogestry_pull_gives(puller, store, ref, expected):  # noqa: F811
    """`dogestry pull STORE REF` into the puller's engine (which lacks it) gives the image ID EXPECTED."""
    url, env = store
    docker_cli(puller.host, "rmi", "-f", expected, check=False)
    ok(run_dogestry("pull", url, ref, env=dict(os.environ, DOCKER_HOST=puller.host, AWS_EC2_METADATA_DISABLED="true",
                                               **env)))
    return image_id(puller.host, ref) == expected


# === docker push ================================================================================

def test_docker_push_is_pulled_back_by_digest_by_every_client(images, store, server, docker_host, puller, tmp_path):  # noqa: F811
    """docker push (logged in as ci) stores the image; the manifest docker computed is served by tag
    and by digest; docker pulls NAME@digest, skopeo copies it out verifying every digest, and
    `dogestry pull` gives the engine the same image ID."""
    docker_cli(docker_host, "tag", "dgcli/app:1", REGISTRY + "/team/app:1")
    pushed = docker_as_ci(docker_host, tmp_path / "config", "push", REGISTRY + "/team/app:1").stdout
    digest = re.search(r"digest: (sha256:[0-9a-f]{64}) size: \d+", pushed).group(1)
    assert served_digest("team/app", "1") == digest

    docker_cli(puller.host, "rmi", "-f", images["app"], check=False)
    docker_as_ci(puller.host, tmp_path / "puller-config", "pull", "%s/team/app@%s" % (REGISTRY, digest))
    assert image_id(puller.host, "%s/team/app@%s" % (REGISTRY, digest)) == images["app"]
    layout = tmp_path / "layout"
    skopeo("copy", "--src-tls-verify=false", "--src-creds", "ci:" + PASSWORD,
           "docker://%s/team/app@%s" % (REGISTRY, digest), "oci:%s:app" % layout)
    sock = str(puller.exec_root / "containerd" / "containerd.sock")
    namespace = "dgcli" + uuid.uuid4().hex[:6]
    ctr = subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "pull", "--plain-http", "--snapshotter", "native",
                          "--user", "ci:" + PASSWORD, "%s/team/app@%s" % (REGISTRY, digest)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert ctr.returncode == 0, ctr.stdout
    listing = subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "ls"], stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout
    assert digest in listing, listing
    assert dogestry_pull_gives(puller, store, "team/app:1", images["app"])
    server.assert_no_traceback()


def test_an_image_docker_pushed_is_an_image_of_the_store(images, store, server, docker_host, puller, tmp_path):  # noqa: F811
    """What docker pushed is handled by every command: inspect shows it (its layers unchecked),
    export writes what docker load takes back with its ID, stats counts it, -pullhosts pulls it."""
    docker_cli(docker_host, "tag", "dgcli/app:1", REGISTRY + "/team/cmd:1")
    docker_as_ci(docker_host, tmp_path / "config", "push", REGISTRY + "/team/cmd:1")
    url, env = store
    env = dict(os.environ, DOCKER_HOST=puller.host, AWS_EC2_METADATA_DISABLED="true", **env)
    inspected = json.loads(ok(run_dogestry("inspect", url, "team/cmd:1", env=env)).stdout)
    assert inspected["Id"] == images["app"] and all(layer["unchecked"] for layer in inspected["Layers"])
    archive = tmp_path / "out.tar"
    ok(run_dogestry("export", url, "team/cmd:1", "-o", archive, env=env))
    docker_cli(puller.host, "rmi", "-f", images["app"], check=False)
    docker_cli(puller.host, "load", "-i", archive)
    assert image_id(puller.host, "team/cmd:1") == images["app"]
    stats = json.loads(ok(run_dogestry("stats", "--json", url, env=env)).stdout)
    assert (stats["tags"], stats["images"]) == (1, 1)
    docker_cli(puller.host, "rmi", "-f", images["app"], check=False)
    fleet = ok(run_dogestry("-pullhosts", puller.host, url, "team/cmd:1", env=env))
    assert json.loads(fleet.stdout) == [{"Host": puller.host, "Status": "ok"}]
    assert image_id(puller.host, "team/cmd:1") == images["app"]


def test_a_push_of_an_image_whose_layers_are_stored_sends_no_layer_bytes(images, store, server, docker_host,
                                                                         tmp_path):
    """After dgcli/base:1 is pushed, docker push of dgcli/app:1 (same two base layers) finds them
    stored (HEAD, or a cross-repository mount) and uploads only its own layer and its config."""
    config = tmp_path / "config"
    docker_cli(docker_host, "tag", "dgcli/base:1", REGISTRY + "/team/base:1")
    docker_as_ci(docker_host, config, "push", REGISTRY + "/team/base:1")
    before = len(server.access_log())
    docker_cli(docker_host, "tag", "dgcli/app:1", REGISTRY + "/team/other:1")
    pushed = docker_as_ci(docker_host, config, "push", REGISTRY + "/team/other:1").stdout
    assert len(re.findall(r"(Layer already exists|Mounted from)", pushed)) == 2, pushed
    log = server.access_log()[before:]
    sent = [e for e in log if e[1] == "PATCH"]  # docker sends each blob it uploads in one PATCH
    assert len(sent) == 2, log  # the new layer and the config


def test_a_docker_push_over_an_immutable_tag_is_denied(images, store, server, docker_host, tmp_path):
    """protect --immutable: docker push of another image over the tag fails with 'denied'; the tag
    still names the image it named."""
    config = tmp_path / "config"
    docker_cli(docker_host, "tag", "dgcli/base:1", REGISTRY + "/team/fixed:1")
    docker_as_ci(docker_host, config, "push", REGISTRY + "/team/fixed:1")
    url, env = store
    ok(run_dogestry("protect", "--immutable", url, "team/fixed:1", env=dict(os.environ, **env)))
    docker_cli(docker_host, "tag", "dgcli/app:1", REGISTRY + "/team/fixed:1")
    proc = subprocess.run(["docker", "-H", docker_host, "--config", str(config), "push", REGISTRY + "/team/fixed:1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode != 0 and "denied" in proc.stdout.lower(), proc.stdout
    listing = ok(run_dogestry("list", url, env=dict(os.environ, **env))).stdout
    assert re.search(r"team/fixed\s+1\s+%s" % images["base"][7:19], listing), listing


# === skopeo, podman, buildah ====================================================================

def test_skopeo_copies_archives_in_and_out_digests_equal(images, store, server, puller, tmp_path):  # noqa: F811
    """skopeo copy from a docker-archive and from an OCI layout into the registry: the digest it wrote
    (--digestfile) is the one served; copied out again, the manifest bytes are the pushed ones."""
    digest_file = tmp_path / "digest"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "ci:" + PASSWORD, "--digestfile", digest_file,
           "docker-archive:%s" % images["archive"], "docker://%s/sk/app:1" % REGISTRY)
    digest = digest_file.read_text().strip()
    assert served_digest("sk/app", "1") == digest
    layout = tmp_path / "layout"
    skopeo("copy", "docker-archive:%s" % images["archive"], "oci:%s:app" % layout)
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "ci:" + PASSWORD, "--digestfile", digest_file,
           "oci:%s:app" % layout, "docker://%s/sk/oci:1" % REGISTRY)
    assert served_digest("sk/oci", "1") == digest_file.read_text().strip()
    raw = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", "ci:" + PASSWORD,
                 "docker://%s/sk/oci:1" % REGISTRY).stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest_file.read_text().strip()
    oci_config = json.loads(raw)["config"]["digest"]
    assert dogestry_pull_gives(puller, store, "sk/oci:1", oci_config)


def test_podman_pushes_and_dogestry_pulls_the_image(images, store, server, puller, tmp_path, podman):  # noqa: F811
    """podman push of the image it loaded: the digest it wrote is served; dogestry pull gives its ID."""
    podman.cli("load", "-i", images["archive"])
    digest_file = tmp_path / "digest"
    podman.cli("push", "--tls-verify=false", "--creds", "ci:" + PASSWORD, "--digestfile", str(digest_file),
               "localhost/dgcli/app:1", "docker://%s/pod/app:1" % REGISTRY)
    assert served_digest("pod/app", "1") == digest_file.read_text().strip()
    assert dogestry_pull_gives(puller, store, "pod/app:1", podman.image_id("localhost/dgcli/app:1"))


def buildah(workdir, *args):
    proc = subprocess.run(["buildah", "--storage-driver", "vfs", "--root", str(workdir / "root"),
                           "--runroot", str(workdir / "run")] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_buildah_pushes_a_manifest_list_of_two_architectures(store, server, tmp_path):
    """buildah builds amd64 and arm64 images (FROM scratch + COPY: no emulation) into a manifest list
    and pushes it with every image: the tag serves the list as buildah wrote it, each image by its
    digest, and skopeo copies the whole list out verifying every digest."""
    if not shutil.which("buildah"):
        skip_or_fail("buildah not installed (apt-get install buildah)")
    work = tmp_path / "buildah"
    context = write_context(tmp_path / "context", [{"hello.txt": b"hello from buildah\n"}])
    buildah(work, "manifest", "create", "dgcli-list")
    for arch in ("amd64", "arm64"):
        buildah(work, "build", "--arch", arch, "--manifest", "dgcli-list", "-f", context / "Dockerfile", context)
    digest_file = tmp_path / "digest"
    buildah(work, "manifest", "push", "--all", "--tls-verify=false", "--creds", "ci:" + PASSWORD,
            "--digestfile", digest_file, "dgcli-list", "docker://%s/multi/app:1" % REGISTRY)
    digest = digest_file.read_text().strip()
    assert served_digest("multi/app", "1") == digest
    raw = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", "ci:" + PASSWORD,
                 "docker://%s/multi/app:1" % REGISTRY).stdout
    children = json.loads(raw)["manifests"]
    assert sorted(c["platform"]["architecture"] for c in children) == ["amd64", "arm64"]
    for child in children:
        assert served_digest("multi/app", child["digest"]) == child["digest"]
    skopeo("copy", "--all", "--src-tls-verify=false", "--src-creds", "ci:" + PASSWORD,
           "docker://%s/multi/app:1" % REGISTRY, "oci:%s:multi" % (tmp_path / "out"))
