"""Chunked layers through a store's lifecycle: gc keeps every chunk a recipe it keeps names and
deletes the rest once older than the grace; stats shows the chunks and their dedup ratio; copy
keeps a layer chunked (the same recipe) and sends only the chunks DST lacks; migrate leaves
chunked layers as they are (README: Store layout, Garbage collection, retention, stats).

Two images of ~24 MiB of files each, one file apart, so that they share all but a chunk or two.
Directory-store tests make objects old by moving file times back (as tests/test_gc.py does).
"""

import gzip
import json
import os
import urllib.parse
import zlib
from pathlib import Path

import pytest

from realdocker import build_image, docker_cli, image_layers, one_error_line, run_dogestry
from test_chunks import tree
from test_gc import (MIN_GRACE, age_store, docker_env, ok, pulls_back, s3_client, s3_env,  # noqa: F401 (fixtures)
                     wait_until_older_than)
from test_save_formats import original_layout

pytestmark = pytest.mark.integration


class Images:
    """dgchunklc/app:1 and dgchunklc/app:2: the same tree, one file edited in the second."""

    def __init__(self, first, second):
        self.first, self.second = first, second


@pytest.fixture(scope="module")
def images(docker_host):
    return Images(build_image(docker_host, "dgchunklc/app:1", [tree()]),
                  build_image(docker_host, "dgchunklc/app:2", [tree(edit="app/doc/t07.txt")]))


def layer_record(store, image):
    """The one layer record of IMAGE in a directory store."""
    [record] = json.loads((Path(store) / "images" / image[7:] / "manifest.json").read_text())["layers"]
    return record


def recipe_blob(store, image):
    return Path(store) / "blobs" / "sha256" / layer_record(store, image)["digest"][7:]


def recipe_line(data):
    """The JSON line of a recipe: its first gzip member."""
    return json.loads(zlib.decompressobj(31).decompress(data).split(b"\n")[0])


def recipe(store, image):
    """The JSON line of IMAGE's recipe in a directory store."""
    return recipe_line(recipe_blob(store, image).read_bytes())


def chunks_of(store, image):
    """The chunks (hex) IMAGE's recipe names."""
    return {chunk for chunk, _ in recipe(store, image)["chunks"]}


def stored_chunks(store):
    return {p.name for p in (Path(store) / "chunks" / "sha256").iterdir()}


def chunk_path(store, chunk):
    return Path(store) / "chunks" / "sha256" / chunk


def make_young(path):
    os.utime(str(path), None)


def pushed_both(env, store, images):
    """Push both images; (chunks only the second names, chunks of the first)."""
    ok(env, "push", store, "dgchunklc/app:1")
    ok(env, "push", store, "dgchunklc/app:2")
    first, second = chunks_of(store, images.first), chunks_of(store, images.second)
    assert layer_record(store, images.second)["compression"] == "chunked"
    assert 1 <= len(second - first) <= 2 and stored_chunks(store) == first | second
    return second - first, first


# --- gc ------------------------------------------------------------------------------------------

def test_gc_deletes_the_chunks_only_an_unreachable_recipe_named_and_the_other_image_still_pulls(
        docker_host, docker_env, images, tmp_path):
    store = tmp_path / "store"
    only_second, first = pushed_both(docker_env, store, images)
    second_recipe = recipe_blob(store, images.second)
    ok(docker_env, "rm", store, "dgchunklc/app:2")
    age_store(store)

    dry = json.loads(ok(docker_env, "gc", "--dry-run", "--json", store).stdout)
    assert {d["name"] for d in dry["deleted"] if d["kind"] == "chunk"} == {"sha256:" + c for c in only_second}
    assert dry["counts"]["chunk"] == len(only_second)
    assert stored_chunks(store) == first | only_second

    real = ok(docker_env, "gc", store)

    assert "deleted 1 images, 1 layer records, 1 blobs, %d chunks, " % len(only_second) in real.stdout
    assert {l.split()[2] for l in real.stdout.splitlines() if l.startswith("deleted chunk ")} == \
        {"sha256:" + c for c in only_second}
    assert stored_chunks(store) == first and not second_recipe.exists()
    assert pulls_back(docker_host, docker_env, store, "dgchunklc/app:1", images.first)


