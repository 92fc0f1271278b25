"""`dogestry import` and `dogestry export`: image archives in and out of a store, with the real tools.

Archives come from a real `docker save` (dockerd 20.10), `podman save` (docker-archive and
oci-archive) and `skopeo copy` (oci-archive: and docker-archive:); what `export` writes is loaded
by the real `docker load`, `podman load` and `ctr images import` (a containerd of the module's
own), and every one of them ends with the image ID the archive had: the sha256 of its config.

Formats as these tools write them (measured here):
- docker 20.10 save: `<v1 id>/{VERSION,json,layer.tar}` directories and `<config hex>.json`,
  then `manifest.json` and `repositories` at the end; an image saved by ID has `RepoTags: null`.
- podman 4.3 save (docker-archive): layers at `<diffID hex>.tar` first, the config, then
  `<v1 id>/layer.tar` symlinks to them, `manifest.json`; bare names become `localhost/NAME`.
- podman 4.3 `save --format oci-archive` and skopeo 1.9 `oci-archive:FILE:NAME:TAG`: blobs/sha256/*
  (gzip layers), then index.json, oci-layout; the config is rewritten in OCI form (a new image ID)
  and the index holds only `org.opencontainers.image.ref.name` = the full NAME:TAG.
- docker 20.10 cannot load an OCI archive; podman 4.3 loads an OCI archive holding one image
  only ("more than one image in oci, choose an image"); ctr 1.6 names images after
  `io.containerd.image.name` (OCI) or the normalised RepoTags (docker archives: docker.io/u/x:t).
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import skip_or_fail
from realdocker import (DOGESTRY, _die_with_parent, build_image, docker_cli, image_id, ok, one_error_line,
                        random_bytes, remove_tree, text_bytes)
from test_podman import ServiceProcess, podman, running_service  # noqa: F401  (podman: the fixture)

pytestmark = pytest.mark.integration

ONE, TWO = "dgarc/one:1", "dgarc/two:1"
OCI_NAME = "dgarc/oci:1"                 # the skopeo oci-archive's NAME:TAG
LIBRARY_REF = "docker.io/library/dgarclib:1"  # the skopeo docker-archive's RepoTags
PODMAN_ONE = "localhost/" + ONE          # what podman calls ONE once it loaded docker's save
STORE_KEYS = ("repositories", "images", "layers")


# === helpers ===================================================================================

def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dogestry(*args, env=None, stdin=None, cwd=None):
    """Run dogestry with STDIN (a file object or None); text stdout/stderr."""
    return subprocess.run([sys.executable, str(DOGESTRY)] + [str(a) for a in args], stdin=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          env=env, cwd=cwd, timeout=300)


def import_file(env, store, path, *tags):
    """`dogestry import STORE PATH [TAG...]`."""
    return dogestry("import", store, path, *tags, env=env)


def export_file(env, store, out, *images, fmt="docker"):
    """`dogestry export STORE IMAGE... -o OUT --format FMT`, which must succeed."""
    return ok(dogestry("export", store, *images, "-o", out, "--format", fmt, env=env))


def imported(proc):
    """The lines `import` printed on stdout, sorted."""
    return sorted(ok(proc).stdout.splitlines())


def tag_id(store, ref):
    """The image ID STORE's tag REF (NAME:TAG) points at, or None."""
    name, _, tag = ref.rpartition(":")
    path = Path(store) / "repositories" / name / tag
    return "sha256:" + path.read_text().strip() if path.is_file() else None


def keys(store, *tops):
    """Relative paths of the files under STORE/TOP for each TOP (all of STORE without TOPs)."""
    store = Path(store)
    roots = [store / t for t in tops] if tops else [store]
    return sorted(str(p.relative_to(store)) for root in roots if root.exists() for p in root.rglob("*") if p.is_file())


def stored_layer_digest(store, diff_id):
    """The digest of the blob STORE keeps for layer DIFF_ID (its layers/<diffID>.json record)."""
    return json.loads((Path(store) / "layers" / (diff_id[7:] + ".json")).read_text())["digest"]


