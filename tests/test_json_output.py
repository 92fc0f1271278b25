"""--json for scripts: every command that reports something prints one JSON document on stdout
(progress and errors stay on stderr, exit codes are unchanged) whose keys are pinned here; new
fields may be added, none renamed or removed (README: JSON output)."""

import json
import uuid

import pytest

from multiplatform import Buildah, platform_context
from realdocker import build_image, docker_cli, image_layers, ok, one_error_line, random_bytes, run_dogestry

pytestmark = pytest.mark.integration

IMAGE_KEYS = {"image", "image_id", "tag", "index", "platform", "layers", "bytes_sent", "bytes_skipped"}
LAYER_KEYS = {"diff_id", "digest", "size", "sent"}


@pytest.fixture(scope="module")
def images(docker_host):
    """dgjson/base:1 (two layers) and dgjson/more:1 (base's layers and one more)."""
    token = uuid.uuid4().hex[:8]
    base = [{"a.bin": random_bytes(300000, token + "a")}, {"b.bin": random_bytes(200000, token + "b")}]
    return {"base": build_image(docker_host, "dgjson/base:1", base),
            "more": build_image(docker_host, "dgjson/more:1", base + [{"c.txt": token.encode()}])}


def run_json(*args, env):
    """Run dogestry ARGS --json; its stdout must be one JSON document (returned parsed)."""
    proc = ok(run_dogestry(*args, "--json", env=env))
    return json.loads(proc.stdout), proc


def test_push_json_names_the_image_its_tag_and_every_layer_with_the_bytes_it_sent(images, docker_env, tmp_path):
    doc, proc = run_json("push", tmp_path / "s", "dgjson/base:1", env=docker_env)

    assert set(doc) == {"store", "images", "bytes_sent"} and doc["store"] == str(tmp_path / "s")
    [pushed] = doc["images"]
    assert set(pushed) == IMAGE_KEYS | {"chunks_sent", "chunks_skipped"}  # chunked layers' chunks (README)
    assert (pushed["image"], pushed["image_id"], pushed["tag"], pushed["index"]) == \
        ("dgjson/base:1", images["base"], "dgjson/base:1", None)
    assert pushed["platform"].startswith("linux/")
    assert [layer["diff_id"] for layer in pushed["layers"]] == image_layers(docker_env["DOCKER_HOST"], "dgjson/base:1")
    assert all(set(layer) == LAYER_KEYS and layer["sent"] and layer["digest"].startswith("sha256:")
               for layer in pushed["layers"])
    assert pushed["bytes_sent"] == sum(layer["size"] for layer in pushed["layers"]) == doc["bytes_sent"] > 0
    assert pushed["bytes_skipped"] == 0
    assert "pushed dgjson/base:1" in proc.stderr  # progress stays on stderr


def test_a_second_push_json_shows_every_layer_skipped_and_a_larger_image_only_its_new_layer_sent(
        images, docker_env, tmp_path):
    first, _ = run_json("push", tmp_path, "dgjson/base:1", env=docker_env)

    again, _ = run_json("push", tmp_path, "dgjson/base:1", env=docker_env)
    more, _ = run_json("push", tmp_path, "dgjson/more:1", env=docker_env)

    [repushed] = again["images"]
    assert [layer["sent"] for layer in repushed["layers"]] == [False, False]
    assert repushed["bytes_sent"] == again["bytes_sent"] == 0
    assert repushed["bytes_skipped"] == first["images"][0]["bytes_sent"]
    [bigger] = more["images"]
    assert [layer["sent"] for layer in bigger["layers"]] == [False, False, True]
    assert bigger["bytes_sent"] == bigger["layers"][2]["size"]


def test_pull_json_names_the_layers_loaded_into_the_engine_and_skips_them_when_it_has_the_image(
        images, docker_env, tmp_path):
    host = docker_env["DOCKER_HOST"]
    ok(run_dogestry("push", tmp_path, "dgjson/more:1", env=docker_env))
    docker_cli(host, "tag", "dgjson/more:1", "dgjson/keep:1")  # keeps the layers; only the image goes
    docker_cli(host, "rmi", "dgjson/more:1")
    docker_cli(host, "rmi", "dgjson/keep:1")

    doc, _ = run_json("pull", tmp_path, "dgjson/more:1", env=docker_env)
    again, _ = run_json("pull", tmp_path, "dgjson/more:1", env=docker_env)

    [pulled] = doc["images"]
    assert set(pulled) == IMAGE_KEYS
    assert (pulled["image_id"], pulled["tag"]) == (images["more"], "dgjson/more:1")
    assert any(layer["sent"] for layer in pulled["layers"])
    assert pulled["bytes_sent"] == sum(layer["size"] for layer in pulled["layers"] if layer["sent"]) > 0
    [repulled] = again["images"]
    assert not any(layer["sent"] for layer in repulled["layers"]) and repulled["bytes_sent"] == 0


