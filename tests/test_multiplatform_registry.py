"""Multi-platform tags in the registry API and in `dogestry copy`, with real clients.

The source store is made as clients make one: `buildah manifest push --all` of a three-platform
image (linux/amd64, linux/arm64, linux/arm/v7: FROM scratch + COPY, built without emulation) into
`dogestry -server STORE`; then, through the registry API as buildx and oras-like clients push
them, an index holding those three images and a buildx-style attestation manifest, and referrers
(a signature of the index, an SBOM of the arm64 image, a signature of that SBOM, a signature of an
image tag pushed by buildah, and one of an image stored by `dogestry import`, whose manifest the
registry makes).

A client that accepts no image index gets the linux/amd64 image, as distribution answers old
clients.  `copy` takes a multi-platform tag whole, digests unchanged, with every referrer, between
a directory store and a radosgw bucket and back; skopeo, docker (the engine pulls through the
registry API itself) and ctr then get each platform from the copy's registry.
"""

import hashlib
import json
import shutil
import subprocess
import types
import urllib.parse
import uuid
from pathlib import Path

import pytest

import dogestry
from conftest import make_bucket
from multiplatform import Buildah, platform_context
from realdocker import docker_cli, image_id, loopback_addresses, ok, one_error_line, run_dogestry
from serverkit import PORT, Server, call, registry_error_code, server_env
from test_registry import puller  # noqa: F401  (a dockerd of that module's own, pulling from the registry)

pytestmark = pytest.mark.integration

HOSTS = loopback_addresses(1)
REGISTRY = "%s:%d" % (HOSTS[0], PORT)
PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")
NAME = "mp/app"
EMPTY = b"{}"  # the OCI empty descriptor's blob
ALL_TYPES = ", ".join(dogestry.MANIFEST_TYPES)
IMAGE_TYPES = dogestry.OCI_MANIFEST + ", " + dogestry.DOCKER_MANIFEST
COPIED_TAGS = ("mp/app:1", "mp/made:1", "mp/single:1")


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the source store ------------------------------------------------------------------------------

def push_blob(name, data):
    answer = call(HOSTS[0], "POST", "/v2/%s/blobs/uploads/?digest=%s" % (name, sha(data)), {
        "Content-Type": "application/octet-stream"}, data)
    assert answer.status == 201, answer
    return {"digest": sha(data), "size": len(data)}


def push_manifest(name, reference, data, media_type):
    answer = call(HOSTS[0], "PUT", "/v2/%s/manifests/%s" % (name, reference), {"Content-Type": media_type}, data)
    assert answer.status == 201, answer
    return sha(data)


def descriptor(data, media_type):
    return {"mediaType": media_type, "digest": sha(data), "size": len(data)}


def push_referrer(name, subject, artifact_type, content):
    """An oras-like artifact (empty config, one layer holding content) whose subject is the
    descriptor `subject`, pushed by digest; its digest."""
    layer = push_blob(name, content)
    data = json.dumps({
        "schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST, "artifactType": artifact_type,
        "config": dict(push_blob(name, EMPTY), mediaType="application/vnd.oci.empty.v1+json"),
        "layers": [dict(layer, mediaType=artifact_type)], "subject": subject,
        "annotations": {"org.example.made-by": "test"}}, indent=2).encode()
    return push_manifest(name, sha(data), data, dogestry.OCI_MANIFEST)


