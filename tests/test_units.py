"""Pure behaviour of dogestry's building blocks: references, keys, compression, tar streams."""

import ctypes
import gzip
import hashlib
import importlib.util
import io
import json
import mmap
import os
import random
import shutil
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

import dogestry
from conftest import skip_or_fail
from realdocker import tar_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, name, tag", [
    ("hipache", "hipache", "latest"),
    ("hipache:v1.2", "hipache", "v1.2"),
    ("docker-repo/hipache:latest", "docker-repo/hipache", "latest"),
    ("localhost:5000/team/app", "localhost:5000/team/app", "latest"),
    ("opsgoodies.com/docker-repo/hipache:20131210", "opsgoodies.com/docker-repo/hipache", "20131210"),
    ("a__b.c-d:T_1", "a__b.c-d", "T_1"),
])
def test_references_parse_like_docker(text, name, tag):
    assert dogestry.parse_image_ref(text) == (name, tag)


@pytest.mark.parametrize("text", ["", "UPPER", "../x", "a/../b", "/abs", "a//b", "a:", "a:-bad", "a@sha256:00",
                                  "x" * 256, "a:" + "t" * 129, ".hidden", "a/.b"])
def test_bad_references_are_usage_errors(text):
    with pytest.raises(dogestry.UsageError):
        dogestry.parse_image_ref(text)


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a/b/", "a\x00b"])
def test_store_keys_cannot_escape(key, tmp_path):
    store = dogestry.LocalStore(str(tmp_path))
    with pytest.raises(dogestry.StoreError):
        store.put_bytes(key, b"x")


def test_local_store_put_is_atomic_and_lists_sorted(tmp_path):
    store = dogestry.LocalStore(str(tmp_path / "s"))
    store.ensure()
    store.put_bytes("b/2", b"two")
    store.put_bytes("a/1", b"one")
    assert list(store.list("")) == ["a/1", "b/2"]
    assert list(store.list("b/")) == ["b/2"]
    assert store.stat("a/1") == 3 and store.stat("a/9") is None
    (tmp_path / "short").write_bytes(b"short")
    with pytest.raises(dogestry.StoreError):
        store.put_file("c/3", str(tmp_path / "short"), 10)   # fewer bytes than promised
    assert store.stat("c/3") is None
    assert not [p for p in (tmp_path / "s").rglob(".tmp-*")]
    store.delete("a/1")
    assert not (tmp_path / "s" / "a").exists()


def test_chain_ids_follow_docker():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    chain = dogestry.chain_ids([a, b])
    assert chain[0] == a
    assert chain[1] == "sha256:" + hashlib.sha256((a + " " + b).encode()).hexdigest()


def test_spooling_compresses_in_parallel_members_that_form_one_stream(tmp_path):
    data = b"text " * 4000000 + os.urandom(1 << 20)
    store = dogestry.LocalStore(str(tmp_path / "store"))
    quiet = dogestry.Progress(io.StringIO(), quiet=True)
    options = dogestry.PushOptions(workers=2, chunked=False)  # a layer stored whole (not as chunks)
    pipeline = dogestry.LayerPipeline(store, str(tmp_path), quiet, options)
    try:
        spool = pipeline.spool(dogestry.MemberReader(io.BytesIO(data), len(data)), len(data), "x", True)
    finally:
        pipeline.close()
    packed = Path(spool.path).read_bytes()
    assert spool.compression == "gzip" and gzip.decompress(packed) == data
    assert spool.size == len(packed) and spool.digest == "sha256:" + hashlib.sha256(packed).hexdigest()
    assert spool.raw_digest == "sha256:" + hashlib.sha256(data).hexdigest() and spool.raw_size == len(data)
    assert packed.count(b"\x1f\x8b\x08") >= 2  # several members


def test_incompressible_layers_are_spooled_raw(tmp_path):
    data = os.urandom(5 << 20)
    quiet = dogestry.Progress(io.StringIO(), quiet=True)
    pipeline = dogestry.LayerPipeline(dogestry.LocalStore(str(tmp_path)), str(tmp_path), quiet, dogestry.PushOptions())
    try:
        spool = pipeline.spool(dogestry.MemberReader(io.BytesIO(data), len(data)), len(data), "x", True)
    finally:
        pipeline.close()
    assert spool.compression == "none" and Path(spool.path).read_bytes() == data


