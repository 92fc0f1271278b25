"""Broken input, file by file and header by header: every failure is one line, never a traceback,
and nothing is half-written (no tag in the store after a push, none on the engine after a pull).

  - every file of a small stored image (current layout, and the original's) truncated, replaced by
    garbage, by JSON of the wrong type, or naming a wrong digest, then pulled into the real dockerd;
  - every tar header of a real `docker save` of that image given a wrong size, name, type or
    checksum, or cut short, then pushed (the engine's save() seam hands the mutated stream over);
  - every document dogestry reads from an archive or a store (docker and podman manifest.json,
    OCI index.json, a nested index, an OCI manifest, an image config, the store's manifests and
    layer records, the original layout's v1 json) given values of the wrong JSON type, keys
    dropped and values nested deeper, then read by the functions that read it;
  - hostile archives: tar headers of negative size, more members than dogestry reads, names
    longer than PATH_MAX, one document named thousands of times.

Runs go through dogestry.main() in this process: its exit status and stderr are what users see
(hostile archives: in a child, whose memory and CPU time are measured).
"""

import collections
import copy
import gzip
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zlib

import pytest

import dogestry
from realdocker import (DOGESTRY, build_image, client_env, docker_cli, image_id, one_error_line, random_bytes,
                        text_bytes)

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

    monkeypatch.setattr(dogestry, "list_tag_targets", broken)
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



# --- documents of the wrong shape --------------------------------------------------------------