def push_attestation(name, attested):
    """A buildx-style attestation manifest (an in-toto statement as its layer) of the manifest
    `attested`; its index descriptor (platform unknown/unknown, the reference annotations)."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://spdx.dev/Document",
                            "subject": [{"digest": {"sha256": attested[7:]}}], "predicate": {}}).encode()
    layer = push_blob(name, statement)
    config = json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode()
    data = json.dumps({
        "schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST,
        "config": dict(push_blob(name, config), mediaType=dogestry.OCI_CONFIG),
        "layers": [dict(layer, mediaType="application/vnd.in-toto+json",
                        annotations={"in-toto.io/predicate-type": "https://spdx.dev/Document"})]}).encode()
    push_manifest(name, sha(data), data, dogestry.OCI_MANIFEST)
    return dict(descriptor(data, dogestry.OCI_MANIFEST), platform={"architecture": "unknown", "os": "unknown"},
                annotations={"vnd.docker.reference.type": "attestation-manifest",
                             "vnd.docker.reference.digest": attested})


def stored_descriptor(store, digest):
    """The descriptor of an OCI manifest stored in a directory store."""
    return descriptor((store / "manifests" / "sha256" / digest[7:]).read_bytes(), dogestry.OCI_MANIFEST)


def served(name, reference, accept=ALL_TYPES, method="HEAD"):
    return call(HOSTS[0], method, "/v2/%s/manifests/%s" % (name, reference), {"Accept": accept} if accept else {})


def served_digest(name, reference):
    answer = served(name, reference)
    assert answer.status == 200, answer
    return answer.headers.getheader("Docker-Content-Digest")


@pytest.fixture(scope="module")
def source(base_env, tmp_path_factory):
    """A directory store holding mp/app:1 (the index of three platforms and an attestation),
    mp/single:1 (an image buildah pushed), mp/made:1 (an image dogestry import stored) and the
    referrers; what each digest is."""
    work = tmp_path_factory.mktemp("mpsource")
    store = work / "store"
    store.mkdir()
    buildah = Buildah(work / "buildah")
    server = Server(HOSTS[0], base_env, work, store, args=["-anonymous-push"]).wait_ready()
    try:
        buildah.run("manifest", "create", "mp-list")
        for platform in PLATFORMS:
            context = platform_context(work / platform.replace("/", "-"), "built for %s\n" % platform)
            buildah.build(context, platform, manifest="mp-list")
        built = buildah.push_list("mp-list", "docker://%s/%s:1" % (REGISTRY, NAME), "--tls-verify=false")
        index = json.loads((store / "manifests" / "sha256" / built[7:]).read_bytes())
        children = {}
        for entry in index["manifests"]:
            platform = "/".join(p for p in (entry["platform"]["os"], entry["platform"]["architecture"],
                                            entry["platform"].get("variant")) if p)
            child = json.loads((store / "manifests" / "sha256" / entry["digest"][7:]).read_bytes())
            children[platform] = types.SimpleNamespace(digest=entry["digest"], config=child["config"]["digest"],
                                                       layers=[layer["digest"] for layer in child["layers"]])
        attestation = push_attestation(NAME, children["linux/amd64"].digest)
        index["manifests"].append(attestation)
        index_data = json.dumps(index, indent=3).encode()
        push_manifest(NAME, "1", index_data, dogestry.OCI_INDEX)

        single = buildah.build(platform_context(work / "single", "a single image\n"), "linux/amd64")
        digest_file = work / "single.digest"
        buildah.run("push", "-q", "--tls-verify=false", "--digestfile", digest_file, single,
                    "docker://%s/mp/single:1" % REGISTRY)
        single_digest = digest_file.read_text().strip()
        made = buildah.build(platform_context(work / "made", "an image dogestry stores\n"), "linux/amd64")
        buildah.run("push", "-q", made, "oci-archive:%s:mp/made:1" % (work / "made.tar"))
        ok(run_dogestry("import", store, work / "made.tar", env=base_env))
        made_digest = served_digest("mp/made", "1")  # the manifest the registry makes of it (OCI)

        signature = "application/vnd.example.signature"
        referrers = {"index-signature": push_referrer(NAME, descriptor(index_data, dogestry.OCI_INDEX), signature, b"s1")}
        referrers["sbom"] = push_referrer(NAME, stored_descriptor(store, children["linux/arm64"].digest),
                                          "application/spdx+json", b'{"spdx": 1}')
        referrers["sbom-signature"] = push_referrer(NAME, stored_descriptor(store, referrers["sbom"]), signature, b"s2")
        referrers["single-signature"] = push_referrer("mp/single", stored_descriptor(store, single_digest), signature,
                                                      b"s3")
        made_data = served("mp/made", "1", dogestry.OCI_MANIFEST, "GET").body
        referrers["made-signature"] = push_referrer("mp/made", descriptor(made_data, dogestry.OCI_MANIFEST), signature,
                                                    b"s4")
    finally:
        server.stop()
    server.assert_no_traceback()
    return types.SimpleNamespace(store=store, index=sha(index_data), built=built, children=children,
                                 attestation=attestation["digest"], single=single_digest, made=made_digest,
                                 referrers=referrers)


def writable(source, tmp_path):
    """A copy of the source store that a test may change."""
    path = tmp_path / "src"
    shutil.copytree(str(source.store), str(path))
    return path


def manifest_files(store, top="sha256"):
    """{key: bytes} of a directory store's manifests/TOP/ (sha256: the manifests; referrers: the listings)."""
    base = Path(store) / "manifests"
    return {str(p.relative_to(base)): p.read_bytes() for p in (base / top).rglob("*") if p.is_file()}


