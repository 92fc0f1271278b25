"""Every `docker save` shape dogestry reads, and the original dogestry's store layout.

dockerd here is 20.10 (v1 directories + manifest.json). The OCI layout of docker 25+ and
docker 29's containerd export (compressed layer blobs) are made from a real 20.10 save of
the same image, fed to push through the engine client's save() seam; the result is then
pulled into the real engine, which checks every diffID.
"""

import gzip
import hashlib
import io
import json
import os
import posixpath
import tarfile
import time

import pytest

import dogestry
from realdocker import build_image, docker_cli, image_layers, random_bytes, run_dogestry, text_bytes

pytestmark = pytest.mark.integration


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_tar(path):
    """File contents of a tar by member name (symlinks resolved)."""
    members, links = {}, {}
    with tarfile.open(str(path)) as tar:
        for m in tar:
            if m.isfile():
                members[m.name] = tar.extractfile(m).read()
            elif m.issym():
                links[m.name] = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname))
    members.update((name, members[target]) for name, target in links.items())
    return members


def write_tar(path, files):
    """Write (name, bytes) pairs as a tar, in order."""
    with tarfile.open(str(path), "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def oci_save(v1_members, compress_layers):
    """A docker 25+ (or, compressed, docker 29 containerd) save built from a 20.10 save."""
    manifest = json.loads(v1_members["manifest.json"])[0]
    config = v1_members[manifest["Config"]]
    layer_blobs, descriptors = [], []
    for path in manifest["Layers"]:
        data = v1_members[path]
        if compress_layers:
            data = gzip.compress(data, 6, mtime=0)  # same bytes, same blob (a repeated layer too)
        layer_blobs.append(data)
        descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress_layers else ""),
                            "digest": sha(data), "size": len(data)})
    oci_manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": sha(config), "size": len(config)},
                               "layers": descriptors}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(oci_manifest),
         "size": len(oci_manifest)}]}).encode()
    docker_manifest = json.dumps([{"Config": "blobs/sha256/" + sha(config)[7:], "RepoTags": None,
                                   "Layers": ["blobs/sha256/" + sha(b)[7:] for b in layer_blobs]}]).encode()
    files = [("blobs/sha256/" + sha(b)[7:], b) for b in layer_blobs]
    files += [("blobs/sha256/" + sha(config)[7:], config), ("blobs/sha256/" + sha(oci_manifest)[7:], oci_manifest),
              ("index.json", index), ("manifest.json", docker_manifest), ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    return files, layer_blobs


class SaveFromFile(dogestry.DockerClient):
    """The real engine for everything but save(), which returns a prepared tar."""

    def __init__(self, endpoint, tar_path):
        super().__init__(endpoint)
        self.tar_path = tar_path

    def save(self, image_id):
        return open(str(self.tar_path), "rb")


@pytest.fixture(scope="module")
def saved(docker_host, tmp_path_factory):
    """An image with a repeated layer (a symlink in 20.10 saves) and its real 20.10 save."""
    work = tmp_path_factory.mktemp("formats")
    image = build_image(docker_host, "dgtest/formats:1", [
        {"data": random_bytes(2 << 20, 11)},
        {"data": text_bytes(1 << 20, 12)},  # another size, or the diff would be empty
        {"data": random_bytes(2 << 20, 11)}], extra_lines=["LABEL format=test"])
    tar_path = work / "save.tar"
    with open(str(tar_path), "wb") as f:
        f.write(dogestry.DockerClient(dogestry.docker_endpoint(docker_host, {}, "/")).save(image).read())
    return image, tar_path


def push_in_process(docker_host, tar_path, store, image, ref="dgtest/formats:1"):
    client = SaveFromFile(dogestry.docker_endpoint(docker_host, {}, "/"), tar_path)
    progress = dogestry.Progress(io.StringIO(), quiet=True)
    dogestry.push_image(client, dogestry.LocalStore(str(store)), ref, progress, dogestry.PushOptions())
    return json.loads((store / "images" / image[7:] / "manifest.json").read_text())


def pull_fresh(docker_host, env, store, image, ref="dgtest/formats:1"):
    docker_cli(docker_host, "rmi", "-f", ref, check=False)
    proc = run_dogestry("pull", store, ref, env=env)
    assert proc.returncode == 0, proc.stderr
    return docker_cli(docker_host, "inspect", "-f", "{{.Id}}", ref).stdout.strip()


def pull_tag(docker_host, env, store, tag):
    """Pull TAG into an engine that lacks it; the image ID it arrives as."""
    docker_cli(docker_host, "rmi", "-f", tag, check=False)
    proc = run_dogestry("pull", store, tag, env=env)
    assert proc.returncode == 0, proc.stderr
    return docker_cli(docker_host, "inspect", "-f", "{{.Id}}", tag).stdout.strip()


def test_v1_save_with_a_repeated_layer_round_trips(docker_host, docker_env, saved, tmp_path):
    image, tar_path = saved
    with tarfile.open(str(tar_path)) as tar:
        assert any(m.issym() for m in tar), "20.10 saves a repeated layer as a symlink"
    manifest = push_in_process(docker_host, tar_path, tmp_path / "store", image)
    assert manifest["layers"][0]["diffID"] == manifest["layers"][2]["diffID"]
    assert pull_fresh(docker_host, docker_env, tmp_path / "store", image) == image


def test_oci_layout_save_docker25_round_trips(docker_host, docker_env, saved, tmp_path):
    image, tar_path = saved
    files, _ = oci_save(read_tar(tar_path), compress_layers=False)
    write_tar(tmp_path / "oci.tar", files)
    manifest = push_in_process(docker_host, tmp_path / "oci.tar", tmp_path / "store", image)
    assert [l["diffID"] for l in manifest["layers"]] == image_layers(docker_host, image)
    assert pull_fresh(docker_host, docker_env, tmp_path / "store", image) == image


def test_containerd_save_docker29_stores_compressed_blobs_as_they_are(docker_host, docker_env, saved, tmp_path):
    image, tar_path = saved
    files, gz_blobs = oci_save(read_tar(tar_path), compress_layers=True)
    write_tar(tmp_path / "oci-gz.tar", files)
    manifest = push_in_process(docker_host, tmp_path / "oci-gz.tar", tmp_path / "store", image)
    assert [l["digest"] for l in manifest["layers"]] == [sha(b) for b in gz_blobs]
    assert {l["compression"] for l in manifest["layers"]} == {"gzip"}
    for blob in gz_blobs:  # not compressed twice: the stored bytes are the exported blob
        assert (tmp_path / "store" / "blobs" / "sha256" / sha(blob)[7:]).read_bytes() == blob
    assert pull_fresh(docker_host, docker_env, tmp_path / "store", image) == image


@pytest.mark.parametrize("compress_layers", [False, True], ids=["docker25", "docker29"])
def test_oci_layout_save_with_small_layers_round_trips(docker_host, docker_env, tmp_path, compress_layers):
    """Layers under 1 MiB stay in memory while the save is read: they are stored like the rest
    (raw ones gzip'ed as push does, compressed ones as they are), checked against their diffIDs."""
    ref = "dgtest/formats-small:1"
    image = build_image(docker_host, ref, [{"a.txt": text_bytes(20000, 31)}, {"b.txt": b"small"}])
    tar_path = tmp_path / "save.tar"
    tar_path.write_bytes(dogestry.DockerClient(dogestry.docker_endpoint(docker_host, {}, "/")).save(image).read())
    files, blobs = oci_save(read_tar(tar_path), compress_layers)
    assert max(len(b) for b in blobs) < dogestry.SMALL_MEMBER
    write_tar(tmp_path / "oci.tar", files)
    manifest = push_in_process(docker_host, tmp_path / "oci.tar", tmp_path / "store", image, ref)
    assert [l["diffID"] for l in manifest["layers"]] == image_layers(docker_host, image)
    assert [l["compression"] for l in manifest["layers"]] == ["gzip", "gzip"]
    assert pull_fresh(docker_host, docker_env, tmp_path / "store", image, ref) == image


def test_truncated_save_stream_is_a_clear_error_and_writes_nothing(docker_host, saved, tmp_path):
    image, tar_path = saved
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar_path.read_bytes()[: (3 << 20)])
    with pytest.raises(dogestry.DogestryError) as err:
        push_in_process(docker_host, cut, tmp_path / "store", image)
    assert "save stream" in str(err.value)
    assert not (tmp_path / "store" / "repositories").exists()
    assert not (tmp_path / "store" / "images").exists()


