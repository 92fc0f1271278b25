"""Multi-platform stores made through the registry API of a real `dogestry -server`, as buildah and
docker buildx push: blobs uploaded, each platform's image manifest and buildx's attestation manifests
pushed by digest, then the image index by tag; artifacts (signatures, SBOMs) whose subject is the
index or one of its images pushed by digest.  Layers and configs are made here, so that images can
share layers exactly (a base layer under every platform) and dockerd loads what a pull gives it."""

import gzip
import hashlib
import io
import json
import os
import tarfile
import types
from pathlib import Path

import dogestry
from serverkit import PORT, call

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY = b"{}"  # the OCI empty descriptor's blob: an artifact's config
IN_TOTO = "application/vnd.in-toto+json"


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(files):
    """A gzip layer holding FILES ({name: bytes}), the same bytes every time: (blob, diffID)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as z:
        z.write(raw.getvalue())
    return packed.getvalue(), sha(raw.getvalue())


class Pushed(types.SimpleNamespace):
    """A manifest pushed: data, digest, media_type (and, for an image, config: its image ID)."""

    @property
    def hex(self):
        return self.digest[7:]

    def descriptor(self, **extra):
        return dict({"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}, **extra)


class Pusher:
    """A registry client of the server at ADDRESS (pushing anonymously: -anonymous-push) into NAME."""

    def __init__(self, address, name="mp/app", port=PORT):
        self.address, self.name, self.port = address, name, port

    def blob(self, data):
        """A monolithic upload (POST ?digest=); returns the digest."""
        answer = call(self.address, "POST", "/v2/%s/blobs/uploads/?digest=%s" % (self.name, sha(data)),
                      {"Content-Type": "application/octet-stream"}, data, port=self.port)
        assert answer.status == 201, answer
        return sha(data)

    def manifest(self, data, media_type, reference=None, name=None):
        """PUT a manifest under a tag, or (default) its digest; returns it as Pushed."""
        answer = self.put(data, media_type, reference, name)
        assert answer.status == 201, answer
        return Pushed(data=data, digest=sha(data), media_type=media_type)

    def put(self, data, media_type, reference=None, name=None):
        """PUT a manifest; the server's answer."""
        return call(self.address, "PUT", "/v2/%s/manifests/%s" % (name or self.name, reference or sha(data)),
                    {"Content-Type": media_type}, data, port=self.port)

    def fetch(self, reference, media_type=dogestry.OCI_MANIFEST, name=None):
        """GET a manifest (Accept: MEDIA_TYPE) as Pushed."""
        answer = call(self.address, "GET", "/v2/%s/manifests/%s" % (name or self.name, reference),
                      {"Accept": media_type}, port=self.port)
        assert answer.status == 200, answer
        return Pushed(data=answer.body, digest=sha(answer.body), media_type=answer.headers.getheader("Content-Type"))

    def image(self, platform, layers, reference=None, name=None):
        """An image of PLATFORM ("linux/arm/v7") with LAYERS [(blob, diffID)], pushed as buildah does
        (layers, config, manifest); its config (image ID) is .config."""
        os_name, arch, *variant = platform.split("/")
        config = {"architecture": arch, "os": os_name, "config": {"Cmd": ["/hello"]},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
                  "history": [{"created_by": "COPY layer %d" % n} for n in range(len(layers))]}
        if variant:
            config["variant"] = variant[0]
        config_data = json.dumps(config, sort_keys=True).encode()
        for blob, _ in layers:
            self.blob(blob)
        self.blob(config_data)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST,
            "config": {"mediaType": dogestry.OCI_CONFIG, "digest": sha(config_data), "size": len(config_data)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha(blob), "size": len(blob)} for blob, _ in layers]},
            indent=2).encode()
        pushed = self.manifest(manifest, dogestry.OCI_MANIFEST, reference, name)
        pushed.config, pushed.platform, pushed.layers = sha(config_data), platform, [sha(b) for b, _ in layers]
        return pushed

    def attestation(self, subject):
        """buildx's provenance attestation manifest about image SUBJECT (an in-toto statement layer;
        its index descriptor says platform unknown/unknown and names the subject in annotations)."""
        statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "predicateType":
                                "https://slsa.dev/provenance/v0.2", "subject": [
                                    {"name": "_", "digest": {"sha256": subject.hex}}], "predicate": {}}).encode()
        config = json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [sha(statement)]}}).encode()
        self.blob(statement)
        self.blob(config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST,
            "config": {"mediaType": dogestry.OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": IN_TOTO, "digest": sha(statement), "size": len(statement),
                        "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}}]}).encode()
        pushed = self.manifest(manifest, dogestry.OCI_MANIFEST)
        pushed.blobs, pushed.about = [sha(config), sha(statement)], subject  # no subject field: not a referrer
        return pushed

    def artifact(self, subject, artifact_type, payload=None):
        """An OCI artifact (a signature, an SBOM: PAYLOAD as its one layer) whose subject is SUBJECT."""
        self.blob(EMPTY)
        layers = []
        if payload is not None:
            self.blob(payload)
            layers = [{"mediaType": artifact_type, "digest": sha(payload), "size": len(payload)}]
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": dogestry.OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(EMPTY), "size": 2},
            "layers": layers, "subject": subject.descriptor()}).encode()
        pushed = self.manifest(manifest, dogestry.OCI_MANIFEST)
        pushed.blobs, pushed.subject = [sha(payload)] if payload is not None else [], subject
        return pushed

    def index(self, reference, images, attestations=(), media_type=dogestry.OCI_INDEX, name=None):
        """An image index of IMAGES (each with its platform) and ATTESTATIONS, pushed under tag REFERENCE."""
        data = self.index_document(images, attestations, media_type)
        pushed = self.manifest(data, media_type, reference, name)
        pushed.images, pushed.attestations = list(images), list(attestations)
        return pushed

    @staticmethod
    def index_document(images, attestations=(), media_type=dogestry.OCI_INDEX):
        """The bytes of an image index of IMAGES and ATTESTATIONS."""
        entries = []
        for image in images:
            os_name, arch, *variant = image.platform.split("/")
            platform = dict({"os": os_name, "architecture": arch}, **({"variant": variant[0]} if variant else {}))
            entries.append(image.descriptor(platform=platform))
        for attestation in attestations:
            entries.append(attestation.descriptor(
                platform={"os": "unknown", "architecture": "unknown"},
                annotations={"vnd.docker.reference.digest": attestation.about.digest,
                             "vnd.docker.reference.type": "attestation-manifest"}))
        return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, indent=2).encode()