def reachable_manifests(source):
    """The source's manifests less buildah's own index, which mp/app:1 named before (no tag reaches it)."""
    files = manifest_files(source.store)
    del files["sha256/" + source.built[7:]]
    return files


def subjects(source):
    """Every manifest digest that has referrers in the source store."""
    return sorted("sha256:" + p.name for p in (source.store / "manifests" / "referrers").iterdir())


def listed_referrers(name, subject):
    answer = call(HOSTS[0], "GET", "/v2/%s/referrers/%s" % (name, subject))
    assert answer.status == 200, answer
    return sorted(answer.json()["manifests"], key=lambda d: d["digest"])


def source_referrers(source, subject):
    """The descriptors the source store lists for a subject."""
    base = source.store / "manifests" / "referrers" / subject[7:]
    return sorted((json.loads(p.read_bytes()) for p in base.iterdir()), key=lambda d: d["digest"])


def s3_target(rgw, prefix="mp"):
    bucket = make_bucket(rgw, "dgmp-" + uuid.uuid4().hex[:10])
    return "s3://%s/%s/" % (bucket, prefix), bucket


def s3_env(base_env, rgw, endpoint=None):
    return dict(base_env, AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
                AWS_ENDPOINT_URL=endpoint or rgw.endpoint)


def skopeo(*args):
    proc = subprocess.run(["skopeo"] + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


# === the registry API: Accept ====================================================================

@pytest.fixture
def registry(source, servers, base_env, tmp_path):
    """A server (anyone may push) on a copy of the source store."""
    store = writable(source, tmp_path)
    servers(HOSTS[0], base_env, store=store, args=["-anonymous-push"])
    return store


def test_a_client_that_accepts_no_index_gets_the_linux_amd64_image(source, registry):
    """By tag, a client whose Accept lists not the index's type (an OCI index; a Docker manifest
    list is another type) gets the index's linux/amd64 manifest as pushed (GET and HEAD, its own
    digest); one that accepts only Docker schema 2 gets the Docker manifest made of that image,
    which is served by its digest too.  A client that accepts the index's type, any type (*/*),
    or sends no Accept at all gets the index as pushed; by digest the index is served as pushed
    whatever the Accept, and each platform's manifest by its digest."""
    amd64 = source.children["linux/amd64"]
    pushed = (source.store / "manifests" / "sha256" / amd64.digest[7:]).read_bytes()
    for method, accept in (("GET", IMAGE_TYPES), ("HEAD", IMAGE_TYPES),
                           ("GET", dogestry.DOCKER_MANIFEST_LIST + ", " + IMAGE_TYPES)):
        got = served(NAME, "1", accept, method)
        assert (got.status, got.headers.getheader("Content-Type")) == (200, dogestry.OCI_MANIFEST), got
        assert got.headers.getheader("Docker-Content-Digest") == amd64.digest
        assert got.body == (pushed if method == "GET" else b"")

    docker = served(NAME, "1", dogestry.DOCKER_MANIFEST, "GET")
    assert docker.headers.getheader("Content-Type") == dogestry.DOCKER_MANIFEST, docker
    made = json.loads(docker.body)
    assert made["config"]["digest"] == amd64.config
    assert [layer["digest"] for layer in made["layers"]] == amd64.layers
    assert docker.headers.getheader("Docker-Content-Digest") == sha(docker.body)
    assert served(NAME, sha(docker.body), dogestry.DOCKER_MANIFEST, "GET").body == docker.body

    index = (source.store / "manifests" / "sha256" / source.index[7:]).read_bytes()
    for accept in (dogestry.OCI_INDEX, ALL_TYPES, "*/*", None):
        got = served(NAME, "1", accept, "GET")
        assert (got.status, got.body, got.headers.getheader("Content-Type")) == (200, index, dogestry.OCI_INDEX), accept
    by_digest = served(NAME, source.index, dogestry.DOCKER_MANIFEST, "GET")
    assert (by_digest.body, by_digest.headers.getheader("Docker-Content-Digest")) == (index, source.index)
    for child in list(source.children.values()) + [types.SimpleNamespace(digest=source.attestation)]:
        got = served(NAME, child.digest, ALL_TYPES, "GET")
        assert (got.status, sha(got.body)) == (200, child.digest)


def test_an_index_without_linux_amd64_is_unknown_to_a_client_that_accepts_no_index(source, registry):
    """An index of arm64 and arm/v7 only: a client that accepts no index type gets 404
    MANIFEST_UNKNOWN naming the platforms the tag has; one that accepts indexes gets it."""
    index = json.loads((source.store / "manifests" / "sha256" / source.index[7:]).read_bytes())
    index["manifests"] = [m for m in index["manifests"] if m["platform"]["architecture"] in ("arm64", "arm")]
    data = json.dumps(index).encode()
    push_manifest(NAME, "arm", data, dogestry.OCI_INDEX)
    refused = served(NAME, "arm", IMAGE_TYPES, "GET")
    assert (refused.status, registry_error_code(refused)) == (404, "MANIFEST_UNKNOWN")
    message = refused.json()["errors"][0]["message"]
    assert "no linux/amd64 image" in message and "it has linux/arm/v7, linux/arm64" in message, message
    assert served(NAME, "arm", dogestry.OCI_INDEX, "GET").body == data


def test_an_image_tag_pushed_in_a_type_the_client_does_not_accept_is_served_as_made(source, registry):
    """mp/single:1 was pushed by buildah as an OCI manifest: a client that accepts only Docker
    schema 2 gets the Docker manifest made of the same image, not a type it cannot read."""
    pushed = served("mp/single", "1", IMAGE_TYPES, "GET")
    assert (sha(pushed.body), pushed.headers.getheader("Content-Type")) == (source.single, dogestry.OCI_MANIFEST)
    docker = served("mp/single", "1", dogestry.DOCKER_MANIFEST, "GET")
    assert docker.headers.getheader("Content-Type") == dogestry.DOCKER_MANIFEST, docker
    assert json.loads(docker.body)["config"]["digest"] == json.loads(pushed.body)["config"]["digest"]
    assert docker.headers.getheader("Docker-Content-Digest") == sha(docker.body) != source.single


# === copy ========================================================================================

def test_copy_to_a_bucket_and_back_keeps_every_digest_and_referrer(source, servers, base_env, rgw, tmp_path):
    """copy --all of the directory store into a bucket, then the three tags back into a directory:
    each prints the index digest for the multi-platform tag; the bucket's registry serves the same
    digest for each tag, lists every referrer as the source does, and skopeo copy --all out of it
    gives back the index and every manifest it names byte for byte; the directory at the end holds
    every manifest and referrer listing of the source, byte for byte."""
    url, _ = s3_target(rgw)
    env = s3_env(base_env, rgw)
    first = ok(run_dogestry("copy", "--all", source.store, url, env=env))
    assert "Copied mp/app:1 (%s)" % source.index in first.stdout.splitlines()

    bucket_server = servers(HOSTS[0], env, store=url)
    assert {tag: served_digest(*tag.split(":")) for tag in COPIED_TAGS} == {
        "mp/app:1": source.index, "mp/single:1": source.single, "mp/made:1": source.made}
    for subject in subjects(source):
        assert listed_referrers(NAME, subject) == source_referrers(source, subject)
    layout = tmp_path / "layout"
    skopeo("copy", "--all", "--src-tls-verify=false", "docker://%s/%s:1" % (REGISTRY, NAME), "oci:%s:app" % layout)
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert entry["digest"] == source.index
    index = json.loads((layout / "blobs" / "sha256" / source.index[7:]).read_bytes())
    for child in index["manifests"]:
        assert sha((layout / "blobs" / "sha256" / child["digest"][7:]).read_bytes()) == child["digest"]
    bucket_server.stop()
    bucket_server.assert_no_traceback()

    back = tmp_path / "back"
    second = ok(run_dogestry("copy", url, back, *COPIED_TAGS, env=env))
    assert second.stdout.splitlines() == ["Copied mp/app:1 (%s)" % source.index] + [
        "Copied %s (%s)" % (tag, tag_image(source.store, tag)) for tag in COPIED_TAGS[1:]]
    assert manifest_files(back) == reachable_manifests(source)
    assert manifest_files(back, "referrers") == manifest_files(source.store, "referrers")
    servers(HOSTS[0], base_env, store=back)
    assert {tag: served_digest(*tag.split(":")) for tag in COPIED_TAGS} == {
        "mp/app:1": source.index, "mp/single:1": source.single, "mp/made:1": source.made}


def tag_image(store, tag):
    """The image ID a tag of a directory store names."""
    name, _, reference = tag.partition(":")
    return "sha256:" + (Path(store) / "repositories" / name / reference).read_text().strip()


@pytest.mark.parametrize("target", ["dir", "s3"])
def test_real_clients_get_each_platform_from_a_copy(target, source, servers, base_env, rgw, puller, tmp_path):  # noqa: F811
    """After copy of the multi-platform tag into a directory store or a bucket, its registry gives
    each client its platform: skopeo --override-arch arm64 (and arm/v7) the image of that platform;
    docker pull the engine's own platform, and docker pull --platform linux/arm64 the arm64 image
    (the engine reads the index through the registry API itself); ctr pull --platform linux/arm64
    the index."""
    url, env = (str(tmp_path / "dst"), dict(base_env)) if target == "dir" else (s3_target(rgw)[0], s3_env(base_env, rgw))
    ok(run_dogestry("copy", source.store, url, "%s:1" % NAME, env=env))
    servers(HOSTS[0], dict(server_env(base_env, puller, env.get("AWS_ENDPOINT_URL", "")), **env), store=url)
    ref = "docker://%s/%s:1" % (REGISTRY, NAME)
    for platform, overrides in (("linux/arm64", ["--override-arch", "arm64"]),
                                ("linux/arm/v7", ["--override-arch", "arm", "--override-variant", "v7"])):
        config = skopeo(*overrides, "inspect", "--config", "--raw", "--tls-verify=false", ref).stdout.encode()
        assert sha(config) == source.children[platform].config
        inspected = json.loads(skopeo(*overrides, "inspect", "--tls-verify=false", ref).stdout)
        assert inspected["Layers"] == source.children[platform].layers

    tag = "%s/%s:1" % (REGISTRY, NAME)
    configs = [c.config for c in source.children.values()]
    docker_cli(puller.host, "rmi", "-f", tag, *configs, check=False)
    arch = docker_cli(puller.host, "version", "-f", "{{.Server.Arch}}").stdout.strip()
    docker_cli(puller.host, "pull", tag)
    assert image_id(puller.host, tag) == source.children["linux/" + arch].config
    docker_cli(puller.host, "pull", "--platform", "linux/arm64", tag)
    assert image_id(puller.host, tag) == source.children["linux/arm64"].config
    assert docker_cli(puller.host, "image", "inspect", "-f", "{{.Architecture}}", tag).stdout.strip() == "arm64"

    sock = str(puller.exec_root / "containerd" / "containerd.sock")
    namespace = "mp" + uuid.uuid4().hex[:6]
    ctr = subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "pull", "--plain-http", "--snapshotter", "native",
                          "--platform", "linux/arm64", tag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=300)
    assert ctr.returncode == 0, ctr.stdout
    listing = subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "ls"], stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout
    assert source.index in listing, listing


