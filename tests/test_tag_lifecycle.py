"""Tags over their life: rm of a protected tag is refused (--force removes the tag and its
protection, so a tag pushed again later under that name is not protected without anyone asking);
unprotect of a tag that never was says so; an immutable tag (protect --immutable) is one no push,
import, copy or migrate moves to another image; prune --keep-last orders tags by their push times as
precisely as the store keeps them, and keeps tags whose times tie with the oldest one it keeps."""

import os
import time
import uuid
from pathlib import Path

import pytest

from realdocker import build_image, docker_cli, ok, one_error_line, run_dogestry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(docker_host):
    """Two small images: dgtag/one:1 and dgtag/two:1."""
    token = uuid.uuid4().hex[:8]
    return {name: build_image(docker_host, "dgtag/%s:1" % name, [{"etc/%s" % name: (name + token).encode()}])
            for name in ("one", "two")}


def push(env, store, image, *tags):
    """Tag IMAGE as each of TAGS and push them all in one command."""
    for tag in tags:
        docker_cli(env["DOCKER_HOST"], "tag", image, tag)
    return ok(run_dogestry("push", store, *tags, env=env))


def tags_of(env, store, name):
    listing = ok(run_dogestry("list", store, env=env)).stdout.splitlines()[1:]
    return sorted(line.split()[1] for line in listing if line.split()[0] == name)


def protected(store):
    root = Path(store) / "gc" / "protected"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- rm, protect, unprotect ------------------------------------------------------------------------

def test_rm_of_a_protected_tag_is_refused_and_deletes_nothing(images, docker_env, tmp_path):
    store = tmp_path / "store"
    push(docker_env, store, images["one"], "dgtag/app:prod", "dgtag/app:old")
    ok(run_dogestry("protect", store, "dgtag/app:prod", env=docker_env))

    proc = run_dogestry("rm", store, "dgtag/app:old", "dgtag/app:prod", env=docker_env)

    one_error_line(proc, "dgtag/app:prod is protected", "--force", "nothing was deleted")
    assert tags_of(docker_env, store, "dgtag/app") == ["old", "prod"]
    assert protected(store) == ["dgtag/app/prod"]


def test_rm_force_deletes_a_protected_tag_and_its_protection(images, docker_env, tmp_path):
    store = tmp_path / "store"
    push(docker_env, store, images["one"], "dgtag/app:prod")
    ok(run_dogestry("protect", store, "dgtag/app:prod", env=docker_env))

    proc = ok(run_dogestry("rm", "--force", store, "dgtag/app:prod", env=docker_env))

    assert "deleted dgtag/app:prod (%s) and its protection" % images["one"][7:19] in proc.stderr
    assert tags_of(docker_env, store, "dgtag/app") == [] and protected(store) == []
    push(docker_env, store, images["two"], "dgtag/app:prod")  # the name again, for another image
    ok(run_dogestry("prune", store, "--keep-last", "0", env=docker_env))
    assert tags_of(docker_env, store, "dgtag/app") == []  # not protected: nobody asked for it


def test_rm_of_an_image_id_with_a_protected_tag_needs_force_and_then_takes_every_protection(images, docker_env,
                                                                                          tmp_path):
    store = tmp_path / "store"
    push(docker_env, store, images["one"], "dgtag/app:1", "dgtag/app:2", "dgtag/app:3")
    push(docker_env, store, images["two"], "dgtag/app:other")
    ok(run_dogestry("protect", store, "dgtag/app:2", "dgtag/app:3", "dgtag/app:other", env=docker_env))

    refused = run_dogestry("rm", store, images["one"][7:19], env=docker_env)
    one_error_line(refused, "dgtag/app:2, dgtag/app:3 are protected", "--force")
    assert tags_of(docker_env, store, "dgtag/app") == ["1", "2", "3", "other"]

    ok(run_dogestry("rm", store, images["one"][7:19], "--force", env=docker_env))
    assert tags_of(docker_env, store, "dgtag/app") == ["other"]
    assert protected(store) == ["dgtag/app/other"]


def test_unprotect_of_a_tag_that_never_was_protected_says_so(images, docker_env, tmp_path):
    store = tmp_path / "store"
    push(docker_env, store, images["one"], "dgtag/app:1")

    proc = ok(run_dogestry("unprotect", store, "dgtag/app:1", env=docker_env))

    assert "dgtag/app:1 was not protected in %s" % store in proc.stderr and "unprotected" not in proc.stderr
    ok(run_dogestry("protect", store, "dgtag/app:1", env=docker_env))
    again = ok(run_dogestry("protect", store, "dgtag/app:1", env=docker_env))
    assert "dgtag/app:1 was already protected" in again.stderr
    assert "unprotected dgtag/app:1" in ok(run_dogestry("unprotect", store, "dgtag/app:1", env=docker_env)).stderr


