"""An object a command relies on deleted under it (by a gc, or by hand): push, import, copy and
migrate fail safely, tag nothing, and say what happened in the words of the command that was run:
"<key> was deleted while this <command> relied on it (by a gc or by hand); nothing was tagged:
run the <command> again".  They blame gc's grace period only when the command really ran longer
than half of the shortest grace gc takes (before that, no gc can have reached what it uses).

A gc's delete landing between the command's refresh of what it reuses and its final check is
staged on a directory store: a watcher deletes a blob the moment the command refreshes the
layer's index entry (its mtime moves), within the second the command waits before checking."""

import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

import dogestry
from realdocker import build_image, docker_cli, ok, one_error_line, random_bytes, run_dogestry, text_bytes

pytestmark = pytest.mark.integration

HOUR = 3600
MIN_GRACE = "10"  # DOGESTRY_GC_MIN_GRACE: half of it (5 s) is longer than any of these commands runs


@pytest.fixture(scope="module")
def pushed(docker_host, tmp_path_factory):
    """A directory store holding dgdel/app:1 (two layers), and the image's `docker save` archive."""
    token = uuid.uuid4().hex[:8]
    image = build_image(docker_host, "dgdel/app:1", [{"a.bin": random_bytes(200 << 10, int(token, 16))},
                                                     {"b.txt": text_bytes(100 << 10, int(token, 16) + 1)}])
    work = tmp_path_factory.mktemp("deleted")
    store = work / "store"
    ok(run_dogestry("push", store, "dgdel/app:1", env=dict(os.environ, DOCKER_HOST=docker_host)))
    archive = work / "app.tar"
    docker_cli(docker_host, "save", "-o", archive, "dgdel/app:1")
    return store, archive, image


def layers_only(src, dst):
    """A store holding SRC's layer index entries and blobs (no image, no tag), all two hours old."""
    for part in ("layers", "blobs"):
        shutil.copytree(str(Path(src, part)), str(Path(dst, part)))
    old = time.time() - 2 * HOUR
    for path in Path(dst).rglob("*"):
        os.utime(str(path), (old, old))
    return dst


def first_layer(store, image):
    """(its index entry file, its blob file) of IMAGE's first layer in a directory store."""
    record = dogestry.load_stored_image(dogestry.LocalStore(str(store)), image[7:]).layers[0]
    return (Path(store, dogestry.layer_index_key(record.diff_id)), Path(store, dogestry.blob_key(record.digest)),
            dogestry.blob_key(record.digest))


class DeleteWhenRefreshed(threading.Thread):
    """Deletes VICTIM as soon as WATCHED's mtime moves (the command refreshing what it reuses)."""

    def __init__(self, watched, victim, timeout=120):
        super().__init__(daemon=True)
        self.watched, self.victim, self.timeout, self.deleted = watched, victim, timeout, False
        self.before = os.stat(str(watched)).st_mtime_ns
        self.start()

    def run(self):
        deadline = time.monotonic() + self.timeout
        while os.stat(str(self.watched)).st_mtime_ns == self.before and time.monotonic() < deadline:
            time.sleep(0.002)
        if time.monotonic() < deadline:
            os.unlink(str(self.victim))
            self.deleted = True


def test_copy_that_loses_a_blob_names_the_copy_and_guesses_no_grace_period(pushed, tmp_path):
    store, _, image = pushed
    dst = layers_only(store, tmp_path / "dst")
    index, blob, key = first_layer(store, image)
    watcher = DeleteWhenRefreshed(dst / index.relative_to(store), dst / blob.relative_to(store))

    proc = run_dogestry("copy", store, dst, "dgdel/app:1", env=dict(os.environ, DOGESTRY_GC_MIN_GRACE=MIN_GRACE))

    watcher.join()
    assert watcher.deleted
    line = one_error_line(proc, "%s was deleted while this copy relied on it (by a gc or by hand)" % key,
                          "nothing was tagged: run the copy again")
    assert "grace" not in line and "push" not in line
    assert not (dst / "repositories").exists()


def test_import_that_loses_a_blob_names_the_import_and_guesses_no_grace_period(pushed, tmp_path):
    store, archive, image = pushed
    dst = layers_only(store, tmp_path / "dst")
    index, blob, key = first_layer(store, image)
    watcher = DeleteWhenRefreshed(dst / index.relative_to(store), dst / blob.relative_to(store))

    proc = run_dogestry("import", dst, archive, env=dict(os.environ, DOGESTRY_GC_MIN_GRACE=MIN_GRACE))

    watcher.join()
    assert watcher.deleted
    line = one_error_line(proc, "%s was deleted while this import relied on it (by a gc or by hand)" % key,
                          "nothing was tagged: run the import again")
    assert "grace" not in line and "push" not in line
    assert not (dst / "repositories").exists()


@pytest.mark.parametrize("ran, blamed", [(2.0, False), (301.0, True)])
def test_the_grace_period_is_named_only_when_the_command_ran_longer_than_half_of_the_shortest(ran, blamed, tmp_path):
    store = dogestry.LocalStore(str(tmp_path / "store"))
    now = [1000.0]
    freshness = dogestry.Freshness(store, 600.0, clock=lambda: now[0], sleep=lambda s: None, command="migrate")
    freshness.seen("layers/gone.json", 3 * HOUR)  # old enough to need a refresh, and not there
    now[0] += ran

    with pytest.raises(dogestry.IntegrityError) as caught:
        freshness.secure({}, {})

    message = str(caught.value)
    assert "layers/gone.json was deleted while this migrate relied on it (by a gc or by hand)" in message
    assert message.endswith("nothing was tagged: run the migrate again")
    assert ("this migrate ran 301 s, longer than half of the shortest grace period gc takes, 10m" in message) == blamed