def test_bucket_to_bucket_copies_an_index_server_side(source, base_env, rgw, fault_proxy):
    """Between two buckets of one endpoint every blob of the multi-platform tag and its referrers
    (layers, configs, attestation and artifact blobs) is copied by S3 itself: none is read
    through the machine."""
    first, _ = s3_target(rgw, "a")
    ok(run_dogestry("copy", source.store, first, "%s:1" % NAME, env=s3_env(base_env, rgw)))
    proxy = fault_proxy()
    src, dst = ("%s?endpoint=%s" % (url, urllib.parse.quote(proxy.url, safe="")) for url in (first, s3_target(rgw)[0]))
    ok(run_dogestry("copy", src, dst, "%s:1" % NAME, env=s3_env(base_env, rgw)))
    blob_puts = [e for e in proxy.log if e["method"] == "PUT" and "/blobs/sha256/" in e["path"]]
    assert blob_puts and all(e["headers"].get("x-amz-copy-source") for e in blob_puts)
    assert not [e for e in proxy.log if e["method"] == "GET" and "/blobs/sha256/" in e["path"]]


def puts(proxy, prefix):
    """The keys PUT under PREFIX through the proxy, less copies of an object onto itself (a refresh)."""
    return sorted(e["key"][len(prefix):] for e in proxy.log if e["method"] == "PUT" and e["key"].startswith(prefix)
                  and (e["headers"].get("x-amz-copy-source") or "").lstrip("/").split("?")[0] != e["path"].lstrip("/"))