def legacy_store(v1_tar, store):
    """The original dogestry layout made from a 20.10 save: images/<v1id>/{json,layer.tar,VERSION}."""
    with tarfile.open(str(v1_tar)) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 2 or len(parts[0]) != 64:
                continue
            if member.issym():  # a repeated layer: copy the file it links to
                member = tar.getmember(posixpath.normpath(posixpath.join(parts[0], member.linkname)))
            target = store / "images" / parts[0] / parts[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
        names = tar.getnames()
        return json.loads(tar.extractfile("repositories").read()) if "repositories" in names else {}


def original_layout(docker_host, image_ref, store, tag_path):
    """A store in the original's layout holding IMAGE_REF (from a real `docker save`), tagged as
    TAG_PATH ('name/tag'); the top v1 id the tag holds."""
    v1_tar = store.parent / (store.name + "-save.tar")
    docker_cli(docker_host, "save", "-o", str(v1_tar), image_ref)
    name, _, tag = image_ref.rpartition(":")
    top = legacy_store(v1_tar, store)[name][tag]
    (store / "repositories" / tag_path).parent.mkdir(parents=True)
    (store / "repositories" / tag_path).write_text(top)
    return top


def test_original_layout_is_listed_and_pulled_with_the_same_layers(docker_host, docker_env, saved, tmp_path):
    image, _ = saved
    store = tmp_path / "legacy"
    top = original_layout(docker_host, "dgtest/formats:1", store, "oldapp/20131210")

    listing = run_dogestry("list", store, env=docker_env)
    assert listing.stdout.splitlines()[1].split() == ["oldapp", "20131210", top[:12]]
    pulled = run_dogestry("pull", store, "oldapp:20131210", env=docker_env)
    assert pulled.returncode == 0, pulled.stderr

    assert image_layers(docker_host, "oldapp:20131210") == image_layers(docker_host, image)
    config = json.loads(docker_cli(docker_host, "inspect", "oldapp:20131210").stdout)[0]["Config"]
    assert config["Labels"] == {"format": "test"}
    inspect = json.loads(run_dogestry("inspect", store, "oldapp:20131210", env=docker_env).stdout)
    assert len(inspect["Layers"]) == 3


def test_original_layout_with_gzipped_layers(docker_host, docker_env, saved, tmp_path):
    _, v1_save = saved
    store = tmp_path / "legacy"
    legacy_store(v1_save, store)
    manifest = json.loads(read_tar(v1_save)["manifest.json"])[0]
    top = manifest["Layers"][-1].split("/")[0]
    for layer in (store / "images").glob("*/layer.tar"):
        layer.write_bytes(gzip.compress(layer.read_bytes(), 1, mtime=0))
    (store / "repositories" / "gz").mkdir(parents=True)
    (store / "repositories" / "gz" / "old").write_text(top)
    pulled = run_dogestry("pull", store, "gz:old", env=docker_env)
    assert pulled.returncode == 0, pulled.stderr
    assert image_layers(docker_host, "gz:old") == image_layers(docker_host, saved[0])


def test_the_originals_images_at_the_bucket_root_are_read_from_a_prefix(docker_host, s3_env, saved, rgw, bucket,
                                                                         tmp_path):
    """The original ignored the path of s3://bucket/path/ and wrote at the bucket root: a pull from
    the path it was given finds the image there (and says so); list shows it, marked; nothing is
    ever written at the root."""
    image, _ = saved
    local = tmp_path / "legacy"
    top = original_layout(docker_host, "dgtest/formats:1", local, "oldapp/20131210")
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    client = dogestry.S3Client(dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint),
                               dogestry.CredentialChain(config), config)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = str(path.relative_to(local))
        data = path.read_bytes()
        for name, body in ((key, data), (".md5/" + key, hashlib.md5(data).hexdigest().encode())):
            client.put(name, lambda b=body: b, len(body), hashlib.sha256(body).hexdigest())
    root_keys = sorted(k for k, _ in client.list(""))
    prefix = "s3://%s/docker-repo/" % bucket

    pulled = run_dogestry("pull", prefix, "oldapp:20131210", env=s3_env)
    assert pulled.returncode == 0, pulled.stderr
    assert "oldapp:20131210 is not in %s: using the original dogestry's image at the root of the bucket" % prefix \
        in pulled.stderr
    assert image_layers(docker_host, "oldapp:20131210") == image_layers(docker_host, image)
    listing = run_dogestry("list", prefix, env=s3_env)
    assert [line.split(None, 3) for line in listing.stdout.splitlines()[1:]] == [
        ["oldapp", "20131210", top[:12], "(original layout, at the bucket root)"]], listing.stdout
    inspect = run_dogestry("inspect", prefix, "oldapp:20131210", env=s3_env)
    assert json.loads(inspect.stdout)["Format"] == "dogestry-v1 (original layout)"

    ok = run_dogestry("push", prefix, "dgtest/formats:1", env=s3_env)
    assert ok.returncode == 0, ok.stderr
    after = sorted(k for k, _ in client.list(""))
    assert [k for k in after if not k.startswith("docker-repo/")] == root_keys  # the root is untouched
    assert run_dogestry("push", "s3://%s/" % bucket, "dgtest/formats:1", env=s3_env).returncode == 0  # asked for
    missing = run_dogestry("pull", "s3://%s/elsewhere/" % bucket, "dgtest/formats:1", env=s3_env)
    assert missing.returncode == 1 and "not found" in missing.stderr  # our own layout at the root is not used
    docker_cli(docker_host, "rmi", "oldapp:20131210")