def test_gc_on_s3_deletes_the_chunks_only_an_unreachable_recipe_named(docker_host, rgw, s3_env, images, bucket):
    store, client = "s3://%s/team/" % bucket, s3_client(rgw, bucket)

    def chunks(image):
        manifest = json.loads(client.get("team/images/%s/manifest.json" % image[7:]).read())
        return {c for c, _ in recipe_line(client.get("team/blobs/sha256/" + manifest["layers"][0]["digest"][7:]).read())
                ["chunks"]}

    ok(s3_env, "push", store, "dgchunklc/app:1")
    ok(s3_env, "push", store, "dgchunklc/app:2")
    first, second = chunks(images.first), chunks(images.second)
    ok(s3_env, "rm", store, "dgchunklc/app:2")
    wait_until_older_than(client, "team/gc/untagged/" + images.second[7:], 11)

    proc = ok(s3_env, "gc", store, "--grace", "10s")

    assert "deleted 1 images, 1 layer records, 1 blobs, %d chunks, " % len(second - first) in proc.stdout
    assert {k[len("team/chunks/sha256/"):] for k, _ in client.list("team/chunks/")} == first
    assert pulls_back(docker_host, s3_env, store, "dgchunklc/app:1", images.first)


def test_a_fresh_chunk_of_an_untagged_push_is_kept_until_it_is_older_than_the_grace(docker_env, images, tmp_path):
    store = tmp_path / "store"
    ok(docker_env, "push", store, "dgchunklc/app:1")
    age_store(store)
    ok(docker_env, "push", store, images.second)  # by ID: stored, and no tag names it
    first, fresh = chunks_of(store, images.first), chunks_of(store, images.second) - chunks_of(store, images.first)
    ok(docker_env, "gc", store)  # the untagged image and its chunks are seconds old
    assert stored_chunks(store) == first | fresh

    age_store(store)
    found = sorted(fresh)[0]
    make_young(chunk_path(store, found))  # as a push that has just found it (and refreshed it) does
    ok(docker_env, "gc", store)
    assert not (store / "images" / images.second[7:]).exists()
    assert stored_chunks(store) == first | {found}

    age_store(store, prefix="chunks")
    ok(docker_env, "gc", store)
    assert stored_chunks(store) == first


def test_a_recipe_stored_before_its_push_names_it_keeps_its_chunks_while_it_is_young(docker_env, images, tmp_path):
    """A push stores a layer's chunks, its recipe, then the layer's index entry: a gc that runs in
    between finds a young blob nothing names yet, and keeps every chunk it names."""
    store = tmp_path / "store"
    only_second, first = pushed_both(docker_env, store, images)
    record, second_recipe = layer_record(store, images.second), recipe_blob(store, images.second)
    for path in [store / "repositories" / "dgchunklc" / "app" / "2", store / "layers" / (record["diffID"][7:] + ".json")]:
        path.unlink()
    for path in (store / "images" / images.second[7:]).iterdir():
        path.unlink()
    age_store(store)
    make_young(second_recipe)

    ok(docker_env, "gc", store)
    assert stored_chunks(store) == first | only_second

    age_store(store, prefix="blobs")
    ok(docker_env, "gc", store)
    assert stored_chunks(store) == first and not second_recipe.exists()