def test_compressibility_is_judged_from_a_sample():
    assert dogestry.compressed_sample(b"hello world " * 100000) is not None
    assert dogestry.compressed_sample(os.urandom(1 << 20)) is None
    assert dogestry.compressed_sample(gzip.compress(os.urandom(1 << 20))) is None


def test_tar_reader_handles_long_names_and_pax_headers():
    def member(name, data, fmt):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info.tobuf(fmt) + data + b"\0" * (-len(data) % 512)

    long_name = "d/" + "x" * 150 + "/layer.tar"
    stream = io.BytesIO(member(long_name, b"abc", tarfile.GNU_FORMAT)
                        + member("p/" + "ü" * 120, b"hi", tarfile.PAX_FORMAT) + b"\0" * 1024)
    seen = [(e.name, r.read()) for e, r in dogestry.iter_tar(stream)]
    assert seen == [(long_name, b"abc"), ("p/" + "ü" * 120, b"hi")]


def _tar(members):
    """A tar (bytes) of [(name, bytes, or a link target as str)]."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_only_the_members_an_image_is_made_of_are_kept_from_a_save_stream():
    """Documents, configs, layers (and links to them) are kept; VERSION, v1 json, repositories,
    oci-layout and the like are skipped unread."""
    v1, other = "a" * 64, "b" * 64
    stream = _tar([(v1 + "/VERSION", b"1.0"), (v1 + "/json", b"{}"), (v1 + "/layer.tar", b"layer"),
                   (other + "/layer.tar", "../%s/layer.tar" % v1), (other + "/json", "../%s/json" % v1),
                   ("c" * 64 + ".json", b"{}"), ("blobs/sha256/" + "d" * 64, b"blob"), ("e" * 64 + ".tar.gz", b"gz"),
                   ("repositories", b"{}"), ("oci-layout", b"{}"), ("README", b"hi"), ("index.json", b"{}"),
                   ("manifest.json", b"[]")])
    contents = dogestry.read_save_stream(io.BytesIO(stream), lambda entry, reader: None)
    assert sorted(contents.small) == sorted([v1 + "/layer.tar", "c" * 64 + ".json", "blobs/sha256/" + "d" * 64,
                                             "e" * 64 + ".tar.gz", "index.json", "manifest.json"])
    assert contents.links == {other + "/layer.tar": "../%s/layer.tar" % v1}


def test_what_a_save_stream_holds_in_memory_counts_names_and_links_too(monkeypatch):
    """Links with long names, no data: still refused once they hold more than SMALL_MEMBERS_LIMIT."""
    monkeypatch.setattr(dogestry, "SMALL_MEMBERS_LIMIT", 256 << 10)
    links = [("l%03d/%s.tar" % (i, "x" * 1000), "y" * 1000) for i in range(150)]
    contents = dogestry.read_save_stream(io.BytesIO(_tar(links[:50])), lambda entry, reader: None)
    assert len(contents.links) == 50
    with pytest.raises(dogestry.FormatError, match="holds more than 262.1kB of documents and names"):
        dogestry.read_save_stream(io.BytesIO(_tar(links)), lambda entry, reader: None)


def test_truncated_tar_is_a_format_error():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a/layer.tar")
        info.size = 10000
        tar.addfile(info, io.BytesIO(b"x" * 10000))
    cut = io.BytesIO(buf.getvalue()[:5000])
    with pytest.raises(dogestry.FormatError):
        for entry, reader in dogestry.iter_tar(cut):
            reader.read()


@pytest.mark.parametrize("url, expect", [
    ("unix:///run/d.sock", ("/run/d.sock", None, None)),
    ("tcp://10.0.0.1:2375", (None, "10.0.0.1", 2375)),
    ("tcp://host", (None, "host", 2375)),
])
def test_docker_host_urls(url, expect):
    endpoint = dogestry.docker_endpoint(url, {}, "/nonexistent")
    assert (endpoint.unix_path, endpoint.host, endpoint.port) == expect


def test_docker_host_default_is_the_socket():
    assert dogestry.docker_endpoint(None, {}, "/x").unix_path == "/var/run/docker.sock"
    assert dogestry.docker_endpoint(None, {"DOCKER_HOST": "tcp://h:1"}, "/x").host == "h"


def test_tls_port_defaults_to_2376(tmp_path):
    endpoint = dogestry.docker_endpoint("tcp://h", {"DOCKER_TLS": "1"}, str(tmp_path))
    assert endpoint.port == 2376 and endpoint.tls is not None


def _record(store, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.put_bytes(dogestry.blob_key(digest), data)
    return dogestry.LayerRecord("sha256:" + "0" * 64, digest, len(data), "none")


def test_verified_stream_withholds_the_tail_of_a_corrupt_blob(tmp_path):
    store = dogestry.LocalStore(str(tmp_path))
    good = os.urandom(3 * dogestry.CHUNK + 10)
    record = _record(store, good)
    assert b"".join(dogestry.verified_blob_chunks(store, record, lambda n: None)) == good

    bad = bytearray(good)
    bad[-1] ^= 1
    (tmp_path / "blobs" / "sha256" / record.digest[7:]).write_bytes(bytes(bad))
    sent = []
    with pytest.raises(dogestry.IntegrityError):
        for chunk in dogestry.verified_blob_chunks(store, record, lambda n: None):
            sent.append(chunk)
    assert len(b"".join(sent)) < len(good)  # the receiver sees a truncated member


def test_load_tar_is_a_valid_tar_with_only_missing_layers(tmp_path):
    store = dogestry.LocalStore(str(tmp_path))
    layers = []
    for i in range(3):
        data = b"layer %d" % i
        rec = _record(store, data)
        layers.append(rec._replace(diff_id="sha256:%064x" % i))
    config = b'{"rootfs":{}}'
    image = dogestry.StoredImage("sha256:" + hashlib.sha256(config).hexdigest(), layers, [])
    quiet = dogestry.Progress(io.StringIO(), quiet=True)
    data = b"".join(dogestry.load_tar_stream(store, image, config, ["a:b"], {2}, quiet))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        manifest = tar.extractfile("manifest.json").read()
    assert names == [image.image_id[7:] + ".json", "%064x/layer.tar" % 2, "manifest.json"]
    assert b'"RepoTags": ["a:b"]' in manifest


def test_main_turns_errors_into_one_line(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert dogestry.main(["list", str(tmp_path / "nope")], environ={}, stdout=out, stderr=err) == 1
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("dogestry: error:")


def test_version_flag_and_command(tmp_path):
    out = io.StringIO()
    assert dogestry.main(["-version"], environ={}, stdout=out, stderr=io.StringIO()) == 0
    assert dogestry.__version__ in out.getvalue()
    out = io.StringIO()
    assert dogestry.main(["version"], environ={}, stdout=out, stderr=io.StringIO()) == 0
    assert dogestry.__version__ in out.getvalue()


def test_help_for_a_command():
    out = io.StringIO()
    assert dogestry.main(["help", "push"], environ={}, stdout=out, stderr=io.StringIO()) == 0
    assert "push STORE IMAGE" in out.getvalue()


def test_original_single_dash_and_long_options_both_parse():
    parser = dogestry.build_parser()
    a = parser.parse_args(["-tempdir", "/x", "push", "s", "i"])
    b = parser.parse_args(["--tempdir=/x", "push", "s", "i"])
    assert a.tempdir == b.tempdir == "/x"


def test_zipapp_builds_reproducibly_and_runs(tmp_path):
    one, two = tmp_path / "one.pyz", tmp_path / "two.pyz"
    subprocess.run(["sh", str(ROOT / "zipapp.sh"), str(one)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["sh", str(ROOT / "zipapp.sh"), str(two)], check=True, stdout=subprocess.DEVNULL)
    assert one.read_bytes() == two.read_bytes()
    assert os.access(str(one), os.X_OK)
    proc = subprocess.run([str(one), "version"], stdout=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0 and dogestry.__version__ in proc.stdout
    with zipfile.ZipFile(str(one)) as z:  # compiled once, at build time, not at every start
        assert sorted(z.namelist()) == ["__main__.py", "dogestry.py", "dogestry.pyc"]
        pyc = z.read("dogestry.pyc")
    assert pyc[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(pyc[4:8], "little") & 1  # hash-based
    python38 = _python38()
    if python38 is None:
        skip_or_fail("no Python 3.8 on this machine (looked on PATH and in ~/.pyenv/versions)")
    older = subprocess.run([python38, str(one), "version"], stdout=subprocess.PIPE, universal_newlines=True)
    assert older.returncode == 0 and "Python 3.8" in older.stdout  # another Python falls back to the source


def test_launcher_runs_the_module():
    proc = subprocess.run([str(ROOT / "dogestry"), "version"], stdout=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0 and dogestry.__version__ in proc.stdout


def _python38():
    """A real Python 3.8: on PATH, or under ~/.pyenv/versions (these machines carry one there)."""
    found = shutil.which("python3.8")
    candidates = [found] if found else []
    candidates += [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.8*/bin/python3.8"))]
    for c in candidates:
        proc = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2])"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, universal_newlines=True, env=dict(os.environ, PYENV_VERSION=""))
        if proc.returncode == 0 and proc.stdout.strip() == "(3, 8)":
            return c
    return None


def test_source_parses_as_python_3_8():
    import ast
    ast.parse((ROOT / "dogestry.py").read_text(), feature_version=(3, 8))


def test_runs_on_python_3_8(tmp_path):
    """The real 3.8 runs the program: help, a store listed, an error reported (no silent fallback)."""
    python = _python38()
    if python is None:
        skip_or_fail("no Python 3.8 on this machine (looked on PATH and in ~/.pyenv/versions)")
    store = tmp_path / "store"
    (store / "repositories" / "app").mkdir(parents=True)
    (store / "repositories" / "app" / "1").write_text("ab" * 32)
    runs = {args: subprocess.run([python, str(ROOT / "dogestry.py")] + list(args), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, universal_newlines=True)
            for args in (("help",), ("list", str(store)), ("pull", str(store), "app:1"))}
    assert runs[("help",)].returncode == 0 and "push" in runs[("help",)].stdout, runs[("help",)].stderr
    assert runs[("list", str(store))].stdout.split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "app", "1", "ab" * 6]
    failed = runs[("pull", str(store), "app:1")]
    assert failed.returncode == 1 and failed.stderr.startswith("dogestry: error:"), failed.stderr


@pytest.mark.parametrize("url, environ, expect", [
    ("s3://ops-goodies/repo/", {}, ("https", "ops-goodies.s3.us-east-1.amazonaws.com", 443, "")),
    ("s3://ops-goodies/?region=eu-west-1", {}, ("https", "ops-goodies.s3.eu-west-1.amazonaws.com", 443, "")),
    ("s3://my.dotted.bucket/", {"AWS_REGION": "us-west-2"}, ("https", "s3.us-west-2.amazonaws.com", 443, "/my.dotted.bucket")),
    ("s3://bkt/?endpoint=http://127.0.0.1:7480", {}, ("http", "127.0.0.1", 7480, "/bkt")),
    ("s3://bkt/", {"AWS_ENDPOINT_URL": "https://minio.local"}, ("https", "minio.local", 443, "/bkt")),
    ("s3://bkt/", {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"}, ("http", "b", 2, "/bkt")),
])
def test_s3_addressing_virtual_host_on_aws_path_style_elsewhere(url, environ, expect):
    config = dogestry.AwsConfig(environ, "/nonexistent")
    client = dogestry.S3Client(dogestry.parse_s3_url(url), dogestry.CredentialChain(config), config)
    assert client._target() == expect


def test_help_is_printed_once_to_the_given_stdout():
    for argv in (["-h"], ["--help"], ["push", "-h"]):
        out, err = io.StringIO(), io.StringIO()
        assert dogestry.main(argv, environ={}, stdout=out, stderr=err) == 0
        assert out.getvalue().count("usage: dogestry") == 1 and err.getvalue() == "", (argv, out.getvalue())


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz"])
def test_archives_compressed_as_a_whole_unpack_in_bounded_pieces(kind):
    """An archive compressed as a whole (in two concatenated members or streams, as `cat a.gz
    b.gz` makes) reads back whole, in pieces of at most 1 MiB however well it compresses."""
    import bz2
    import lzma
    compress = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}[kind]
    data = b"\0" * (8 << 20) + os.urandom(1000)
    packed = compress(data[:5 << 20]) + compress(data[5 << 20:])
    stream = dogestry.archive_tar(io.BytesIO(packed))
    first = stream.read(10)
    assert len(stream.buffer) <= dogestry.CHUNK  # not the 5 MiB of zeros the first member holds
    assert first + stream.read() == data


def test_a_truncated_or_zstd_archive_is_one_clear_error(monkeypatch):
    cut = gzip.compress(b"x" * 100000)[:-20]
    with pytest.raises(dogestry.FormatError, match="truncated"):
        dogestry.archive_tar(io.BytesIO(cut)).read(1 << 20)
    monkeypatch.setitem(__import__("sys").modules, "compression.zstd", None)  # as before Python 3.14
    monkeypatch.setitem(__import__("sys").modules, "compression", None)
    with pytest.raises(dogestry.UsageError, match="zstd -dc"):
        dogestry.archive_tar(io.BytesIO(b"\x28\xb5\x2f\xfd" + b"\0" * 20))


def _blob(files, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    files.append(("blobs/sha256/" + digest[7:], data))
    return {"digest": digest, "size": len(data)}


def _oci_image(files, arch, payload):
    """One image of a (buildx-like) OCI layout: a gzip layer, its config, its manifest; the manifest's descriptor."""
    import json
    raw = tar_bytes({"arch.txt": payload})
    config = json.dumps({"architecture": arch, "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": dict(_blob(files, config), mediaType="application/vnd.oci.image.config.v1+json"),
                           "layers": [dict(_blob(files, gzip.compress(raw)),
                                           mediaType="application/vnd.oci.image.layer.v1.tar+gzip")]}).encode()
    return dict(_blob(files, manifest), mediaType="application/vnd.oci.image.manifest.v1+json"), \
        "sha256:" + hashlib.sha256(config).hexdigest()


