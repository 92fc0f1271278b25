"""Real images of other platforms, made here without emulation: buildah builds FROM scratch + COPY
images for any --arch (nothing runs), pushes them as manifest lists into registries and OCI
archives, and as docker-archives that dockerd loads (dockerd keeps a foreign image as it is)."""

import json
import shutil
import subprocess
from pathlib import Path

from conftest import skip_or_fail
from realdocker import docker_cli, write_context


class Buildah:
    """buildah with its own storage under workdir (vfs: no privileges or overlay needed)."""

    def __init__(self, workdir):
        if not shutil.which("buildah"):
            skip_or_fail("buildah not installed (apt-get install buildah)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def run(self, *args, check=True):
        proc = subprocess.run(["buildah", "--storage-driver", "vfs", "--root", str(self.workdir / "root"),
                               "--runroot", str(self.workdir / "run")] + [str(a) for a in args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def build(self, context, platform, tag=None, manifest=None):
        """Build the context's Dockerfile for platform ("linux/arm64", "linux/arm/v7"); return the image ID."""
        _, arch, *variant = platform.split("/")
        args = ["build", "-q", "--arch", arch] + (["--variant", variant[0]] if variant else [])
        args += (["-t", tag] if tag else []) + (["--manifest", manifest] if manifest else [])
        return self.run(*args, "-f", Path(context) / "Dockerfile", context).stdout.strip().splitlines()[-1]

    def manifest_list(self, name, context, platforms):
        """A manifest list NAME holding an image of the context for each platform."""
        self.run("manifest", "create", name)
        for platform in platforms:
            self.build(context, platform, manifest=name)
        return name

    def oci_archive(self, name, path, ref="app:1"):
        """Write manifest list NAME with all its images as an OCI archive (its index.json names the index as ref)."""
        self.run("manifest", "push", "-q", "--all", name, "oci-archive:%s:%s" % (path, ref))
        return Path(path)

    def push_list(self, name, destination, *options):
        """buildah manifest push --all NAME DESTINATION (docker://host/repo:tag); return the digest pushed."""
        digest_file = self.workdir / "digest"
        self.run("manifest", "push", "--all", "--digestfile", digest_file, *options, name, destination)
        return digest_file.read_text().strip()


def platform_context(path, text, files=None):
    """A FROM scratch + COPY context whose one layer holds hello.txt = text (and files)."""
    layer = {"hello.txt": text.encode() if isinstance(text, str) else text}
    layer.update(files or {})
    return write_context(Path(path), [layer])


def load_platform_image(docker_host, buildah, context, platform, tag):
    """Build the context for platform and load it into dockerd as tag; return its image ID there."""
    image = buildah.build(context, platform)
    archive = buildah.workdir / ("%s.tar" % image[:12])
    buildah.run("push", "-q", image, "docker-archive:%s:%s" % (archive, tag))
    docker_cli(docker_host, "load", "-q", "-i", str(archive))
    archive.unlink()
    return docker_cli(docker_host, "inspect", "-f", "{{.Id}}", tag).stdout.strip()


def image_platform(docker_host, tag):
    """os/architecture[/variant] of an image in dockerd, from its config."""
    doc = json.loads(docker_cli(docker_host, "image", "inspect", tag).stdout)[0]
    return "/".join(p for p in (doc.get("Os"), doc.get("Architecture"), doc.get("Variant")) if p)