# --- immutable tags ---------------------------------------------------------------------------------

def tag_names(store, ref):
    """The content of REF's tag in a directory STORE."""
    name, tag = ref.split(":")
    return Path(store, "repositories", name, tag).read_text().strip()


def test_protect_immutable_writes_its_marker_and_plain_protect_keeps_an_empty_one(images, docker_env, tmp_path):
    """gc/protected/<name>/<tag> is empty for a protected tag (what older versions test for) and
    {"immutable": true} for an immutable one; a plain protect never makes an immutable tag mutable."""
    store = tmp_path / "store"
    push(docker_env, store, images["one"], "dgtag/app:1", "dgtag/app:2")
    marker = Path(store, "gc", "protected", "dgtag", "app")

    ok(run_dogestry("protect", store, "dgtag/app:1", env=docker_env))
    made = ok(run_dogestry("protect", "--immutable", store, "dgtag/app:2", env=docker_env))

    assert (marker / "1").read_bytes() == b"" and (marker / "2").read_bytes() == b'{"immutable": true}'
    assert "protected dgtag/app:2 in %s (immutable" % store in made.stderr
    kept = ok(run_dogestry("protect", store, "dgtag/app:2", env=docker_env))
    assert "dgtag/app:2 was already protected in %s (immutable)" % store in kept.stderr
    assert (marker / "2").read_bytes() == b'{"immutable": true}'
    upgraded = ok(run_dogestry("protect", store, "dgtag/app:1", "--immutable", env=docker_env))
    assert "made dgtag/app:1 immutable in %s" % store in upgraded.stderr
    assert (marker / "1").read_bytes() == b'{"immutable": true}'


def test_a_push_over_an_immutable_tag_is_refused_before_any_upload_and_the_same_image_is_fine(images, docker_env,
                                                                                               tmp_path):
    store = tmp_path / "store"
    push(docker_env, store, images["one"], "dgtag/app:prod")
    ok(run_dogestry("protect", "--immutable", store, "dgtag/app:prod", env=docker_env))

    docker_cli(docker_env["DOCKER_HOST"], "tag", images["two"], "dgtag/app:prod")
    refused = run_dogestry("push", store, "dgtag/app:prod", env=docker_env)

    one_error_line(refused, "dgtag/app:prod is immutable in %s" % store, "names %s" % images["one"][7:19],
                   "move it to %s" % images["two"][7:19], "dogestry unprotect %s dgtag/app:prod" % store)
    assert tag_names(store, "dgtag/app:prod") == images["one"][7:]
    assert not Path(store, "images", images["two"][7:]).exists()  # refused before anything was stored
    docker_cli(docker_env["DOCKER_HOST"], "tag", images["one"], "dgtag/app:prod")
    ok(run_dogestry("push", store, "dgtag/app:prod", env=docker_env))  # the same image again
    assert tag_names(store, "dgtag/app:prod") == images["one"][7:]


def test_import_and_copy_over_an_immutable_tag_are_refused_and_of_the_same_image_allowed(images, docker_env,
                                                                                          tmp_path):
    store, other = tmp_path / "store", tmp_path / "other"
    push(docker_env, store, images["one"], "dgtag/app:prod")
    push(docker_env, other, images["two"], "dgtag/app:prod")
    ok(run_dogestry("protect", "--immutable", store, "dgtag/app:prod", env=docker_env))
    archive = tmp_path / "two.tar"
    docker_cli(docker_env["DOCKER_HOST"], "save", "-o", str(archive), "dgtag/app:prod")  # names image two

    imported = run_dogestry("import", store, archive, env=docker_env)
    copied = run_dogestry("copy", other, store, "dgtag/app:prod", env=docker_env)

    for proc in (imported, copied):
        one_error_line(proc, "dgtag/app:prod is immutable", "dogestry unprotect")
    assert tag_names(store, "dgtag/app:prod") == images["one"][7:]
    assert not Path(store, "images", images["two"][7:], "manifest.json").exists()
    ok(run_dogestry("copy", store, other, "dgtag/app:prod", env=docker_env))  # other's tag is not immutable
    ok(run_dogestry("copy", other, store, "dgtag/app:prod", env=docker_env))  # now the same image
    assert tag_names(store, "dgtag/app:prod") == images["one"][7:]


