"""`export -o PATH` writes where PATH leads without replacing what is there by something else:
a FIFO or a character device is written into as it is, a symlink is written through (its target
gets the archive; the link stays), and other non-regular files (sockets, block devices,
directories) are refused with one line.  A regular file is replaced only when the whole archive
is written (a failure leaves no file; tests/test_archives.py)."""

import io
import os
import socket
import stat
import subprocess
import tarfile

import pytest

from realdocker import build_image, ok, one_error_line, run_dogestry

pytestmark = pytest.mark.integration

REF = "dgout/app:1"


@pytest.fixture(scope="module")
def store(docker_host, tmp_path_factory):
    """A directory store holding REF."""
    build_image(docker_host, REF, [{"etc/app.conf": b"export output\n"}])
    store = tmp_path_factory.mktemp("out") / "store"
    ok(run_dogestry("push", store, REF, env=dict(os.environ, DOCKER_HOST=docker_host)))
    return store


def export(store, output):
    return run_dogestry("export", store, REF, "-o", output, timeout=120)


def archive_names(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def test_a_fifo_is_written_into_and_stays_a_fifo(store, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(str(fifo))
    received = tmp_path / "received.tar"
    with open(str(received), "wb") as sink:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=sink)
    try:
        ok(export(store, fifo))
        assert stat.S_ISFIFO(os.lstat(str(fifo)).st_mode)
        assert reader.wait(timeout=60) == 0
    finally:
        reader.kill()
        reader.wait()
    assert "manifest.json" in archive_names(received.read_bytes())


def test_a_character_device_is_written_into_and_stays_that_device(store, tmp_path):
    null = tmp_path / "null"  # a /dev/null of the test's own: 1,3
    os.mknod(str(null), stat.S_IFCHR | 0o666, os.makedev(1, 3))

    ok(export(store, null))

    st = os.lstat(str(null))
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)


def test_a_symlink_to_a_file_is_written_through_and_stays_a_link(store, tmp_path):
    target = tmp_path / "images.tar"
    target.write_bytes(b"an older archive")
    link = tmp_path / "latest.tar"
    link.symlink_to("images.tar")

    ok(export(store, link))

    assert stat.S_ISLNK(os.lstat(str(link)).st_mode) and os.readlink(str(link)) == "images.tar"
    assert "manifest.json" in archive_names(target.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.tar", "latest.tar"]  # no temp file left


def test_a_symlink_to_a_missing_file_creates_its_target_as_a_shell_redirect_would(store, tmp_path):
    (tmp_path / "archives").mkdir()
    link = tmp_path / "latest.tar"
    link.symlink_to("archives/new.tar")

    ok(export(store, link))

    assert stat.S_ISLNK(os.lstat(str(link)).st_mode) and os.readlink(str(link)) == "archives/new.tar"
    assert "manifest.json" in archive_names((tmp_path / "archives" / "new.tar").read_bytes())


def test_a_symlink_to_a_fifo_writes_into_the_fifo(store, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(str(fifo))
    link = tmp_path / "out.tar"
    link.symlink_to("pipe")
    received = tmp_path / "received.tar"
    with open(str(received), "wb") as sink:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=sink)
    try:
        ok(export(store, link))
        assert stat.S_ISLNK(os.lstat(str(link)).st_mode) and stat.S_ISFIFO(os.lstat(str(fifo)).st_mode)
        assert reader.wait(timeout=60) == 0
    finally:
        reader.kill()
        reader.wait()
    assert "manifest.json" in archive_names(received.read_bytes())


def test_a_unix_socket_is_refused_and_left_alone(store, tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))

        proc = export(store, path)

    one_error_line(proc, "cannot write %s: it is a socket" % path)
    assert stat.S_ISSOCK(os.lstat(str(path)).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sock"]


def test_a_block_device_is_refused_and_left_alone(store, tmp_path):
    disk = tmp_path / "loop"
    os.mknod(str(disk), stat.S_IFBLK | 0o600, os.makedev(7, 0))

    proc = export(store, disk)

    one_error_line(proc, "it is a block device")
    assert stat.S_ISBLK(os.lstat(str(disk)).st_mode)


def test_a_symlink_another_user_planted_in_a_shared_directory_is_not_followed(store, tmp_path):
    """As the kernel's protected_symlinks: in a sticky world-writable directory (/tmp), a link
    owned by neither the caller nor the directory's owner could point anywhere."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o1777)
    link = shared / "out.tar"
    link.symlink_to(victim)
    os.lchown(str(link), 54321, 54321)

    proc = export(store, link)

    one_error_line(proc, "symlink someone else owns")
    assert victim.read_bytes() == b"precious" and stat.S_ISLNK(os.lstat(str(link)).st_mode)