def test_copying_again_sends_nothing_new(source, base_env, rgw, fault_proxy):
    """The first copy --all into a bucket writes every manifest and referrer listing of the source
    (and the images, blobs and tags); the same copy again writes the tags and nothing else."""
    url, bucket = s3_target(rgw, "again")
    first = fault_proxy()
    ok(run_dogestry("copy", "--all", source.store, url, env=s3_env(base_env, rgw, first.url)))
    written = puts(first, "again/")
    assert {k for k in written if k.startswith("manifests/")} == {
        "manifests/" + k for k in list(reachable_manifests(source)) + list(manifest_files(source.store, "referrers"))
    } | {"manifests/tags/mp/single/1"}
    assert [k for k in written if k.startswith("blobs/")] and [k for k in written if k.startswith("images/")]

    again = fault_proxy()
    ok(run_dogestry("copy", "--all", source.store, url, env=s3_env(base_env, rgw, again.url)))
    assert puts(again, "again/") == ["manifests/tags/mp/single/1"] + ["repositories/" + t.replace(":", "/") for t in (
        "mp/app:1", "mp/made:1", "mp/single:1")]


@pytest.mark.parametrize("gone", ["child-manifest", "referrer-blob"])
def test_a_copy_cut_short_leaves_no_tag(gone, source, base_env, rgw, tmp_path):
    """The arm64 image's manifest, or the SBOM's blob, deleted from the source by hand: the copy
    fails with one line naming what is missing and leaves the bucket without a tag; once it is
    back, the copy completes."""
    src = writable(source, tmp_path)
    sbom = json.loads((src / "manifests" / "sha256" / source.referrers["sbom"][7:]).read_bytes())
    missing = {"child-manifest": src / "manifests" / "sha256" / source.children["linux/arm64"].digest[7:],
               "referrer-blob": src / "blobs" / "sha256" / sbom["layers"][0]["digest"][7:]}[gone]
    kept = missing.read_bytes()
    missing.unlink()
    url, bucket = s3_target(rgw)
    env = s3_env(base_env, rgw)
    one_error_line(run_dogestry("copy", src, url, "%s:1" % NAME, env=env), "sha256:" + missing.name, "nothing was")
    client = dogestry.S3Client(dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint),
                               dogestry.CredentialChain(dogestry.AwsConfig(env, "/nonexistent")),
                               dogestry.AwsConfig(env, "/nonexistent"))
    assert not [key for key, _ in client.list("mp/repositories/")]
    missing.write_bytes(kept)
    ok(run_dogestry("copy", src, url, "%s:1" % NAME, env=env))
    assert client.get("mp/repositories/mp/app/1").read().decode() == "@" + source.index


def test_an_immutable_tag_at_the_destination_refuses_the_copy_before_anything(source, tmp_path):
    """DST's mp/app:1 is immutable and names another image: the copy of the multi-platform tag fails
    with one line saying so, and writes nothing to DST."""
    dst = tmp_path / "dst"
    ok(run_dogestry("copy", source.store, dst, "mp/made:1"))
    (dst / "repositories" / "mp" / "app").mkdir(parents=True)
    made = (dst / "repositories" / "mp" / "made" / "1").read_text()
    (dst / "repositories" / "mp" / "app" / "1").write_text(made)
    ok(run_dogestry("protect", "--immutable", dst, "%s:1" % NAME))
    before = sorted(str(p) for p in dst.rglob("*"))

    one_error_line(run_dogestry("copy", source.store, dst, "%s:1" % NAME), "immutable")

    assert sorted(str(p) for p in dst.rglob("*")) == before
    assert (dst / "repositories" / "mp" / "app" / "1").read_text() == made