def test_gc_keeps_the_originals_chains_that_tags_reach_and_frees_the_rest(docker_host, docker_env, saved, tmp_path):
    store = tmp_path / "legacy"
    top = original_layout(docker_host, "dgtest/formats:1", store, "oldapp/20131210")
    chain = sorted(p.name for p in (store / "images").iterdir())
    stray = store / "images" / ("f" * 64)
    stray.mkdir()
    (stray / "json").write_text(json.dumps({"id": "f" * 64, "parent": top}))
    (stray / "layer.tar").write_bytes(b"\0" * 1024)
    for path in store.rglob("*"):
        if path.is_file():
            os.utime(path, (time.time() - 7200,) * 2)

    proc = run_dogestry("gc", store, env=docker_env)

    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (store / "images").iterdir()) == chain  # the parent chain of the tag
    assert "deleted 1 images" in proc.stdout
    assert run_dogestry("rm", store, "oldapp:20131210", env=docker_env).returncode == 0
    for path in (store / "gc").rglob("*"):
        os.utime(path, (time.time() - 7200,) * 2)
    assert run_dogestry("gc", store, env=docker_env).returncode == 0
    assert not (store / "images").exists()


def test_migrate_stores_the_originals_images_in_the_current_layout(docker_host, docker_env, saved, tmp_path):
    image, _ = saved
    store = tmp_path / "legacy"
    top = original_layout(docker_host, "dgtest/formats:1", store, "oldapp/20131210")
    assert run_dogestry("pull", store, "oldapp:20131210", env=docker_env).returncode == 0
    from_legacy = json.loads(docker_cli(docker_host, "inspect", "oldapp:20131210").stdout)[0]["Id"]
    docker_cli(docker_host, "rmi", "oldapp:20131210")

    proc = run_dogestry("migrate", store, env=docker_env)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "migrated oldapp:20131210 (%s) -> %s\n" % (top[:12], from_legacy[7:19])
    assert (store / "repositories" / "oldapp" / "20131210").read_text() == from_legacy[7:]
    manifest = json.loads((store / "images" / from_legacy[7:] / "manifest.json").read_text())
    assert [l["diffID"] for l in manifest["layers"]] == image_layers(docker_host, image)
    assert "gzip" in {l["compression"] for l in manifest["layers"]}  # compressed as a push would
    assert run_dogestry("migrate", store, env=docker_env).stderr.startswith("nothing to migrate")
    assert pull_tag(docker_host, docker_env, store, "oldapp:20131210") == from_legacy
    for path in store.rglob("*"):
        if path.is_file():
            os.utime(path, (time.time() - 7200,) * 2)
    assert run_dogestry("gc", store, env=docker_env).returncode == 0
    assert sorted(p.name for p in (store / "images").iterdir()) == [from_legacy[7:]]  # the v1 dirs went