def test_an_immutable_tag_is_kept_by_prune_refused_by_rm_and_moves_once_unprotected(images, docker_env, tmp_path):
    store = tmp_path / "store"
    push(docker_env, store, images["one"], "dgtag/app:prod", "dgtag/app:old")
    ok(run_dogestry("protect", "--immutable", store, "dgtag/app:prod", env=docker_env))

    ok(run_dogestry("prune", store, "--keep-last", "0", env=docker_env))
    assert tags_of(docker_env, store, "dgtag/app") == ["prod"]
    one_error_line(run_dogestry("rm", store, "dgtag/app:prod", env=docker_env), "dgtag/app:prod is protected",
                   "--force")
    assert tags_of(docker_env, store, "dgtag/app") == ["prod"]

    assert "unprotected dgtag/app:prod" in ok(run_dogestry("unprotect", store, "dgtag/app:prod",
                                                           env=docker_env)).stderr
    push(docker_env, store, images["two"], "dgtag/app:prod")
    assert tag_names(store, "dgtag/app:prod") == images["two"][7:] and protected(store) == []
    ok(run_dogestry("protect", "--immutable", store, "dgtag/app:prod", env=docker_env))
    ok(run_dogestry("rm", "--force", store, "dgtag/app:prod", env=docker_env))
    assert tags_of(docker_env, store, "dgtag/app") == [] and protected(store) == []


def test_an_immutable_tag_on_s3_refuses_a_push_of_another_image(images, s3_env, bucket):
    store = "s3://%s/immutable/" % bucket
    push(s3_env, store, images["one"], "dgtag/app:prod")
    ok(run_dogestry("protect", "--immutable", store, "dgtag/app:prod", env=s3_env))

    docker_cli(s3_env["DOCKER_HOST"], "tag", images["two"], "dgtag/app:prod")
    refused = run_dogestry("push", store, "dgtag/app:prod", env=s3_env)

    one_error_line(refused, "dgtag/app:prod is immutable in %s" % store)
    listing = ok(run_dogestry("list", store, env=s3_env)).stdout.splitlines()[1:]
    assert [line.split() for line in listing] == [["dgtag/app", "prod", images["one"][7:19]]]


def test_migrate_moves_an_immutable_tag_to_the_same_image_in_the_current_layout(docker_host, docker_env, images,
                                                                                tmp_path):
    """The tag names the image's original-layout id; migrate stores that image anew and points the
    tag at it: the same image, so an immutable tag moves."""
    from test_save_formats import original_layout
    store = tmp_path / "legacy"
    top = original_layout(docker_host, "dgtag/one:1", store, "old/1")
    ok(run_dogestry("protect", "--immutable", store, "old:1", env=docker_env))

    ok(run_dogestry("migrate", store, env=docker_env))

    assert tag_names(store, "old:1") != top
    assert Path(store, "images", tag_names(store, "old:1"), "manifest.json").exists()
    assert protected(store) == ["old/1"]


# --- prune --keep-last: push order ---------------------------------------------------------------

def set_push_time(store, ref, when_ns):
    name, tag = ref.split(":")
    path = Path(store, "repositories", name, tag)
    os.utime(str(path), ns=(when_ns, when_ns))


def test_prune_keeps_every_tag_whose_push_time_ties_with_the_oldest_kept_and_says_so(images, docker_env, tmp_path):
    """A directory store on a file system with coarse timestamps: c, d and e were written in the
    same tick.  --keep-last 2 keeps all three (any of them may be the newest) and removes a and b."""
    store = tmp_path / "store"
    push(docker_env, store, images["one"], *["dgtag/app:%s" % t for t in "abcde"])
    now = time.time_ns()
    for tag, when in zip("abcde", (now - 3 * 10**9, now - 2 * 10**9, now - 10**9, now - 10**9, now - 10**9)):
        set_push_time(store, "dgtag/app:" + tag, when)

    proc = ok(run_dogestry("prune", store, "--keep-last", "2", env=docker_env))

    assert tags_of(docker_env, store, "dgtag/app") == ["c", "d", "e"]
    assert "kept dgtag/app:e too: pushed at the same time as dgtag/app:d, the oldest of the 2 kept" in proc.stdout
    assert "removed dgtag/app:a" in proc.stdout and "removed dgtag/app:b" in proc.stdout


def test_prune_on_s3_keeps_the_tags_pushed_last_by_one_command(images, docker_env, s3_env, bucket):
    """Six tags pushed by one command, within a second or so: radosgw's listing times have
    milliseconds, and prune --keep-last 2 keeps the two pushed last, whatever their names."""
    store = "s3://%s/prune/" % bucket
    tags = ["dgtag/app:%s" % t for t in ("f", "a", "e", "b", "d", "c")]  # the push order
    push(s3_env, store, images["one"], *tags)

    proc = ok(run_dogestry("prune", store, "--keep-last", "2", env=s3_env))

    assert tags_of(s3_env, store, "dgtag/app") == ["c", "d"], proc.stdout
