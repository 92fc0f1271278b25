"""Broken input, file by file and header by header: every failure is one line, never a traceback,
and nothing is half-written (no tag in the store after a push, none on the engine after a pull).

  - every file of a small stored image (current layout, and the original's) truncated, replaced by
    garbage, by JSON of the wrong type, or naming a wrong digest, then pulled into the real dockerd;
  - every tar header of a real `docker save` of that image given a wrong size, name, type or
    checksum, or cut short, then pushed (the engine's save() seam hands the mutated stream over).

Runs go through dogestry.main() in this process: its exit status and stderr are what users see.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading

import pytest

import dogestry
from realdocker import build_image, client_env, docker_cli, image_id, random_bytes, text_bytes

pytestmark = pytest.mark.integration

REF = "dgfuzz/app:1"
OTHER_DIGEST = "sha256:" + hashlib.sha256(b"not this").hexdigest()


@pytest.fixture(scope="module")
def image(docker_host):
    """A two-layer image (incompressible data, compressible text) and its ID."""
    return build_image(docker_host, REF, [{"data/random.bin": random_bytes(300 << 10, 31)},
                                          {"data/words.txt": text_bytes(600 << 10, 32)}])


@pytest.fixture(scope="module")
def pristine(image, docker_host, tmp_path_factory):
    """The image pushed to a directory store (the store's files are mutated in copies of it)."""
    store = tmp_path_factory.mktemp("fuzz") / "store"
    code, out, err = run(docker_host, "push", store, REF)
    assert code == 0, err
    return store


@pytest.fixture
def on_host(image, pristine, docker_host):
    """REF is on the engine (tests before may have removed it): pulled back from the pristine store."""
    if image_id(docker_host, REF) != image:
        code, _, err = run(docker_host, "pull", pristine, REF)
        assert code == 0, err
    return image


def run(docker_host, *args):
    """dogestry.main(args) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    env = dict(client_env(docker_host), DOGESTRY_DEBUG="")
    code = dogestry.main(["-q"] + [str(a) for a in args], env, out, err)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, what):
    assert code == 1, (what, code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dogestry: error: "), (what, err)


# --- the store, file by file -------------------------------------------------------------------

def mutations(path):
    """(label, new bytes) for one stored file."""
    data = path.read_bytes()
    found = [("truncated", data[:len(data) // 2]), ("empty", b""),
             ("garbage", bytes((b * 7 + 13) % 256 for b in data[:4096]) or b"\xff")]
    if path.suffix == ".json" or "repositories" in path.parts:
        found += [("json list", b"[1, 2]"), ("json string", b'"x"'), ("json null", b"null"),
                  ("json nested", b"[" * 5000), ("json huge", b'{"x": "' + b"y" * (5 << 20) + b'"}')]
    text = data.decode("utf-8", "replace")
    if "sha256:" in text:
        start = text.index("sha256:")
        found.append(("other digest", (text[:start] + OTHER_DIGEST + text[start + 71:]).encode()))
    if path.parent.name == "sha256":  # a blob: one byte flipped
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        found.append(("byte flipped", bytes(flipped)))
    return found


def store_files(store):
    return sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())


def pull_and_check(docker_host, store, image, what):
    """Pull REF from STORE into a host that lacks it: a clean failure leaves no tag, a success the
    right image (IMAGE None: any, as the original's layout names no layer by its digest)."""
    docker_cli(docker_host, "rmi", "-f", REF, *([image] if image else []), check=False)
    code, _, err = run(docker_host, "pull", store, REF)
    if code == 0:
        assert image_id(docker_host, REF) == (image or image_id(docker_host, REF)) is not None, what
    else:
        assert_one_line_error(code, err, what)
        assert image_id(docker_host, REF) is None, what
    return code


def test_every_stored_file_broken_every_way_fails_cleanly(docker_host, image, pristine, tmp_path):
    outcomes = {}
    for relative in store_files(pristine):
        for label, data in mutations(pristine / relative):
            store = tmp_path / "store"
            shutil.rmtree(str(store), ignore_errors=True)
            shutil.copytree(str(pristine), str(store))
            (store / relative).write_bytes(data)
            outcomes[(str(relative), label)] = pull_and_check(docker_host, store, image, (str(relative), label))
    failed = {k for k, code in outcomes.items() if code}
    # what pull reads must be right: the tag, the manifest, the config and every blob
    for (name, label) in outcomes:
        if not name.startswith("layers/"):
            assert (name, label) in failed, (name, label)
    assert len(outcomes) > 30


def test_every_file_of_the_original_layout_broken_fails_cleanly(docker_host, on_host, tmp_path):
    """The original's images/<v1 id>/{json,layer.tar}: json holding a list, a bad parent, and the rest."""
    saved = tmp_path / "v1.tar"
    docker_cli(docker_host, "save", "-o", str(saved), REF)
    legacy = tmp_path / "legacy"
    with tarfile.open(str(saved)) as tar:
        repositories = json.loads(tar.extractfile("repositories").read())
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 2 and len(parts[0]) == 64 and member.isfile():
                target = legacy / "images" / parts[0] / parts[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    top = repositories["dgfuzz/app"]["1"]
    (legacy / "repositories" / "dgfuzz" / "app").mkdir(parents=True)
    (legacy / "repositories" / "dgfuzz" / "app" / "1").write_text(top)
    assert pull_and_check(docker_host, legacy, None, "pristine") == 0
    for relative in store_files(legacy):
        if relative.name == "VERSION":
            continue
        for label, data in mutations(legacy / relative) + [("bad parent", b'{"parent": 5}'),
                                                          ("parent loop", json.dumps({"parent": top}).encode())]:
            store = tmp_path / "store"
            shutil.rmtree(str(store), ignore_errors=True)
            shutil.copytree(str(legacy), str(store))
            (store / relative).write_bytes(data)
            code = pull_and_check(docker_host, store, None, (str(relative), label))
            if label != "other digest" and (relative.name == "json" or label in ("garbage", "truncated")):
                assert code == 1, (str(relative), label)


# --- the save stream, header by header ---------------------------------------------------------

def tar_headers(data):
    """Offsets of every member header in a tar."""
    offsets, pos = [], 0
    while pos + 512 <= len(data) and data[pos:pos + 512] != b"\0" * 512:
        offsets.append(pos)
        size = int(data[pos + 124:pos + 136].strip(b"\0 ") or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return offsets


def with_checksum(header):
    header = header[:148] + b" " * 8 + header[156:]
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


def set_field(header, offset, width, value):
    return with_checksum(header[:offset] + value.ljust(width, b"\0")[:width] + header[offset + width:])


def header_mutations(data, at):
    header = data[at:at + 512]
    size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    rest = data[at + 512:]
    return [
        ("size+1", set_field(header, 124, 12, b"%011o" % (size + 1)) + rest),
        ("size huge", set_field(header, 124, 12, b"77777777777") + rest),
        ("name traversal", set_field(header, 0, 100, b"../../../etc/escape") + rest),
        ("symlink out", set_field(set_field(header, 156, 1, b"2"), 157, 100, b"/etc/passwd") + rest),
        ("hard link", set_field(set_field(header, 156, 1, b"1"), 157, 100, b"manifest.json") + rest),
        ("bad checksum", header[:148] + b"0000000\0" + header[156:] + rest),
        ("cut in header", header[:100]),
        ("cut in data", rest[:max(0, size // 2)] and header + rest[:size // 2]),
    ]


def pax_header(records):
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)


def push_and_check(docker_host, store, image, data, what, monkeypatch):
    """Push REF with DATA as its save stream: a failure is one line and no tag; a success stores it right."""
    monkeypatch.setattr(dogestry.DockerClient, "save", lambda client, image_id: dogestry.ReadAhead(io.BytesIO(data)))
    shutil.rmtree(str(store), ignore_errors=True)
    result = []
    thread = threading.Thread(target=lambda: result.append(run(docker_host, "push", store, REF)), daemon=True)
    thread.start()
    thread.join(60)
    assert result, "push never ended on %s" % (what,)
    code, _, err = result[0]
    tag = store / "repositories" / "dgfuzz" / "app" / "1"
    if code:
        assert_one_line_error(code, err, what)
        assert not tag.exists(), what
        return code
    assert tag.read_text() == image.split(":")[1], what
    stored = json.loads((store / "images" / image[7:] / "manifest.json").read_text())
    config = (store / "images" / image[7:] / "config.json").read_bytes()
    assert "sha256:" + hashlib.sha256(config).hexdigest() == image, what
    for layer in stored["layers"]:
        blob = (store / "blobs" / "sha256" / layer["digest"][7:]).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"], what
        raw = gzip.decompress(blob) if layer["compression"] == "gzip" else blob
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == layer["diffID"], what
    return code


def test_every_save_stream_header_broken_every_way_fails_cleanly(docker_host, on_host, tmp_path, monkeypatch):
    image = on_host
    saved = tmp_path / "save.tar"
    docker_cli(docker_host, "save", "-o", str(saved), REF)
    data = saved.read_bytes()
    store = tmp_path / "store"
    assert push_and_check(docker_host, store, image, data, "pristine", monkeypatch) == 0
    failures = 0
    for at in tar_headers(data):
        for label, tail in header_mutations(data, at):
            failures += push_and_check(docker_host, store, image, data[:at] + tail, (at, label), monkeypatch) != 0
    assert failures > 4 * len(tar_headers(data))


@pytest.mark.parametrize("records", [b"0 \n", b"5 a=b\n", b"x path=y\n", b"99 path=y\n", b"12 path=y\n" * 2],
                         ids=["zero-length", "too-short", "not-a-number", "past-the-end", "no-newline"])
def test_a_broken_pax_header_is_one_error_not_a_hang(records, docker_host, on_host, tmp_path, monkeypatch):
    """A zero-length PAX record used to loop forever."""
    saved = tmp_path / "save.tar"
    docker_cli(docker_host, "save", "-o", str(saved), REF)
    data = saved.read_bytes()
    code = push_and_check(docker_host, tmp_path / "store", on_host, pax_header(records) + data, records, monkeypatch)
    assert code == 1


def test_a_bug_is_one_line_exit_70_and_a_traceback_only_when_asked(docker_host, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug put here by the test")

    monkeypatch.setattr(dogestry, "list_tags", broken)
    store = tmp_path / "store"
    store.mkdir()
    code, _, err = run(docker_host, "list", store)
    assert code == 70
    assert err.splitlines() == ["dogestry: internal error (a bug; DOGESTRY_DEBUG=1 shows where): "
                                "ZeroDivisionError: a bug put here by the test"]
    out, err = io.StringIO(), io.StringIO()
    assert dogestry.main(["list", str(store)], dict(os.environ, DOGESTRY_DEBUG="1"), out, err) == 70
    assert "Traceback" in err.getvalue() and "ZeroDivisionError" in err.getvalue()


@pytest.mark.parametrize("env,needle", [
    ({"AWS_MAX_ATTEMPTS": "abc"}, "AWS_MAX_ATTEMPTS"), ({"AWS_MAX_ATTEMPTS": "0"}, "AWS_MAX_ATTEMPTS"),
    ({"AWS_REGION": "us-east-1/../../evil"}, "region"), ({"DOCKER_HOST": "ftp://x"}, "ftp"),
    ({"DOGESTRY_LOAD_BATCH": "-1"}, "DOGESTRY_LOAD_BATCH"),
], ids=["attempts-text", "attempts-zero", "region", "docker-host", "load-batch"])
def test_bad_settings_are_one_clear_error(env, needle, docker_host, tmp_path):
    base = {k: v for k, v in client_env(docker_host).items() if not k.startswith("AWS_")}
    base.update(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_EC2_METADATA_DISABLED="true",
                HOME=str(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    code = dogestry.main(["pull", "s3://some-bucket/", "x"], dict(base, **env), out, err)
    assert code in (1, 2) and len(err.getvalue().splitlines()) == 1, err.getvalue()
    assert needle in err.getvalue() and "Traceback" not in err.getvalue()
