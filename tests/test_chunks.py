"""Sub-layer dedup: big layers are stored as content-defined chunks plus a recipe, so a rebuilt
image uploads what changed in its files, not whole layers (README: Chunked layers)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from realdocker import (
    build_image, docker_cli, image_id, loopback_addresses, one_error_line, random_bytes, run_dogestry, text_bytes,
    write_context,
)

pytestmark = pytest.mark.integration

MIB = 1 << 20
HOSTS = loopback_addresses(1)  # the module's fleet (conftest `fleet`): a dockerd on HOST:2375


def tree(edit=None, text_first=False, seed=100):
    """~24 MiB of files: 40 random ones of 256 KiB, 40 text ones of 256 KiB, 8 random ones of 1 MiB
    (text_first: the text files first in the tar); edit: the name of a file to change in its middle."""
    binaries = "app/zbin" if text_first else "app/bin"
    files = {}
    for i in range(40):
        files["%s/b%02d" % (binaries, i)] = random_bytes(256 << 10, seed + i)
        files["app/doc/t%02d.txt" % i] = text_bytes(256 << 10, seed + 100 + i)
    for i in range(8):
        files["%s/m%d" % ("app/zbig" if text_first else "app/big", i)] = random_bytes(MIB, seed + 200 + i)
    if edit is not None:
        data = bytearray(files[edit])
        data[len(data) // 2:len(data) // 2 + 16] = b"edited by a test"
        files[edit] = bytes(data)
    return files


def ok(env, *args):
    proc = run_dogestry(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def pushed(env, store, ref):
    """Push ref with --json; the image's part of the document."""
    [image] = json.loads(ok(env, "push", "--json", str(store), ref).stdout)["images"]
    return image


def layer_records(store, image):
    doc = json.loads((Path(store) / "images" / image.split(":")[1] / "manifest.json").read_text())
    return doc["layers"]


def build_touched(docker_host, tag, files, mtime):
    """build_image, every file's mtime set to mtime (a rebuild whose `RUN` touched them all)."""
    ctxdir = Path(tempfile.mkdtemp(prefix="ctx"))
    try:
        write_context(ctxdir, [files])
        for path in (ctxdir / "l0").rglob("*"):
            os.utime(str(path), (mtime, mtime))
        docker_cli(docker_host, "build", "--no-cache", "-q", "-t", tag, str(ctxdir))
    finally:
        shutil.rmtree(str(ctxdir), ignore_errors=True)
    return docker_cli(docker_host, "inspect", "-f", "{{.Id}}", tag).stdout.strip()


@pytest.fixture(scope="module")
def chunk_images(docker_host):
    """The same tree built three times: as it is, with one file edited, and with every mtime new."""
    first = build_image(docker_host, "dgchunk/app:1", [tree()])
    edited = build_image(docker_host, "dgchunk/app:2", [tree(edit="app/doc/t07.txt")])
    retouched = build_touched(docker_host, "dgchunk/app:3", tree(), 1700000000)
    return first, edited, retouched


def test_a_big_layer_is_stored_as_chunks_and_pulls_back_to_the_same_image(docker_host, docker_env, chunk_images, tmp_path):
    store = tmp_path / "store"
    doc = pushed(docker_env, store, "dgchunk/app:1")
    [record] = layer_records(store, chunk_images[0])
    assert record["compression"] == "chunked" and record["rawSize"] > 24 * MIB
    chunks = sorted((store / "chunks" / "sha256").iterdir())
    assert 12 <= len(chunks) <= 48  # about one per MiB of content, none smaller than 512 KiB but the last
    assert doc["chunks_sent"] == len(chunks)
    docker_cli(docker_host, "rmi", "-f", "dgchunk/app:1")
    assert image_id(docker_host, "dgchunk/app:1") is None
    ok(docker_env, "pull", str(store), "dgchunk/app:1")
    assert image_id(docker_host, "dgchunk/app:1") == chunk_images[0]


def test_a_rebuild_with_one_file_edited_uploads_about_one_chunk(docker_env, chunk_images, tmp_path):
    store = tmp_path / "store"
    first = pushed(docker_env, store, "dgchunk/app:1")
    second = pushed(docker_env, store, "dgchunk/app:2")
    assert first["chunks_sent"] >= 12
    assert 1 <= second["chunks_sent"] <= 2
    assert second["bytes_sent"] < 3 * MIB


def test_a_rebuild_that_changes_only_metadata_uploads_no_chunk(docker_env, chunk_images, tmp_path):
    store = tmp_path / "store"
    pushed(docker_env, store, "dgchunk/app:1")
    again = pushed(docker_env, store, "dgchunk/app:3")
    assert again["chunks_sent"] == 0 and again["chunks_skipped"] >= 12
    assert again["bytes_sent"] < 256 << 10


def test_with_DOGESTRY_CHUNKS_0_a_big_layer_is_stored_whole_as_before(docker_env, chunk_images, tmp_path):
    """The bench's layer-level reference: one blob per layer (gzip, or raw if it does not shrink)."""
    store = tmp_path / "store"
    doc = pushed(dict(docker_env, DOGESTRY_CHUNKS="0"), store, "dgchunk/app:1")
    [record] = layer_records(store, chunk_images[0])
    assert record["compression"] in ("gzip", "none")
    assert (store / "blobs" / "sha256" / record["digest"][7:]).stat().st_size == record["size"]
    assert not (store / "chunks").exists()
    assert doc["chunks_sent"] == 0 and doc["bytes_sent"] == record["size"]


def test_a_DOGESTRY_CHUNKS_other_than_0_or_1_is_one_clear_error(docker_env, chunk_images, tmp_path):
    store = tmp_path / "store"
    proc = run_dogestry("push", str(store), "dgchunk/app:1", env=dict(docker_env, DOGESTRY_CHUNKS="off"))
    one_error_line(proc, "DOGESTRY_CHUNKS=off")
    assert not (store / "images").exists()


def test_a_fleet_pull_of_a_chunked_layer_loads_the_same_image(docker_env, chunk_images, fleet, tmp_path):
    """-pullhosts reads each chunk from the store once into its spool, and every host gets the layer whole."""
    store = tmp_path / "store"
    pushed(docker_env, store, "dgchunk/app:1")
    [host] = fleet
    ok(docker_env, "-pullhosts", "tcp://%s" % HOSTS[0], "pull", str(store), "dgchunk/app:1")
    assert image_id(host.host, "dgchunk/app:1") == chunk_images[0]