def test_list_json_gives_each_tag_its_image_id_push_time_and_size(images, docker_env, tmp_path):
    pushed, _ = run_json("push", tmp_path, "dgjson/base:1", env=docker_env)

    doc, _ = run_json("list", tmp_path, env=docker_env)

    [tag] = doc["tags"]
    assert set(tag) == {"name", "tag", "kind", "image_id", "manifest", "pushed", "size", "platforms"}
    assert (tag["name"], tag["tag"], tag["kind"], tag["image_id"], tag["manifest"], tag["platforms"]) == \
        ("dgjson/base", "1", "image", images["base"], None, [])
    assert tag["size"] == pushed["images"][0]["bytes_sent"]
    assert tag["pushed"].endswith("Z") and tag["pushed"][:2] == "20"


def test_import_json_of_a_multi_platform_archive_and_list_json_show_the_index_and_its_platforms(
        docker_env, tmp_path):
    buildah = Buildah(tmp_path / "buildah")
    context = platform_context(tmp_path / "ctx", "json " + uuid.uuid4().hex)
    buildah.manifest_list("dgjson-list", context, ["linux/amd64", "linux/arm64"])
    archive = buildah.oci_archive("dgjson-list", tmp_path / "mp.tar", ref="dgjson/mp:1")
    store = tmp_path / "store"

    doc, _ = run_json("import", store, archive, env=docker_env)
    listed, _ = run_json("list", store, env=docker_env)

    assert set(doc) == {"store", "images", "indexes", "bytes_sent", "chunks_sent", "chunks_skipped"}
    [index] = doc["indexes"]
    assert index["tags"] == ["dgjson/mp:1"]
    assert sorted(p["platform"] for p in index["platforms"]) == ["linux/amd64", "linux/arm64"]
    assert sorted(i["platform"] for i in doc["images"]) == ["linux/amd64", "linux/arm64"]
    assert all(layer["sent"] for i in doc["images"] for layer in i["layers"])
    [tag] = listed["tags"]
    assert (tag["kind"], tag["manifest"], tag["image_id"]) == ("index", index["digest"], None)
    assert {p["platform"]: p["image_id"] for p in tag["platforms"]} == \
        {p["platform"]: p["image_id"] for p in index["platforms"]}
    assert tag["size"] == sum(p["size"] for p in tag["platforms"]) > 0


def test_export_then_import_json_report_the_archive_and_an_import_again_sends_nothing(images, docker_env, tmp_path):
    ok(run_dogestry("push", tmp_path / "a", "dgjson/base:1", env=docker_env))
    archive = tmp_path / "base.tar"

    exported, _ = run_json("export", tmp_path / "a", "dgjson/base:1", "-o", archive, env=docker_env)
    imported, _ = run_json("import", tmp_path / "b", archive, env=docker_env)
    again, _ = run_json("import", tmp_path / "b", archive, env=docker_env)

    assert set(exported) == {"store", "output", "format", "bytes", "images"}
    assert (exported["output"], exported["format"], exported["bytes"]) == (str(archive), "docker", archive.stat().st_size)
    assert [(i["image_id"], i["tags"]) for i in exported["images"]] == [(images["base"], ["dgjson/base:1"])]
    [stored] = imported["images"]
    assert (stored["image_id"], stored["tags"]) == (images["base"], ["dgjson/base:1"])
    assert stored["bytes_sent"] == imported["bytes_sent"] > 0 and stored["bytes_skipped"] == 0
    assert again["bytes_sent"] == 0 and again["images"][0]["bytes_skipped"] == stored["bytes_sent"]