def test_import_platform_takes_one_image_of_a_multi_platform_oci_archive(tmp_path):
    """An OCI layout whose index names a multi-platform index (as `buildx --output type=oci` writes,
    attestation manifests included): import --platform stores the image for that platform alone,
    its tag (named by io.containerd.image.name) naming that image."""
    import json
    files = []
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    other = "s390x" if arch != "s390x" else "amd64"
    mine, mine_id = _oci_image(files, arch, b"this machine")
    theirs, _ = _oci_image(files, other, b"another machine")
    attestation, _ = _oci_image(files, "unknown", b"in-toto")
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        dict(theirs, platform={"os": "linux", "architecture": other}),
        dict(mine, platform={"os": "linux", "architecture": arch}),
        dict(attestation, platform={"os": "unknown", "architecture": "unknown"},
             annotations={"vnd.docker.reference.type": "attestation-manifest"})]}).encode()
    top = dict(_blob(files, nested), mediaType="application/vnd.oci.image.index.v1+json",
               annotations={"io.containerd.image.name": "docker.io/library/multi:1",
                            "org.opencontainers.image.ref.name": "1"})
    files += [("index.json", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()),
              ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    archive = tmp_path / "multi.tar"
    with tarfile.open(str(archive), "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = io.StringIO()

    code = dogestry.main(["-q", "import", "--platform", "linux/" + arch, str(tmp_path / "store"), str(archive)],
                         environ={}, stdout=out, stderr=io.StringIO())

    assert code == 0 and out.getvalue() == "Imported image: multi:1\n"
    assert (tmp_path / "store" / "repositories" / "multi" / "1").read_text() == mine_id[7:]
    assert sorted(p.name for p in (tmp_path / "store" / "images").iterdir()) == [mine_id[7:]]


# --- reading a stream ahead, writing a store file through to disk --------------------------------

class Trickle:
    """A source that answers each read with a few bytes fewer than asked, then maybe fails."""

    def __init__(self, data, fail_after=None):
        self.data, self.pos, self.fail_after = data, 0, fail_after
        self.closed = threading.Event()

    def read(self, n):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        stop = self.pos + max(1, n - 7)
        if self.fail_after is not None:
            stop = min(stop, self.fail_after)
        chunk = self.data[self.pos:stop]
        self.pos += len(chunk)
        return chunk

    def close(self):
        self.closed.set()


def test_read_ahead_gives_the_bytes_in_order_whatever_the_read_sizes():
    data = os.urandom(5 * dogestry.CHUNK + 12345)
    stream = dogestry.ReadAhead(Trickle(data))
    got, sizes = [], [512, 1, dogestry.CHUNK * 2, 3, 0, dogestry.CHUNK - 1, 10 ** 9]
    for n in sizes:
        got.append(stream.read(n))
    assert [len(g) for g in got[:-1]] == sizes[:-1]  # exactly what was asked, until the end
    assert b"".join(got) == data
    assert stream.read(100) == b"" and stream.read() == b""


def test_read_ahead_raises_the_streams_error_where_it_broke_and_closes_it():
    source = Trickle(os.urandom(3 * dogestry.CHUNK), fail_after=2 * dogestry.CHUNK + 100)
    stream = dogestry.ReadAhead(source)
    assert len(stream.read(2 * dogestry.CHUNK + 100)) == 2 * dogestry.CHUNK + 100
    with pytest.raises(ConnectionResetError):
        stream.read(1)
    with pytest.raises(ConnectionResetError):  # and again: the stream stays broken
        stream.read(1)
    assert source.closed.wait(10)


def test_closing_a_read_ahead_stops_its_thread_and_closes_the_stream():
    source = Trickle(os.urandom(64 * dogestry.CHUNK))  # more than it reads ahead: its thread waits on a full queue
    stream = dogestry.ReadAhead(source)
    stream.read(10)
    stream.close()
    assert source.closed.wait(10)
    assert source.pos < 32 * dogestry.CHUNK  # it stopped reading, not ran to the end


def resident_bytes(path):
    """How many bytes of a file are in the page cache now (mincore(2) over a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = os.path.getsize(path), mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = ctypes.create_string_buffer((size + page - 1) // page)
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) * page


def write_blob(path, write_through):
    """Write 8 windows' worth to PATH with OutputFile; return the size written."""
    piece = os.urandom(dogestry.CHUNK)
    total = 8 * dogestry.WRITE_THROUGH_WINDOW
    with dogestry.OutputFile(path, write_through) as out:
        for _ in range(total // len(piece)):
            out.write(piece)
    with open(path, "rb") as f:
        assert f.read(len(piece)) == piece and os.fstat(f.fileno()).st_size == total
    return total


def test_a_file_bound_for_a_directory_store_leaves_the_page_cache_as_it_is_written(tmp_path):
    """Such a file is fsynced anyway: its pages go to disk every WRITE_THROUGH_WINDOW bytes and
    are dropped, so a big push neither floods the page cache nor leaves the last fsync much to do."""
    write_blob(str(tmp_path / "blob"), write_through=True)
    assert resident_bytes(str(tmp_path / "blob")) <= dogestry.WRITE_THROUGH_WINDOW + dogestry.CHUNK


def test_other_files_stay_in_the_page_cache(tmp_path):
    """The control of the test above (so it can fail): spools read back, for S3, stay cached."""
    total = write_blob(str(tmp_path / "blob"), write_through=False)
    assert resident_bytes(str(tmp_path / "blob")) > total // 2


def _layers(*sizes):
    return dogestry.StoredImage("sha256:" + "0" * 64, [
        dogestry.LayerRecord("sha256:%064x" % i, "sha256:%064x" % (100 + i), size, "none") for i, size in enumerate(sizes)],
        [])


@pytest.mark.parametrize("sizes,missing,least,batches", [
    ((5, 5, 5), {0, 1, 2}, 0, [[0, 1, 2]]),            # 0: one load
    ((5, 5, 5), {0, 1, 2}, 5, [[0], [1], [2]]),
    ((3, 3, 3, 3), {0, 1, 2, 3}, 5, [[0, 1], [2, 3]]),
    ((5, 5, 1), {0, 1, 2}, 5, [[0], [1, 2]]),          # a small tail rides with the batch before it
    ((9, 1), {0, 1}, 5, [[0, 1]]),
    ((5, 5, 5, 5), {2, 3}, 5, [[2], [3]]),              # only what the engine lacks
    ((5,), set(), 5, []),
])
def test_layers_go_in_batches_of_at_least_the_batch_size(sizes, missing, least, batches):
    assert dogestry.load_batches(_layers(*sizes), missing, least) == batches


def test_a_partial_image_config_keeps_the_first_layers_and_is_labelled_for_one_pull():
    A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    config = json.dumps({"architecture": "amd64", "os": "linux", "history": [{"created_by": "COPY a /"}] * 3,
                         "config": {"Labels": {"app": "x"}},
                         "rootfs": {"type": "layers", "diff_ids": [A, B, "sha256:" + "c" * 64]}}).encode()
    partial = json.loads(dogestry.partial_config(config, 2, "n1"))
    assert partial["rootfs"] == {"type": "layers", "diff_ids": [A, B]}
    assert partial["history"] == [] and partial["os"] == "linux" and partial["architecture"] == "amd64"
    assert partial["config"]["Labels"] == {"app": "x", "org.dogestry.partial": "n1",
                                           "org.dogestry.partial.for": "sha256:" + hashlib.sha256(config).hexdigest()}
    assert dogestry.partial_config(config, 2, "n2") != dogestry.partial_config(config, 2, "n1")
    with pytest.raises(dogestry.FormatError):
        dogestry.partial_config(b'{"rootfs": []}', 1, "n1")


def test_the_containerd_image_store_is_told_from_dockers_own_by_its_driver_type():
    # `docker info` with the containerd image store shows "driver-type: io.containerd.snapshotter.v1"
    assert dogestry.uses_containerd_store({"Driver": "overlayfs",
                                           "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]]})
    assert not dogestry.uses_containerd_store({"Driver": "vfs", "DriverStatus": []})
    assert not dogestry.uses_containerd_store({"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "extfs"]]})
    assert not dogestry.uses_containerd_store({"DriverStatus": None})


def test_each_chunk_is_gzipped_only_if_a_sample_of_it_compresses(tmp_path):
    """A chunked layer whose first file is random data still gzips its text files' chunks (the
    decision is each chunk's, not the layer's first bytes'), and stores random chunks as they are."""
    noise = random.Random(5).getrandbits(8 * (8 << 20)).to_bytes(8 << 20, "little")
    text = b"".join(b"line %d of a log that compresses well\n" % i for i in range(400000))[:12 << 20]
    layer = tar_bytes({"a/noise.bin": noise, "b/log.txt": text})
    store = dogestry.LocalStore(str(tmp_path / "store"))
    quiet = dogestry.Progress(io.StringIO(), quiet=True)
    pipeline = dogestry.LayerPipeline(store, str(tmp_path), quiet, dogestry.PushOptions(workers=2))
    try:
        spool = pipeline.spool(dogestry.MemberReader(io.BytesIO(layer), len(layer)), len(layer), "x", True)
    finally:
        pipeline.close()
    assert spool.compression == "chunked"
    objects = [p.read_bytes() for p in (tmp_path / "store" / "chunks" / "sha256").iterdir()]
    packed = [o for o in objects if o[:2] == b"\x1f\x8b"]
    assert packed and len(packed) < len(objects)
    assert sum(len(o) for o in packed) < len(text) // 4  # the text went gzipped
    assert sum(len(o) for o in objects if o[:2] != b"\x1f\x8b") >= len(noise)  # the noise as it is


def test_a_chunked_layer_of_many_small_files_reads_back_byte_for_byte(tmp_path):
    """Thousands of small files (headers every few hundred bytes), a big file and an empty one:
    the recipe and chunks a push stores make the very tar again, and the recipe holds only metadata."""
    rng = random.Random(9)
    files = {"etc/f%04d" % i: b"x" * rng.randint(0, 900) for i in range(6000)}
    files["big/blob"] = rng.getrandbits(8 * (20 << 20)).to_bytes(20 << 20, "little")
    files["empty"] = b""
    layer = tar_bytes(files)
    store = dogestry.LocalStore(str(tmp_path / "store"))
    quiet = dogestry.Progress(io.StringIO(), quiet=True)
    pipeline = dogestry.LayerPipeline(store, str(tmp_path), quiet, dogestry.PushOptions(workers=2))
    stream, reads = io.BytesIO(layer), []
    counted = type("Counted", (), {"read": lambda self, n=-1: reads.append(n) or stream.read(n)})()
    try:
        spool = pipeline.spool(dogestry.MemberReader(counted, len(layer)), len(layer), "x", True)
        pipeline.upload(spool.raw_digest, spool)
        records = pipeline.finish()
    finally:
        pipeline.close()
    record = records[spool.raw_digest]
    assert record.chunked and record.diff_id == "sha256:" + hashlib.sha256(layer).hexdigest()
    assert b"".join(dogestry.layer_tar_chunks(store, record, lambda n: None)) == layer
    recipe = dogestry.read_recipe(store, record)
    assert recipe.metadata_size < 6002 * 512 * 3 and sum(size for _, size in recipe.chunks) >= 20 << 20
    assert len(reads) < len(layer) // (1 << 20) + 8  # read in pieces of 1 MiB, not a read per tar header


def chunk_keys_of(layer, stream, workdir):
    """The chunk keys (in recipe order) a push of layer read from stream stores."""
    workdir.mkdir()
    store = dogestry.LocalStore(str(workdir / "store"))
    quiet = dogestry.Progress(io.StringIO(), quiet=True)
    pipeline = dogestry.LayerPipeline(store, str(workdir), quiet, dogestry.PushOptions(workers=2))
    try:
        spool = pipeline.spool(dogestry.MemberReader(stream, len(layer)), len(layer), "x", True)
        pipeline.upload(spool.raw_digest, spool)
        record = pipeline.finish()[spool.raw_digest]
    finally:
        pipeline.close()
    assert b"".join(dogestry.layer_tar_chunks(store, record, lambda n: None)) == layer
    return [chunk for chunk, _ in dogestry.read_recipe(store, record).chunks]


def test_a_layers_chunks_do_not_depend_on_how_its_stream_arrives(tmp_path):
    """The engine's stream arrives in pieces of any size (a socket gives what came): read whole or
    in odd short pieces, a layer of text, JSON and random files cuts into the very same chunks."""
    rng = random.Random(11)
    files = {"doc/big.txt": b"".join(b"%d some words, a line of text %x\n" % (i, rng.getrandbits(32))
                                     for i in range(300000)),
             "data/big.json": json.dumps([{"id": i, "name": "n%d" % rng.getrandbits(40)} for i in range(150000)]).encode(),
             "bin/blob": rng.getrandbits(8 * (9 << 20)).to_bytes(9 << 20, "little")}
    files.update(("small/f%03d" % i, rng.getrandbits(8 * 3000).to_bytes(3000, "little")) for i in range(300))
    layer = tar_bytes(files)
    whole = chunk_keys_of(layer, io.BytesIO(layer), tmp_path / "whole")
    source, sizes = io.BytesIO(layer), random.Random(3)
    dribble = type("Dribble", (), {"read": lambda self, n=-1: source.read(min(n, sizes.choice((1, 511, 4097, 65536))))})()
    assert len(whole) >= 8
    assert chunk_keys_of(layer, dribble, tmp_path / "dribbled") == whole


def test_copy_orders_a_chain_of_nested_indexes_deeper_than_pythons_stack(tmp_path):
    """A store a hostile writer filled with 3,000 indexes each naming the one before: copy's walk
    lists them children first, no RecursionError (it used to place them recursively)."""
    store = dogestry.LocalStore(str(tmp_path / "store"))
    below = []
    for n in range(3000):
        data = json.dumps({"schemaVersion": 2, "mediaType": dogestry.OCI_INDEX, "manifests": below,
                           "annotations": {"n": str(n)}}).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        store.put_bytes(dogestry.manifest_key(digest), data)
        below = [{"mediaType": dogestry.OCI_INDEX, "digest": digest, "size": len(data)}]
    reached = dogestry.manifests_reached(store, [digest], [], dogestry.ReferrerLister(store))
    assert len(reached) == 3000 and reached[-1].digest == digest
    assert [m.doc["annotations"]["n"] for m in reached[:3]] == ["0", "1", "2"]