def test_a_recipe_gc_cannot_read_keeps_every_chunk_and_gc_says_so(docker_env, images, tmp_path):
    store = tmp_path / "store"
    only_second, first = pushed_both(docker_env, store, images)
    ok(docker_env, "rm", store, "dgchunklc/app:2")
    hostile = recipe_blob(store, images.first)  # a tag reaches it: gc keeps it, and must read it
    hostile.write_bytes(gzip.compress(b'{"mediaType":"application/vnd.dogestry.layer.recipe.v1+json",'
                                      b'"chunks":"all"}\n'))
    age_store(store)

    proc = ok(docker_env, "gc", store)

    assert stored_chunks(store) == first | only_second
    assert not (store / "images" / images.second[7:]).exists()  # the rest of gc's work is done
    [line] = [l for l in proc.stderr.splitlines() if "chunk" in l]
    assert "gc kept every chunk" in line and hostile.name in line


# --- stats ---------------------------------------------------------------------------------------

def test_stats_shows_chunked_layers_chunk_objects_and_the_chunk_dedup_ratio(docker_env, images, tmp_path):
    store = tmp_path / "store"
    pushed_both(docker_env, store, images)
    recipes = [recipe(store, images.first)["chunks"], recipe(store, images.second)["chunks"]]
    content = sum(size for chunks in recipes for _, size in chunks)
    distinct = sum(dict(c for chunks in recipes for c in chunks).values())

    stats = json.loads(ok(docker_env, "stats", "--json", store).stdout)

    paths = list((store / "chunks" / "sha256").iterdir())
    assert stats["chunked_layers"] == 2
    assert stats["chunks"] == len(paths) and stats["chunk_bytes"] == sum(p.stat().st_size for p in paths)
    assert stats["chunk_content_bytes"] == content and stats["chunk_distinct_bytes"] == distinct
    assert stats["chunk_dedup_ratio"] == round(content / distinct, 3) and stats["chunk_dedup_ratio"] > 1.8
    table = ok(docker_env, "stats", store).stdout
    assert "Chunks:          %d (" % len(paths) in table
    assert "Chunked layers:  2: " in table and "(dedup %.2fx)" % (content / distinct) in table


# --- copy ----------------------------------------------------------------------------------------

def copy_json(env, src, dst, ref):
    return json.loads(ok(env, "copy", "--json", src, dst, ref).stdout)