def test_export_json_to_stdout_is_refused_as_the_archive_would_share_it(images, docker_env, tmp_path):
    ok(run_dogestry("push", tmp_path, "dgjson/base:1", env=docker_env))

    proc = run_dogestry("export", tmp_path, "dgjson/base:1", "-o", "-", "--json", env=docker_env)

    one_error_line(proc, "--json", "-o FILE")
    assert proc.returncode == 2 and proc.stdout == ""


def test_copy_json_reports_the_layers_sent_and_a_copy_again_sends_none(images, docker_env, tmp_path):
    ok(run_dogestry("push", tmp_path / "a", "dgjson/base:1", env=docker_env))

    doc, _ = run_json("copy", tmp_path / "a", tmp_path / "b", "dgjson/base:1", env=docker_env)
    again, _ = run_json("copy", tmp_path / "a", tmp_path / "b", "dgjson/base:1", env=docker_env)

    assert set(doc) == {"source", "destination", "images", "bytes_sent", "chunks_sent", "chunks_skipped"}
    [copied] = doc["images"]
    assert (copied["image"], copied["tag"], copied["image_id"], copied["manifest"]) == \
        ("dgjson/base:1", "dgjson/base:1", images["base"], None)
    assert all(layer["sent"] for layer in copied["layers"]) and copied["bytes_sent"] == doc["bytes_sent"] > 0
    assert again["bytes_sent"] == 0 and again["images"][0]["bytes_skipped"] == copied["bytes_sent"]


def test_rm_json_lists_the_tags_deleted(images, docker_env, tmp_path):
    ok(run_dogestry("push", tmp_path, "dgjson/base:1", env=docker_env))

    doc, proc = run_json("rm", tmp_path, "dgjson/base:1", env=docker_env)

    assert doc == {"store": str(tmp_path), "platform": None, "changed": [],
                   "deleted": [{"tag": "dgjson/base:1", "target": images["base"], "unprotected": False}]}
    assert "deleted dgjson/base:1" in proc.stderr


def test_prune_and_gc_json_say_what_would_go_with_dry_run_and_what_went_without(images, docker_env, tmp_path):
    env = dict(docker_env, DOGESTRY_GC_MIN_GRACE="10")
    ok(run_dogestry("push", tmp_path, "dgjson/base:1", env=env))

    would, _ = run_json("prune", tmp_path, "--keep-last", "0", "--dry-run", env=env)
    removed, _ = run_json("prune", tmp_path, "--keep-last", "0", env=env)
    gc_plan, _ = run_json("gc", tmp_path, "--grace", "10s", "--dry-run", env=env)

    expected = [{"tag": "dgjson/base:1", "target": images["base"]}]
    assert (would["dry_run"], would["removed"], would["kept_tied"]) == (True, expected, [])
    assert (removed["dry_run"], removed["removed"]) == (False, expected)
    assert set(gc_plan) == {"store", "dry_run", "deleted", "counts", "bytes", "spared", "leftovers", "held_bytes",
                            "held_until", "foreign"}
    assert gc_plan["dry_run"] is True
    assert all(set(d) == {"kind", "name", "size"} for d in gc_plan["deleted"])
    assert gc_plan["bytes"] + gc_plan["held_bytes"] > 0


def test_remote_and_version_json(images, docker_env, tmp_path):
    pushed, _ = run_json("push", tmp_path, "dgjson/base:1", env=docker_env)

    remote, _ = run_json("remote", tmp_path, env=docker_env)
    version, _ = run_json("version", env=docker_env)

    assert remote == {"store": str(tmp_path), "kind": "local directory", "repositories": 1, "tags": 1, "images": 1,
                      "blobs": 2, "blob_bytes": pushed["bytes_sent"]}
    assert set(version) == {"version", "python"} and version["version"][0].isdigit()


def test_push_and_list_json_against_s3(images, s3_env, bucket):
    store = "s3://%s/json/" % bucket

    pushed, _ = run_json("push", store, "dgjson/base:1", env=s3_env)
    listed, _ = run_json("list", store, env=s3_env)

    assert pushed["store"] == listed["store"]
    assert pushed["images"][0]["bytes_sent"] > 0 and pushed["images"][0]["tag"] == "dgjson/base:1"
    assert [(t["name"], t["tag"], t["image_id"], t["size"]) for t in listed["tags"]] == \
        [("dgjson/base", "1", images["base"], pushed["bytes_sent"])]