# -- what a directory store holds for them --

def files(store):
    """Every key of a directory store."""
    return sorted(str(p.relative_to(store)) for p in Path(store).rglob("*") if p.is_file())


def age_store(store, seconds=7200, prefix=""):
    """Make every file of a directory store (under prefix) look that much older."""
    for path in Path(store, prefix).rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(str(path), (st.st_atime - seconds, st.st_mtime - seconds))


def manifest_keys(manifest):
    """The keys of a pushed manifest: itself, and its referrer record if it has a subject."""
    keys = {"manifests/sha256/" + manifest.hex}
    subject = getattr(manifest, "subject", None)
    if subject is not None:
        keys.add("manifests/referrers/%s/%s" % (subject.hex, manifest.hex))
    return keys


def image_keys(image):
    """The keys of a platform image pushed through the registry: its manifest, image record, config and layer blobs."""
    return manifest_keys(image) | {"images/%s/config.json" % image.config[7:], "images/%s/manifest.json" % image.config[7:],
                                   "blobs/sha256/" + image.config[7:]} | {"blobs/sha256/" + d[7:] for d in image.layers}


def artifact_keys(artifact):
    """The keys of an attestation or artifact: its manifest (and referrer record) and its own blobs."""
    return manifest_keys(artifact) | {"blobs/sha256/" + d[7:] for d in artifact.blobs}