def blob_stats(store):
    """{blob file name: (size, mtime_ns, inode)}: a blob written again shows as a change."""
    blobs = Path(store) / "blobs" / "sha256"
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in blobs.iterdir()}


def read_members(path):
    """[(TarInfo, bytes or None)] of a tar, in order."""
    with tarfile.open(str(path)) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]


def files_of(path):
    """{name: bytes} of a tar's regular files."""
    return {m.name: data for m, data in read_members(path) if data is not None}


def write_members(target, members):
    """Write [(TarInfo, bytes or None)] as a tar to a path or a binary file, sizes fixed up."""
    with (tarfile.open(str(target), "w") if isinstance(target, Path) else tarfile.open(fileobj=target, mode="w")) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def file_member(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def oci_manifest(path):
    """The manifest of the (first) image of an OCI archive."""
    files = files_of(path)
    return json.loads(files["blobs/sha256/" + json.loads(files["index.json"])["manifests"][0]["digest"][7:]])


def oci_config_digest(path):
    """The config digest (= image ID) of the image of an OCI archive."""
    return oci_manifest(path)["config"]["digest"]


def docker_archive_ids(path):
    """[(RepoTags, sha256 of the config member)] of a docker-archive."""
    files = files_of(path)
    return [(entry["RepoTags"], sha(files[entry["Config"]])) for entry in json.loads(files["manifest.json"])]


def docker_forget(docker_host, *ids):
    """Remove images (every tag) from the shared dockerd, so a load must really happen."""
    docker_cli(docker_host, "rmi", "-f", *ids, check=False)


# === a containerd of the module's own, for ctr =================================================

class Containerd(ServiceProcess):
    """A standalone containerd (no CRI) on a unix socket in a short /tmp directory."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.socket = self.workdir / "c.sock"
        config = self.workdir / "config.toml"
        config.write_text('version = 2\nroot = "%s"\nstate = "%s"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                          '[grpc]\n  address = "%s"\n[ttrpc]\n  address = "%s.ttrpc"\n'
                          % (self.workdir / "root", self.workdir / "state", self.socket, self.socket))
        self.log = open(str(self.workdir / "containerd.log"), "wb")
        self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)

    def ctr(self, namespace, *args):
        return subprocess.run(["ctr", "-a", str(self.socket), "-n", namespace] + [str(a) for a in args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)

    def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("containerd exited: %s" % (self.workdir / "containerd.log").read_text())
            if self.socket.exists() and self.ctr("default", "version").returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError("containerd not ready: %s" % (self.workdir / "containerd.log").read_text())

    def images(self, namespace):
        """{image name: config digest} of NAMESPACE (the config digest is the image ID)."""
        listing = self.ctr(namespace, "images", "ls")
        assert listing.returncode == 0, listing.stderr
        found = {}
        for line in listing.stdout.splitlines()[1:]:
            name, _, digest = line.split()[:3]
            manifest = self.ctr(namespace, "content", "get", digest)
            assert manifest.returncode == 0, manifest.stderr
            found[name] = json.loads(manifest.stdout)["config"]["digest"]
        return found



@pytest.fixture(scope="module")
def containerd():
    if not (shutil.which("containerd") and shutil.which("ctr")):
        skip_or_fail("containerd/ctr not installed (apt-get install containerd)")
    with running_service(Containerd, "dgct") as daemon:
        yield daemon


# === the archives ==============================================================================

class Archives:
    """Paths of the module's archives and the image IDs they hold."""


@pytest.fixture(scope="module")
def archives(docker_host, podman, tmp_path_factory):
    """ONE (random data, stored raw, then text, stored gzip) and TWO (sharing ONE's first layer),
    saved by docker, podman and skopeo in every format they have."""
    if not shutil.which("skopeo"):
        skip_or_fail("skopeo not installed (apt-get install skopeo)")
    work = tmp_path_factory.mktemp("archives")
    a = Archives()
    a.dir = work
    token = uuid.uuid4().hex[:8]
    a.one = build_image(docker_host, ONE, [{"data/random.bin": random_bytes(200 << 10, 71)},
                                           {"data/words.txt": text_bytes(300 << 10, 72)}],
                        workdir=work, extra_lines=["LABEL token=" + token])
    a.two = build_image(docker_host, TWO, [{"data/random.bin": random_bytes(200 << 10, 71)},
                                           {"data/more.txt": text_bytes(100 << 10, 73)}],
                        workdir=work, extra_lines=["LABEL token=" + token])
    a.docker = work / "docker.tar"
    docker_cli(docker_host, "save", "-o", a.docker, ONE)
    a.both = work / "both.tar"
    docker_cli(docker_host, "save", "-o", a.both, ONE, TWO)
    a.by_id = work / "by-id.tar"
    docker_cli(docker_host, "save", "-o", a.by_id, a.one[7:19])

    def skopeo(*args):
        proc = subprocess.run(["skopeo", "copy", "-q", "--src-daemon-host", docker_host] + [str(x) for x in args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    a.skopeo_oci = work / "skopeo-oci.tar"
    skopeo("docker-daemon:" + ONE, "oci-archive:%s:%s" % (a.skopeo_oci, OCI_NAME))
    a.skopeo_docker = work / "skopeo-docker.tar"
    skopeo("docker-daemon:" + ONE, "docker-archive:%s:%s" % (a.skopeo_docker, LIBRARY_REF))

    podman.cli("load", "-i", a.docker)
    a.podman = work / "podman.tar"
    podman.cli("save", "-o", a.podman, PODMAN_ONE)
    a.podman_oci = work / "podman-oci.tar"
    podman.cli("save", "--format", "oci-archive", "-o", a.podman_oci, PODMAN_ONE)

    a.oci_id = oci_config_digest(a.skopeo_oci)          # OCI form of ONE's config: another ID
    a.podman_oci_id = oci_config_digest(a.podman_oci)
    return a


def ensure_in_docker(docker_host, archives):
    """ONE and TWO in the shared dockerd again (a test before may have removed them)."""
    docker_cli(docker_host, "load", "-i", archives.both)


@pytest.fixture(scope="module")
def env(base_env):
    """dogestry's environment: DOCKER_HOST the shared dockerd (for push), no AWS settings."""
    return base_env


# === import: every archive format ==============================================================

SOURCES = {
    # source: (archive attribute, the tag the store gets, attribute of the image ID)
    "docker-save": ("docker", ONE, "one"),
    "podman-docker-archive": ("podman", PODMAN_ONE, "one"),
    "podman-oci-archive": ("podman_oci", PODMAN_ONE, "podman_oci_id"),
    "skopeo-oci-archive": ("skopeo_oci", OCI_NAME, "oci_id"),
    "skopeo-docker-archive": ("skopeo_docker", "dgarclib:1", "one"),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_import_then_export_keeps_the_image_id(source, archives, env, docker_host, tmp_path):
    """Each tool's archive is stored with its own tag (docker.io/library/x:t as x:t, podman's
    localhost/x:t as it is) and the ID of its config; exported, docker loads that very image."""
    attribute, tag, id_attribute = SOURCES[source]
    expected = getattr(archives, id_attribute)
    store = tmp_path / "store"
    assert imported(import_file(env, store, getattr(archives, attribute))) == ["Imported image: " + tag]
    assert tag_id(store, tag) == expected
    assert keys(store, "repositories") == ["repositories/" + tag.replace(":", "/")]

    out = tmp_path / "out.tar"
    export_file(env, store, out, tag)
    docker_forget(docker_host, expected, tag)
    loaded = docker_cli(docker_host, "load", "-i", out)
    assert loaded.stdout.strip() == "Loaded image: " + tag
    assert image_id(docker_host, tag) == expected


def test_oci_archive_layers_are_stored_as_they_are(archives, env, tmp_path):
    """skopeo's gzip layers are kept byte for byte: their digests are the store's blobs."""
    store = tmp_path / "store"
    ok(import_file(env, store, archives.skopeo_oci))
    layer_digests = {layer["digest"][7:] for layer in oci_manifest(archives.skopeo_oci)["layers"]}
    assert len(layer_digests) == 2
    assert layer_digests <= set(blob_stats(store))


def test_import_the_docker_save_of_an_image_id_stores_it_untagged(archives, env, tmp_path):
    """`docker save ID` has no RepoTags: the image is stored, no tag, and said so like docker load."""
    store = tmp_path / "store"
    assert docker_archive_ids(archives.by_id) == [(None, archives.one)]
    assert imported(import_file(env, store, archives.by_id)) == ["Imported image ID: " + archives.one]
    assert keys(store, "repositories") == []
    assert (store / "images" / archives.one[7:]).is_dir()


# === import: stdin, compression, tags ==========================================================

COMPRESSORS = {"plain": None, "gzip": ["gzip", "-c"], "bzip2": ["bzip2", "-c"], "xz": ["xz", "-c", "-T1"]}


@pytest.fixture(scope="module")
def compressed(archives):
    """docker.tar compressed as a whole by the real gzip, bzip2 and xz."""
    paths = {"plain": archives.docker}
    for name, command in COMPRESSORS.items():
        if command:
            paths[name] = archives.dir / ("docker.tar." + name)
            with open(str(paths[name]), "wb") as out:
                subprocess.run(command + [str(archives.docker)], stdout=out, check=True, timeout=120)
    return paths


@pytest.mark.parametrize("how", ["plain-stdin", "gzip-file", "gzip-stdin", "bzip2-file", "xz-file"])
def test_import_reads_stdin_and_compressed_archives(how, compressed, archives, env, tmp_path):
    """`import STORE -` reads the archive from stdin; a .tar.gz/.bz2/.xz is read as it is."""
    kind, _, where = how.partition("-")
    store = tmp_path / "store"
    if where == "stdin":
        with open(str(compressed[kind]), "rb") as stdin:
            proc = dogestry("import", store, "-", env=env, stdin=stdin)
    else:
        proc = import_file(env, store, compressed[kind])
    assert imported(proc) == ["Imported image: " + ONE]
    assert tag_id(store, ONE) == archives.one


def test_name_tag_arguments_retag_a_one_image_archive(archives, env, tmp_path):
    """NAME:TAG arguments give the only image of the archive exactly these tags, not its own."""
    store = tmp_path / "store"
    proc = import_file(env, store, archives.docker, "dgarc/re:a", "dgarc/re:b")
    assert imported(proc) == ["Imported image: dgarc/re:a", "Imported image: dgarc/re:b"]
    assert tag_id(store, "dgarc/re:a") == tag_id(store, "dgarc/re:b") == archives.one
    assert keys(store, "repositories") == ["repositories/dgarc/re/a", "repositories/dgarc/re/b"]


def test_an_archive_of_two_images_imports_both_with_their_tags(archives, env, tmp_path):
    """`docker save a b` is one archive, two images; both are stored, each with its tag."""
    store = tmp_path / "store"
    assert imported(import_file(env, store, archives.both)) == ["Imported image: " + ONE, "Imported image: " + TWO]
    assert tag_id(store, ONE) == archives.one
    assert tag_id(store, TWO) == archives.two


def test_name_tag_arguments_select_images_of_a_two_image_archive(archives, env, tmp_path):
    """With several images, NAME:TAG arguments pick which to import; a tag not in it is an error."""
    store = tmp_path / "store"
    assert imported(import_file(env, store, archives.both, TWO)) == ["Imported image: " + TWO]
    assert tag_id(store, TWO) == archives.two
    assert keys(store, "repositories") == ["repositories/" + TWO.replace(":", "/")]

    fresh = tmp_path / "fresh"
    one_error_line(import_file(env, fresh, archives.both, "dgarc/nope:1"), "dgarc/nope:1")
    assert keys(fresh, *STORE_KEYS) == []


# === import: dedup with push ===================================================================

def test_import_of_a_pushed_image_stores_nothing_new(archives, env, docker_host, tmp_path):
    """An archive of an image already pushed adds no blob and rewrites none; imported into an empty
    store it gives exactly the keys push gives (raw layers gzip'ed like push); an image sharing a
    layer with it adds only its own layer."""
    ensure_in_docker(docker_host, archives)
    pushed = tmp_path / "pushed"
    ok(dogestry("push", pushed, ONE, env=env))
    push_keys, push_blobs = keys(pushed), blob_stats(pushed)

    assert imported(import_file(env, pushed, archives.docker)) == ["Imported image: " + ONE]
    assert blob_stats(pushed) == push_blobs
    assert keys(pushed) == push_keys
    assert tag_id(pushed, ONE) == archives.one

    fresh = tmp_path / "fresh"
    ok(import_file(env, fresh, archives.docker))
    assert keys(fresh) == push_keys
    assert tag_id(fresh, ONE) == archives.one

    ok(import_file(env, pushed, archives.both))
    after = blob_stats(pushed)
    assert {k: after[k] for k in push_blobs} == push_blobs
    assert len(set(after) - set(push_blobs)) == 1  # TWO's own text layer
    assert tag_id(pushed, TWO) == archives.two


# === export: loaded by docker, podman, ctr =====================================================

@pytest.fixture(scope="module")
def mixed_store(archives, base_env, tmp_path_factory):
    """A store with ONE (docker's config) and OCI_NAME (the OCI form of it: another image ID)."""
    store = tmp_path_factory.mktemp("mixed") / "store"
    ok(import_file(base_env, store, archives.docker))
    ok(import_file(base_env, store, archives.skopeo_oci))
    return store


def load_docker(docker_host, path, expected):
    docker_forget(docker_host, *set(expected.values()))
    docker_cli(docker_host, "load", "-i", path)
    return {name: image_id(docker_host, name) for name in expected}


def load_podman(podman, path):
    podman.cli("rmi", "-a", "-f")
    podman.cli("load", "-i", path)
    listing = podman.cli("images", "--format", "{{.Repository}}:{{.Tag}} {{.Id}}").stdout.split("\n")
    return {name: "sha256:" + hexid for name, hexid in (line.split() for line in listing if line.strip())}


def load_ctr(containerd, path):
    namespace = "dg" + uuid.uuid4().hex[:10]
    proc = containerd.ctr(namespace, "images", "import", "--snapshotter", "native", path)
    assert proc.returncode == 0, proc.stderr
    return containerd.images(namespace)


LOADS = {
    # (loader, --format): (images exported, {name the loader gives: attribute of the image ID})
    ("docker", "docker"): ([ONE, OCI_NAME], {ONE: "one", OCI_NAME: "oci_id"}),
    ("podman", "docker"): ([ONE, OCI_NAME], {"localhost/" + ONE: "one", "localhost/" + OCI_NAME: "oci_id"}),
    # podman 4.3 loads an OCI archive of one image only
    ("podman", "oci"): ([ONE], {"docker.io/" + ONE: "one"}),
    ("ctr", "docker"): ([ONE, OCI_NAME], {"docker.io/" + ONE: "one", "docker.io/" + OCI_NAME: "oci_id"}),
    ("ctr", "oci"): ([ONE, OCI_NAME], {"docker.io/" + ONE: "one", "docker.io/" + OCI_NAME: "oci_id"}),
}


@pytest.mark.parametrize("loader,fmt", sorted(LOADS), ids=["%s-%s" % k for k in sorted(LOADS)])
def test_export_is_loaded_with_the_same_image_ids(loader, fmt, mixed_store, archives, env, request, tmp_path):
    """One archive with every image named; the loader gets each image under its tag, same ID."""
    images, names = LOADS[(loader, fmt)]
    expected = {name: getattr(archives, attribute) for name, attribute in names.items()}
    out = tmp_path / ("export-%s.tar" % fmt)
    export_file(env, mixed_store, out, *images, fmt=fmt)
    if loader == "docker":
        got = load_docker(request.getfixturevalue("docker_host"), out, expected)
    elif loader == "podman":
        got = load_podman(request.getfixturevalue("podman"), out)
    else:
        got = load_ctr(request.getfixturevalue("containerd"), out)
    assert got == expected


def test_docker_format_export_holds_the_layers_as_stored(mixed_store, archives, env, tmp_path):
    """--format docker: manifest.json with RepoTags, <config hex>.json, <diffID hex>/layer.tar
    whose bytes are the stored blob (a gzip layer is not recompressed)."""
    out = tmp_path / "out.tar"
    export_file(env, mixed_store, out, ONE)
    files = files_of(out)
    (entry,) = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == [ONE]
    assert entry["Config"] == archives.one[7:] + ".json"
    assert sha(files[entry["Config"]]) == archives.one
    diff_ids = json.loads(files[entry["Config"]])["rootfs"]["diff_ids"]
    assert entry["Layers"] == [d[7:] + "/layer.tar" for d in diff_ids]
    stored = {d: stored_layer_digest(mixed_store, d) for d in diff_ids}
    assert [sha(files[path]) for path in entry["Layers"]] == [stored[d] for d in diff_ids]
    assert stored[diff_ids[0]] == diff_ids[0]   # random data: stored raw
    assert files[entry["Layers"][1]][:2] == b"\x1f\x8b"  # text: the stored gzip


def test_oci_format_export_is_an_oci_layout(mixed_store, archives, env, tmp_path):
    """--format oci: oci-layout, index.json annotated with io.containerd.image.name (docker.io/...)
    and org.opencontainers.image.ref.name (NAME:TAG), every blob named by its digest."""
    out = tmp_path / "out.tar"
    export_file(env, mixed_store, out, ONE, fmt="oci")
    files = files_of(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (descriptor,) = json.loads(files["index.json"])["manifests"]
    assert descriptor["annotations"] == {"io.containerd.image.name": "docker.io/" + ONE,
                                         "org.opencontainers.image.ref.name": ONE}
    blobs = {name: data for name, data in files.items() if name.startswith("blobs/sha256/")}
    assert all(sha(data)[7:] == name.rsplit("/", 1)[1] for name, data in blobs.items())
    manifest = json.loads(blobs["blobs/sha256/" + descriptor["digest"][7:]])
    assert manifest["config"]["digest"] == archives.one
    assert len(manifest["layers"]) == 2


# === export: stdout, terminal, failures ========================================================

def test_export_to_a_pipe_by_image_id(mixed_store, archives, env, docker_host):
    """`export -o -` streams the archive into `docker load`; an image named by ID is untagged."""
    docker_forget(docker_host, archives.one)
    export = subprocess.Popen([sys.executable, str(DOGESTRY), "export", str(mixed_store), archives.one[7:19], "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    load = subprocess.run(["docker", "-H", docker_host, "load"], stdin=export.stdout, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    export.stdout.close()
    export_err = export.stderr.read().decode()
    assert export.wait(60) == 0, export_err
    assert load.returncode == 0, load.stderr
    assert load.stdout.strip() == "Loaded image ID: " + archives.one
    assert image_id(docker_host, archives.one) == archives.one


def test_export_refuses_to_write_to_a_terminal(mixed_store, env):
    """`-o -` with stdout a terminal: an error, not binary garbage on the screen."""
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, str(DOGESTRY), "export", str(mixed_store), ONE, "-o", "-"],
                              stdout=slave, stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    one_error_line(proc)


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_export_of_a_corrupt_blob_fails_and_leaves_no_file(fmt, mixed_store, archives, env, tmp_path):
    """A stored blob that no longer matches its digest: one error line, no FILE, no FILE.tmp-*."""
    store = tmp_path / "store"
    shutil.copytree(str(mixed_store), str(store))
    text_layer = json.loads((store / "images" / archives.one[7:] / "config.json").read_text())["rootfs"]["diff_ids"][1]
    blob = store / "blobs" / "sha256" / stored_layer_digest(store, text_layer)[7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    outdir = tmp_path / "out"
    outdir.mkdir()
    one_error_line(dogestry("export", store, ONE, "-o", outdir / "x.tar", "--format", fmt, env=env))
    assert sorted(os.listdir(str(outdir))) == []


# === bad archives ==============================================================================

def _truncated(members, manifest_first):
    """A docker save cut in the middle of a layer (after its manifest.json when MANIFEST_FIRST)."""
    if manifest_first:
        members = sorted(members, key=lambda m: not m[0].name.endswith(".json"))
    buf = io.BytesIO()
    write_members(buf, members)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        layers = [m for m in tar if m.name.endswith("layer.tar")]
    cut = layers[-1 if manifest_first else 0]
    return buf.getvalue()[:cut.offset_data + cut.size // 2]


def _bad_oci_digest(path):
    """skopeo's oci-archive with a layer recompressed: same content, bytes unlike its name."""
    members = read_members(path)
    files = {m.name: d for m, d in members if d is not None}
    name = "blobs/sha256/" + oci_manifest(path)["layers"][-1]["digest"][7:]
    swapped = gzip.compress(gzip.decompress(files[name]), 9, mtime=0)
    assert swapped != files[name] and gzip.decompress(swapped) == gzip.decompress(files[name])
    return [(m, swapped if m.name == name else d) for m, d in members]


def _without_config(members):
    config = json.loads(dict((m.name, d) for m, d in members if d is not None)["manifest.json"])[0]["Config"]
    return [(m, d) for m, d in members if m.name != config]


def _with_member(members, extra):
    """EXTRA inserted before manifest.json (the end, as docker writes it)."""
    at = [m.name for m, _ in members].index("manifest.json")
    return members[:at] + [extra] + members[at:]


def _symlink(name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


BAD = ["truncated", "truncated-after-manifest", "oci-blob-not-its-digest", "missing-config", "dotdot-member",
       "absolute-member", "symlink-outside", "not-a-tar"]


def error_names(bad, archives):
    """What the error line of BAD names: the offending member, link target, blob or config."""
    if bad == "oci-blob-not-its-digest":
        return [oci_manifest(archives.skopeo_oci)["layers"][-1]["digest"][7:19]]
    return {"missing-config": [archives.one[7:19]], "dotdot-member": ["../evil"], "absolute-member": ["/abs/evil"],
            "symlink-outside": ["../../etc/passwd"]}.get(bad, [])


@pytest.fixture(scope="module")
def bad_archives(archives):
    """Each bad archive, rewritten with tarfile from a real docker save (or skopeo's OCI archive)."""
    base = read_members(archives.docker)
    paths = {name: archives.dir / ("bad-%s.tar" % name) for name in BAD}
    paths["truncated"].write_bytes(_truncated(base, False))
    paths["truncated-after-manifest"].write_bytes(_truncated(base, True))
    write_members(paths["oci-blob-not-its-digest"], _bad_oci_digest(archives.skopeo_oci))
    write_members(paths["missing-config"], _without_config(base))
    write_members(paths["dotdot-member"], _with_member(base, file_member("../evil", b"evil\n")))
    write_members(paths["absolute-member"], _with_member(base, file_member("/abs/evil", b"evil\n")))
    write_members(paths["symlink-outside"], _with_member(base, _symlink("x", "../../etc/passwd")))
    paths["not-a-tar"].write_bytes(random_bytes(64 << 10, 74))
    return paths


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_archive_is_one_error_and_stores_nothing(bad, bad_archives, archives, env, tmp_path):
    """Truncated, a blob unlike its digest, a missing config, a member named ../x or /x, a symlink
    out of the archive, not a tar: one error line, no tag, no image, no layer stored; nothing is
    written outside the store. The good archive imported next is stored whole (nothing the bad
    one left is taken for one of its blobs) and exports."""
    store = tmp_path / "store"
    cwd = tmp_path / "cwd" / "deeper"
    cwd.mkdir(parents=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = dogestry("import", store, bad_archives[bad], env=dict(env, TMPDIR=str(scratch)), cwd=cwd)
    one_error_line(proc, *error_names(bad, archives))
    assert keys(store, *STORE_KEYS) == []
    assert [p for p in tmp_path.rglob("evil")] == []
    assert not os.path.lexists("/abs/evil")

    good, tag, expected = (archives.skopeo_oci, OCI_NAME, archives.oci_id) if bad.startswith("oci") \
        else (archives.docker, ONE, archives.one)
    assert imported(import_file(env, store, good)) == ["Imported image: " + tag]
    assert tag_id(store, tag) == expected
    export_file(env, store, tmp_path / "out.tar", tag)


def test_skopeo_picks_one_image_of_an_oci_export_by_name_and_tag(mixed_store, archives, env, tmp_path):
    """Two images that share a tag (dgarc/one:1, dgarc/oci:1) in one OCI archive: each is found by
    its NAME:TAG (oci-archive:FILE:NAME:TAG), as skopeo names images in OCI layouts itself."""
    out = tmp_path / "two.tar"
    export_file(env, mixed_store, out, ONE, OCI_NAME, fmt="oci")
    for ref, image in ((ONE, archives.one), (OCI_NAME, archives.oci_id)):
        proc = subprocess.run(["skopeo", "inspect", "--raw", "oci-archive:%s:%s" % (out, ref)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["config"]["digest"] == image


def test_zstd_layers_are_stored_as_they_are_and_load_back(archives, env, podman, containerd, tmp_path):
    """An OCI archive with zstd layers (skopeo --dest-compress-format zstd) is stored as it is (no
    unpacker for zstd here: the config's diffIDs are taken); exported, podman and ctr unpack the
    layers, check them against those diffIDs, and get the image with its ID."""
    source = tmp_path / "zstd.tar"
    proc = subprocess.run(["skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", "zstd",
                           "docker-archive:%s" % archives.docker, "oci-archive:%s:dgarc/zstd:1" % source],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = oci_manifest(source)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    store = tmp_path / "store"
    assert imported(import_file(env, store, source)) == ["Imported image: dgarc/zstd:1"]
    image = manifest["config"]["digest"]
    stored = json.loads((store / "images" / image[7:] / "manifest.json").read_text())
    assert [(l["digest"], l["compression"]) for l in stored["layers"]] == \
        [(l["digest"], "zstd") for l in manifest["layers"]]

    out = tmp_path / "out.tar"
    export_file(env, store, out, "dgarc/zstd:1", fmt="oci")
    assert load_ctr(containerd, out) == {"docker.io/dgarc/zstd:1": image}
    podman.cli("load", "-i", out)
    assert podman.image_id("docker.io/dgarc/zstd:1") == image


def test_layers_the_store_has_need_no_temp_space(archives, env, tmpfs, tmp_path):
    """An archive piped in whose big layers the store already has (OCI blobs and podman's
    <diffID>.tar are named by digest) is imported with a temp dir far smaller than those layers:
    they are skipped unread, only what the store lacks is spooled."""
    store = tmp_path / "store"
    ok(import_file(env, store, archives.skopeo_oci))       # the store has ONE's layers (OCI form)
    ok(import_file(env, store, archives.podman))           # ... and as podman names them
    tiny = tmpfs("64k")
    big = max(layer["size"] for layer in oci_manifest(archives.skopeo_oci)["layers"])
    assert big > 64 << 10
    for archive, tag in ((archives.skopeo_oci, "dgarc/again:oci"), (archives.podman, "dgarc/again:podman")):
        with open(str(archive), "rb") as stdin:
            proc = dogestry("-tempdir", tiny, "import", store, "-", tag, env=env, stdin=stdin)
        assert imported(ok(proc)) == ["Imported image: " + tag]
    assert tag_id(store, "dgarc/again:oci") == archives.oci_id
    assert tag_id(store, "dgarc/again:podman") == archives.one