def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files):
    """A tar (bytes) of [(member name, bytes)]."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LAYER = tar_of([("hello.txt", b"hello\n")])
ARCH = dogestry.make_platform("linux", os.uname().machine).architecture
CONFIG = {"architecture": ARCH, "os": "linux", "config": {"Labels": {"a": "b"}, "Cmd": ["sh"]},
          "rootfs": {"type": "layers", "diff_ids": [sha(LAYER)]}}


def _same(doc):
    return doc


def oci_archive(kind="", change=_same, copies=1):
    """An OCI image layout, [(member, bytes)]: index.json names (COPIES times, each with a tag of
    its own) a multi-platform index naming another platform's manifest, this machine's and an
    attestation (as buildx writes them).  CHANGE rewrites the document of KIND ('index.json',
    'nested index', 'manifest': this machine's, 'config': its config) first; the digests naming
    it follow it."""
    files = []

    def blob(data, media_type):
        files.append(("blobs/sha256/" + sha(data)[7:], data))
        return {"mediaType": media_type, "digest": sha(data), "size": len(data)}

    def document(name, doc):
        return json.dumps(change(doc) if kind == name else doc).encode()

    layer = blob(gzip.compress(LAYER, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
    config = blob(document("config", CONFIG), "application/vnd.oci.image.config.v1+json")
    manifest = blob(document("manifest", {"schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST,
                                          "config": config, "layers": [layer]}), dogestry.OCI_MANIFEST)
    other_config = blob(json.dumps(dict(CONFIG, architecture="not-" + ARCH)).encode(),
                        "application/vnd.oci.image.config.v1+json")
    other = blob(json.dumps({"schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST, "config": other_config,
                             "layers": [layer]}).encode(), dogestry.OCI_MANIFEST)
    statement = blob(b'{"_type": "https://in-toto.io/Statement/v0.1"}', "application/vnd.in-toto+json")
    unknown = blob(json.dumps({"architecture": "unknown", "os": "unknown", "rootfs": {
        "type": "layers", "diff_ids": [statement["digest"]]}}).encode(), "application/vnd.oci.image.config.v1+json")
    attestation = blob(json.dumps({"schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST, "config": unknown,
                                   "layers": [statement]}).encode(), dogestry.OCI_MANIFEST)
    nested = blob(document("nested index", {"schemaVersion": 2, "mediaType": dogestry.OCI_INDEX, "manifests": [
        dict(other, platform={"os": "linux", "architecture": "not-" + ARCH}),
        dict(manifest, platform={"os": "linux", "architecture": ARCH}),
        dict(attestation, platform={"os": "unknown", "architecture": "unknown"},
             annotations={"vnd.docker.reference.type": "attestation-manifest",
                          "vnd.docker.reference.digest": manifest["digest"]})]}), dogestry.OCI_INDEX)
    index = {"schemaVersion": 2, "manifests": [
        dict(nested, annotations={dogestry.IMAGE_NAME_ANNOTATION: "docker.io/fz/oci:%d" % i,
                                  dogestry.REF_NAME_ANNOTATION: "%d" % i}) for i in range(copies)]}
    return files + [("index.json", document("index.json", index)), ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]


def docker_archive(kind="", change=_same, copies=1):
    """A `docker save` (20.10's shape), [(member, bytes)], manifest.json naming its image COPIES
    times (each with a tag of its own); CHANGE rewrites the document of KIND ('manifest.json',
    'config') first, and its member's name follows it."""
    config = json.dumps(change(CONFIG) if kind == "config" else CONFIG).encode()
    config_name = sha(config)[7:] + ".json"
    v1 = "ab" * 32
    manifest = [{"Config": config_name, "RepoTags": ["fz/docker:%d" % i], "Layers": [v1 + "/layer.tar"]}
                for i in range(copies)]
    manifest = change(manifest) if kind == "manifest.json" else manifest
    return [(v1 + "/VERSION", b"1.0"), (v1 + "/json", b'{"id": "%s"}' % v1.encode()), (v1 + "/layer.tar", LAYER),
            (config_name, config), ("manifest.json", json.dumps(manifest).encode())]


def json_paths(doc, path=()):
    """The path (keys and indexes) of every value of a JSON document, the document itself first."""
    yield path
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from json_paths(value, path + (key,))


def at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def replaced(doc, path, value):
    """A copy of doc with the value at path replaced (None: removed)."""
    if not path:
        return value
    doc = copy.deepcopy(doc)
    parent = at(doc, path[:-1])
    if value is None and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


OTHER_VALUES = [None, True, 0, -1, 2.5, "x", "sha256:" + "0" * 64, [], [7], {}, {"x": "y"}]


def wrong_shapes(doc, seed):
    """(label, document): doc with each value replaced by a value of every other JSON type (None:
    a key dropped, null in a list), nested one level deeper in a list and in an object; then
    doc with several such changes at random places."""
    for path in list(json_paths(doc)):
        value = at(doc, path)
        for other in OTHER_VALUES + [[value], {"v": value}]:
            if other != value or type(other) is not type(value):
                yield "%s = %.40r" % (path, other), replaced(doc, path, other)
    rng = random.Random(seed)
    for attempt in range(200):
        changed = doc
        for _ in range(rng.randint(2, 4)):
            path = rng.choice(list(json_paths(changed)))
            value = at(changed, path)
            changed = replaced(changed, path, rng.choice(OTHER_VALUES + [[value], {"v": value}]))
        yield "random %d" % attempt, changed


def outcome(read, label):
    """'read' or 'refused' (a FormatError or an IntegrityError); any other exception fails the test."""
    try:
        read()
    except (dogestry.FormatError, dogestry.IntegrityError):
        return "refused"
    except Exception as e:
        raise AssertionError("%s: %r" % (label, e)) from e
    return "read"


def read_archive(files):
    """What import reads of an archive: its images (and, for docker's shape, what push reads)."""
    contents = dogestry.read_save_stream(io.BytesIO(tar_of(files)), lambda entry, reader: None, what="archive")
    images = dogestry.choose_archived(dogestry.archive_images(contents), [])
    if "manifest.json" in contents.small:
        dogestry.parse_saved_image(contents, images[0].image_id)
    for image in images:
        for one in image.images.values() if isinstance(image, dogestry.ArchivedIndex) else [image]:
            dogestry.partial_config(one.config, len(one.diff_ids), "n")


@pytest.mark.parametrize("build,kind", [(oci_archive, "index.json"), (oci_archive, "nested index"),
                                        (oci_archive, "manifest"), (oci_archive, "config"),
                                        (docker_archive, "manifest.json"), (docker_archive, "config")],
                         ids=["oci-index", "oci-nested-index", "oci-manifest", "oci-config", "docker-manifest",
                              "docker-config"])
def test_archive_documents_of_any_wrong_shape_are_read_or_refused_as_malformed(build, kind):
    """Each archive document with values of the wrong type, keys dropped, values nested deeper:
    import (and push, for docker's shape) reads it or refuses it with a FormatError (or an
    IntegrityError), never another exception."""
    assert outcome(lambda: read_archive(build()), "pristine") == "read"
    seen = collections.Counter(outcome(lambda: read_archive(build(kind, lambda doc: changed)), label)
                               for label, changed in wrong_shapes(_document_of(build, kind), kind))
    assert seen["refused"] > 50 and set(seen) <= {"read", "refused"}, seen


def _document_of(build, kind):
    """The document of KIND in BUILD's archive, as it is written."""
    found = []
    build(kind, lambda doc: found.append(doc) or doc)
    return found[0]


def stored_image(store):
    """A LocalStore holding one image (manifest, config, layer record) and one of the original
    layout (two v1 layers); (image hex, diffID, top v1 id)."""
    config = json.dumps(CONFIG).encode()
    record = {"diffID": sha(LAYER), "digest": sha(LAYER), "size": len(LAYER), "compression": "none",
              "rawSize": len(LAYER)}
    image_hex = sha(config)[7:]
    store.put_bytes("images/%s/config.json" % image_hex, config)
    store.put_bytes("blobs/sha256/" + sha(LAYER)[7:], LAYER)
    dogestry.write_json(store, "layers/%s.json" % sha(LAYER)[7:], record)
    dogestry.write_json(store, "images/%s/manifest.json" % image_hex, {
        "mediaType": dogestry.MANIFEST_MEDIA_TYPE, "schemaVersion": 2, "config": {"digest": sha(config), "size": len(config)},
        "layers": [record]})
    base, top = "b" * 64, "c" * 64
    for v1, parent in ((base, None), (top, base)):
        dogestry.write_json(store, "images/%s/json" % v1, {
            "id": v1, "parent": parent, "created": "2014-01-01T00:00:00Z", "author": "me", "comment": "",
            "container_config": {"Cmd": ["/bin/sh", "-c", "true"]}, "os": "linux"})
        store.put_bytes("images/%s/layer.tar" % v1, LAYER)
    return image_hex, sha(LAYER), top


def read_stored(store, image_hex, diff_id, top):
    """What push, pull, export and gc read of the store's documents."""
    image = dogestry.load_stored_image(store, image_hex)
    dogestry.stored_layer(store, diff_id)
    dogestry.LayerRecord.from_json(dogestry.read_json(store, "layers/%s.json" % diff_id[7:]))
    chain = dogestry.load_stored_image(store, top).legacy_chain
    layers = [dogestry.legacy_layer(store, v1) for v1 in chain]
    dogestry.v1_config(layers[-1][0], [dogestry.v1_history(doc) for doc, _, _ in layers], [diff_id] * len(layers))
    return image


@pytest.mark.parametrize("kind", ["manifest", "layer record", "v1 json"])
def test_store_documents_of_any_wrong_shape_are_read_or_refused_as_malformed(kind, tmp_path):
    """The store's image manifest, a layer record, a v1 json of the original layout, each with
    values of the wrong type, keys dropped, values nested deeper: read, or refused with a
    FormatError (or an IntegrityError), never another exception."""
    store = dogestry.LocalStore(str(tmp_path / "store"))
    store.ensure()
    image_hex, diff_id, top = stored_image(store)
    key = {"manifest": "images/%s/manifest.json" % image_hex, "layer record": "layers/%s.json" % diff_id[7:],
           "v1 json": "images/%s/json" % top}[kind]
    pristine = json.loads(store.get_bytes(key))
    assert outcome(lambda: read_stored(store, image_hex, diff_id, top), "pristine") == "read"
    seen = collections.Counter()
    for label, changed in wrong_shapes(pristine, kind):
        dogestry.write_json(store, key, changed)
        seen[outcome(lambda: read_stored(store, image_hex, diff_id, top), label)] += 1
    assert seen["refused"] > 50 and set(seen) <= {"read", "refused"}, seen


def write_archive(path, files):
    path.write_bytes(tar_of(files))
    return path


def dogestry_import(store, archive, env=None):
    return subprocess.run([sys.executable, str(DOGESTRY), "-q", "import", str(store), str(archive)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120,
                          env=dict(env or os.environ, DOGESTRY_DEBUG=""))


def _set(path, value):
    return lambda doc: replaced(doc, path, value)


@pytest.mark.parametrize("build,kind,change,needle", [
    (oci_archive, "index.json", _set(("manifests", 0, "annotations"), "x"), "manifests[0].annotations"),
    (oci_archive, "nested index", _set(("manifests", 1, "platform"), "linux/amd64"), "manifests[1].platform"),
    (oci_archive, "nested index", _set(("manifests",), 1), "manifests"),
    (oci_archive, "config", _set(("rootfs", "diff_ids", 0), 1), "rootfs.diff_ids[0]"),
    (docker_archive, "manifest.json", _set((0, "RepoTags"), 1), "[0].RepoTags"),
], ids=["annotations-a-string", "platform-a-string", "nested-manifests-an-int", "diff-id-an-int",
        "repotags-an-int"])
def test_an_archive_document_of_the_wrong_shape_is_one_format_error(build, kind, change, needle, tmp_path):
    """import names the document and where in it the shape is wrong, on one line, exit status 1
    (no 'internal error'), and stores nothing."""
    archive = write_archive(tmp_path / "bad.tar", build(kind, change))
    proc = dogestry_import(tmp_path / "store", archive)
    line = one_error_line(proc, needle)
    assert proc.returncode == 1 and "internal error" not in line, proc.stderr
    assert not (tmp_path / "store" / "repositories").exists() and not (tmp_path / "store" / "images").exists()


# --- hostile archives: bounded memory and work ------------------------------------------------

MEMORY_CAP = 1 << 30  # address space of a child reading a hostile archive: a runaway read fails early


def run_capped(*args, cpu_seconds=60):
    """Run dogestry ARGS in a child capped at MEMORY_CAP of address space and CPU_SECONDS of CPU:
    (exit status, stderr, CPU seconds used, peak RSS in bytes)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, str(DOGESTRY), "-q"] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=cap,
                                env=dict(os.environ, DOGESTRY_DEBUG=""))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        err.seek(0)
        return proc.returncode, err.read().decode(), usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def zeros_gz(n_mib):
    """N_MIB MiB of zeros, gzip'ed as N_MIB concatenated members (a small file, a large stream)."""
    member = zlib.compressobj(6, zlib.DEFLATED, 31)
    one = member.compress(b"\0" * (1 << 20)) + member.flush()
    return one * n_mib


def base256_size(header, value):
    """A tar header with its size field in GNU base-256 (0x80 positive, 0xff negative), checksum fixed."""
    field = (value % (1 << 88)).to_bytes(11, "big")
    return with_checksum(header[:124] + (b"\xff" if value < 0 else b"\x80") + field + header[136:])


def negative_member(kind):
    """A tar header of type KIND whose size is -1 (after a PAX header giving size=0, for the
    types whose size a PAX header may set)."""
    info = tarfile.TarInfo("././@LongLink" if kind in "LK" else "member")
    info.type, info.linkname = kind.encode(), "target" if kind in "12" else ""
    header = base256_size(info.tobuf(tarfile.USTAR_FORMAT)[:512], -1)
    return header if kind in "LKxg" else pax_header(b"10 size=0\n") + header


@pytest.mark.parametrize("kind", list("LKxg01234567"))
def test_a_tar_header_of_negative_size_is_one_error_in_bounded_memory(kind, tmp_path):
    """A header whose GNU base-256 size is -1, of every type (extension headers, then members whose
    size a PAX header overrides), followed by 1 GiB of zeros in a 1 MB .tar.gz: refused at that
    header, in little memory and CPU (it used to read the rest of the archive into memory)."""
    archive = tmp_path / "negative.tar.gz"
    archive.write_bytes(gzip.compress(negative_member(kind), mtime=0) + zeros_gz(1024))
    code, err, cpu, rss = run_capped("import", tmp_path / "store", archive)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("dogestry: error: broken archive: a tar header with a negative size"), err
    assert cpu < 10 and rss < 200 << 20, (cpu, rss)


def test_an_archive_of_more_members_than_dogestry_reads_is_one_error(tmp_path):
    """More than TAR_MEMBER_LIMIT (100,000) tar headers: refused once it has read that many."""
    junk = tarfile.TarInfo("junk").tobuf(tarfile.USTAR_FORMAT)
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(gzip.compress(junk * (dogestry.TAR_MEMBER_LIMIT + 1) + b"\0" * 1024, 1, mtime=0))
    code, err, cpu, rss = run_capped("import", tmp_path / "store", archive)
    assert code == 1 and err == "dogestry: error: archive has more than 100000 members (tar headers)\n", err
    assert rss < 200 << 20, rss


def test_a_member_name_longer_than_path_max_is_one_error(tmp_path):
    """A member named by 4097 bytes (a GNU long name) in an otherwise good archive: refused."""
    files = docker_archive()
    archive = write_archive(tmp_path / "long.tar", files[:1] + [("d/" + "x" * 4095, b"")] + files[1:])
    proc = dogestry_import(tmp_path / "store", archive)
    one_error_line(proc, "longer than 4096 bytes")
    assert proc.returncode == 1
    ok_archive = write_archive(tmp_path / "ok.tar", files[:1] + [("d/" + "x" * 4094, b"")] + files[1:])
    assert dogestry_import(tmp_path / "store", ok_archive).returncode == 0


@pytest.mark.parametrize("build", [oci_archive, docker_archive], ids=["oci", "docker"])
def test_each_document_of_an_archive_is_parsed_once_however_often_it_is_named(build, tmp_path, monkeypatch):
    """An index naming one (multi-platform) index 300 times, a manifest.json naming one config 300
    times: each document is parsed once, and the image stored with all 300 tags."""
    parsed = collections.Counter()
    parse = dogestry.parse_json

    def counting(data, *args, **kwargs):
        parsed[sha(data)] += 1
        return parse(data, *args, **kwargs)

    monkeypatch.setattr(dogestry, "parse_json", counting)
    archive = write_archive(tmp_path / "many.tar", build(copies=300))
    out, err = io.StringIO(), io.StringIO()
    code = dogestry.main(["-q", "import", str(tmp_path / "store"), str(archive)], environ={}, stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert len(out.getvalue().splitlines()) == 300
    assert parsed and max(parsed.values()) == 1, parsed.most_common(3)