def test_migrate_keep_legacy_leaves_the_original_readable_and_serves_the_new_layout(docker_host, docker_env, saved,
                                                                                   tmp_path):
    store = tmp_path / "legacy"
    top = original_layout(docker_host, "dgtest/formats:1", store, "oldapp/20131210")
    v1_dirs = sorted(p.name for p in (store / "images").iterdir())

    proc = run_dogestry("migrate", "--keep-legacy", store, "oldapp", env=docker_env)

    assert proc.returncode == 0, proc.stderr
    new_id = proc.stdout.split()[-1]
    assert (store / "repositories" / "oldapp" / "20131210").read_text() == top  # the original tool reads it
    inspect = json.loads(run_dogestry("inspect", store, "oldapp:20131210", env=docker_env).stdout)
    assert inspect["Id"].startswith("sha256:" + new_id)
    for path in store.rglob("*"):
        if path.is_file():
            os.utime(path, (time.time() - 7200,) * 2)
    assert run_dogestry("gc", store, env=docker_env).returncode == 0
    images = sorted(p.name for p in (store / "images").iterdir())
    assert set(v1_dirs) < set(images) and len(images) == len(v1_dirs) + 1
    assert pull_tag(docker_host, docker_env, store, "oldapp:20131210") == inspect["Id"]