def test_copy_between_directories_keeps_layers_chunked_and_sends_only_the_chunks_dst_lacks(
        docker_host, docker_env, images, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    only_second, first = pushed_both(docker_env, src, images)

    one = copy_json(docker_env, src, dst, "dgchunklc/app:1")

    assert layer_record(dst, images.first) == layer_record(src, images.first)  # the same recipe, chunked
    assert recipe_blob(dst, images.first).read_bytes() == recipe_blob(src, images.first).read_bytes()
    assert (dst / "layers" / (layer_record(src, images.first)["diffID"][7:] + ".json")).exists()
    assert stored_chunks(dst) == first and one["chunks_sent"] == len(first)
    for chunk in first:
        assert chunk_path(dst, chunk).read_bytes() == chunk_path(src, chunk).read_bytes()

    two = copy_json(docker_env, src, dst, "dgchunklc/app:2")

    assert two["chunks_sent"] == len(only_second) and two["chunks_skipped"] == len(chunks_of(src, images.second) & first)
    assert stored_chunks(dst) == first | only_second
    assert pulls_back(docker_host, docker_env, dst, "dgchunklc/app:1", images.first)
    assert pulls_back(docker_host, docker_env, dst, "dgchunklc/app:2", images.second)


def test_copy_of_a_multi_platform_tag_keeps_its_chunked_layer_and_pulls(docker_host, docker_env, images, tmp_path):
    """The manifests of a multi-platform tag describe a chunked layer as its uncompressed tar (its
    diffID): copy stores that layer chunked in DST, with its recipe and chunks, and the tag pulls."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    ok(docker_env, "push", "--multi-platform", src, "dgchunklc/app:1")
    assert (src / "repositories" / "dgchunklc" / "app" / "1").read_text().startswith("@sha256:")

    ok(docker_env, "copy", src, dst, "dgchunklc/app:1")

    assert (dst / "repositories" / "dgchunklc" / "app" / "1").read_text() == \
        (src / "repositories" / "dgchunklc" / "app" / "1").read_text()
    assert layer_record(dst, images.first) == layer_record(src, images.first)
    assert stored_chunks(dst) == chunks_of(src, images.first)
    assert pulls_back(docker_host, docker_env, dst, "dgchunklc/app:1", images.first)


def test_copy_to_s3_and_between_prefixes_of_one_endpoint_server_side_keeps_layers_chunked(
        docker_host, s3_env, images, bucket, fault_proxy, tmp_path):
    src = tmp_path / "src"
    ok(s3_env, "push", src, "dgchunklc/app:1")
    first = chunks_of(src, images.first)
    ok(s3_env, "copy", src, "s3://%s/team/" % bucket, "dgchunklc/app:1")
    proxy = fault_proxy()
    endpoint = urllib.parse.quote(proxy.url, safe="")
    team, other = ("s3://%s/%s/?endpoint=%s" % (bucket, prefix, endpoint) for prefix in ("team", "other"))

    ok(s3_env, "copy", team, other, "dgchunklc/app:1")

    chunk_writes = [e for e in proxy.log if e["method"] == "PUT" and "/chunks/sha256/" in e["path"]]
    assert {e["key"] for e in chunk_writes} == {"other/chunks/sha256/" + c for c in first}
    assert {urllib.parse.unquote(e["headers"].get("x-amz-copy-source", "")) for e in chunk_writes} == \
        {"/%s/team/chunks/sha256/%s" % (bucket, c) for c in first}  # CopyObject: no chunk bytes through here
    assert not [e for e in proxy.log if e["method"] == "GET" and "/chunks/sha256/" in e["path"]]
    for url in ("s3://%s/team/" % bucket, "s3://%s/other/" % bucket):
        assert pulls_back(docker_host, s3_env, url, "dgchunklc/app:1", images.first)


def test_copy_of_an_image_whose_chunk_src_lacks_is_one_error_and_tags_nothing(docker_env, images, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    ok(docker_env, "push", src, "dgchunklc/app:1")
    gone = sorted(chunks_of(src, images.first))[3]
    chunk_path(src, gone).unlink()

    proc = run_dogestry("copy", src, dst, "dgchunklc/app:1", env=docker_env)

    one_error_line(proc, "chunk %s of layer %s is missing" % (gone[:12], layer_record(src, images.first)["diffID"]),
                   "nothing was tagged")
    assert not (dst / "repositories").exists() and not (dst / "layers").exists()


# --- migrate -------------------------------------------------------------------------------------

def test_migrate_leaves_chunked_layers_as_they_are_and_both_images_pull(docker_host, docker_env, images, tmp_path):
    """A store holding a chunked image and an image of the original layout (the same tree, one file
    edited): migrate stores the second as a push would, its big layer chunked and sharing the
    first's chunks, and rewrites nothing that was stored."""
    store = tmp_path / "store"
    original_layout(docker_host, "dgchunklc/app:2", store, "oldchunk/1")
    ok(docker_env, "push", store, "dgchunklc/app:1")
    tag = store / "repositories" / "oldchunk" / "1"
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and p != tag}

    ok(docker_env, "migrate", store)

    assert {p: p.read_bytes() for p in before} == before
    migrated = "sha256:" + tag.read_text().strip()
    assert layer_record(store, migrated)["compression"] == "chunked"
    assert layer_record(store, migrated)["diffID"] == image_layers(docker_host, images.second)[0]
    assert stored_chunks(store) == chunks_of(store, images.first) | chunks_of(store, migrated)
    assert pulls_back(docker_host, docker_env, store, "dgchunklc/app:1", images.first)
    assert pulls_back(docker_host, docker_env, store, "oldchunk:1", migrated)
    docker_cli(docker_host, "rmi", "oldchunk:1")
