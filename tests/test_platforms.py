"""Platforms: what --platform means, which image of a multi-platform tag runs where, and how the
engine's own platform is read (GET /version; GET /info for 32-bit arm).

A host of another architecture cannot run here, so the engine's platform is tested against the real
engine's answers with their Arch (Architecture) field changed, as the issue allows."""

import json
import os

import pytest

import dogestry
from multiplatform import Buildah, image_platform, platform_context
from realdocker import docker_cli, image_id, loopback_addresses, ok, run_dogestry
from serverkit import PORT

P = dogestry.parse_platform


# === --platform and matching ======================================================================

@pytest.mark.parametrize("text, expected", [
    ("linux/amd64", ("linux", "amd64", "")),
    ("linux/arm64/v8", ("linux", "arm64", "v8")),
    ("linux/arm/v7", ("linux", "arm", "v7")),
    ("arm64", ("linux", "arm64", "")),
    ("linux/x86_64", ("linux", "amd64", "")),
    ("Linux/AARCH64", ("linux", "arm64", "")),
    ("linux/armhf", ("linux", "arm", "v7")),
    ("windows/amd64", ("windows", "amd64", "")),
])
def test_platform_arguments_are_read_with_the_usual_spellings(text, expected):
    assert tuple(P(text)) == expected


@pytest.mark.parametrize("text", ["", "/", "linux/", "linux/arm/v7/x", "linux/a b", "linux/../x", "a" * 40])
def test_a_bad_platform_is_a_usage_error(text):
    with pytest.raises(dogestry.UsageError, match="invalid platform"):
        P(text)


def test_a_bad_platform_on_the_command_line_is_one_error_line_the_usage_and_exit_2(tmp_path):
    proc = run_dogestry("pull", str(tmp_path), "app:1", "--platform", "linux//x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dogestry: error: argument -platform/--platform: invalid platform 'linux//x': expected os/arch[/variant],"
        " such as linux/amd64 or linux/arm64", "usage: dogestry pull STORE IMAGE[:TAG]..."]


def entries(*platforms):
    return [dogestry.IndexEntry("sha256:%064x" % i, dogestry.OCI_MANIFEST, 500, P(p))
            for i, p in enumerate(platforms)]


def test_the_exact_platform_is_chosen_and_default_variants_are_the_same_platform():
    offered = entries("linux/amd64", "linux/arm64/v8", "linux/arm/v7")
    assert dogestry.choose_platform(offered, P("linux/arm64"), "x").platform == P("linux/arm64/v8")
    assert dogestry.choose_platform(offered, P("linux/arm"), "x").platform == P("linux/arm/v7")
    assert dogestry.choose_platform(offered, P("linux/amd64/v1"), "x").platform == P("linux/amd64")


def test_a_newer_cpu_runs_the_closest_older_variant_but_never_a_newer_one():
    offered = entries("linux/arm/v5", "linux/arm/v6", "linux/amd64/v2", "linux/amd64/v4")
    assert dogestry.choose_platform(offered, P("linux/arm/v7"), "x").platform == P("linux/arm/v6")
    assert dogestry.choose_platform(offered, P("linux/amd64/v3"), "x").platform == P("linux/amd64/v2")
    with pytest.raises(dogestry.NoMatchingPlatform):
        dogestry.choose_platform(entries("linux/arm/v7"), P("linux/arm/v6"), "x")


def test_no_fitting_platform_names_every_platform_the_tag_has():
    with pytest.raises(dogestry.NoMatchingPlatform) as caught:
        dogestry.choose_platform(entries("linux/arm64", "linux/amd64", "linux/arm64"), P("linux/s390x"), "app:1 in S")
    assert str(caught.value) == ("app:1 in S has no image for linux/s390x; it has linux/amd64, linux/arm64"
                                 " (choose one with --platform)")


# === the engine's platform ========================================================================

def engine(docker_host):
    return dogestry.DockerClient(dogestry.docker_endpoint(docker_host, {}, os.path.expanduser("~")))


def test_the_engine_platform_is_the_real_engines_os_and_arch(docker_host):
    client = engine(docker_host)
    arch = docker_cli(docker_host, "version", "-f", "{{.Server.Arch}}").stdout.strip()
    assert client.platform() == ("linux", arch, "")


def test_an_arm64_engine_answer_is_linux_arm64(docker_host):
    client = engine(docker_host)
    version = dict(client.version(), Arch="arm64")
    assert dogestry.engine_platform(version, lambda: pytest.fail("/info is asked only for arm")) == P("linux/arm64")


def test_a_32_bit_arm_engine_takes_its_variant_from_info(docker_host):
    client = engine(docker_host)
    version, info = dict(client.version(), Arch="arm"), client.json("GET", "/info")
    assert dogestry.engine_platform(version, lambda: dict(info, Architecture="armv6l")) == P("linux/arm/v6")
    assert dogestry.engine_platform(version, lambda: dict(info, Architecture="armv7l")) == P("linux/arm/v7")


def test_an_engine_that_names_no_arch_is_an_error_that_suggests_platform(docker_host):
    client = engine(docker_host)
    version = {k: v for k, v in client.version().items() if k != "Arch"}
    with pytest.raises(dogestry.DockerError, match="use --platform"):
        dogestry.engine_platform(version, dict)


# === pull picks the platform of a multi-platform tag ==============================================

HOSTS = loopback_addresses(1)
PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")


@pytest.fixture(scope="module")
def pushed_list(tmp_path_factory):
    """A buildah manifest list of three platforms (each a different file, so different layers)."""
    work = tmp_path_factory.mktemp("platforms")
    buildah = Buildah(work / "buildah")
    name = "plat-list"
    buildah.run("manifest", "create", name)
    for platform in PLATFORMS:
        context = platform_context(work / platform.replace("/", "-"), "built for %s\n" % platform)
        buildah.build(context, platform, manifest=name)
    return buildah, name


@pytest.fixture
def store_with_index(pushed_list, servers, base_env, tmp_path):
    """A directory store whose tag plat/app:1 is the three-platform index, pushed by buildah through
    `dogestry -server STORE`; returns (store, {platform: the config digest of its image})."""
    buildah, name = pushed_list
    store = tmp_path / "store"
    store.mkdir()
    servers(HOSTS[0], base_env, store=str(store), args=["-anonymous-push"])
    buildah.push_list(name, "docker://%s:%d/plat/app:1" % (HOSTS[0], PORT), "--tls-verify=false")
    configs = {}
    index_hex = (store / "repositories" / "plat" / "app" / "1").read_text().strip()[len("@sha256:"):]
    for entry in json.loads((store / "manifests" / "sha256" / index_hex).read_bytes())["manifests"]:
        p = entry["platform"]
        key = "/".join(x for x in (p["os"], p["architecture"], p.get("variant")) if x)
        child = (store / "manifests" / "sha256" / entry["digest"][7:]).read_bytes()
        configs[key] = json.loads(child)["config"]["digest"]
    return store, configs


def test_pull_gives_the_engine_its_own_platform_and_platform_overrides(store_with_index, docker_host, base_env):
    store, configs = store_with_index
    env = dict(base_env, DOCKER_HOST=docker_host)
    tag = "plat/app:1"
    docker_cli(docker_host, "rmi", "-f", tag, check=False)
    arch = docker_cli(docker_host, "version", "-f", "{{.Server.Arch}}").stdout.strip()
    pulled = ok(run_dogestry("pull", str(store), tag, env=env))
    assert image_id(docker_host, tag) == configs["linux/" + arch]
    assert "pulled plat/app:1 for linux/%s" % arch in pulled.stderr
    for platform in ("linux/arm64", "linux/arm/v7"):
        ok(run_dogestry("pull", "--platform", platform, str(store), tag, env=env))
        assert image_id(docker_host, tag) == configs[platform]
        assert image_platform(docker_host, tag) == platform


def test_pull_of_a_platform_the_tag_lacks_fails_naming_the_platforms_it_has(store_with_index, docker_host, base_env):
    store, _ = store_with_index
    before = sorted(docker_cli(docker_host, "images", "-a", "-q", "--no-trunc").stdout.split())
    proc = run_dogestry("pull", str(store), "plat/app:1", "--platform", "linux/s390x",
                        env=dict(base_env, DOCKER_HOST=docker_host))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "dogestry: error: plat/app:1 in %s has no image for linux/s390x; it has linux/amd64, linux/arm/v7,"
        " linux/arm64 (choose one with --platform)" % store]
    assert sorted(docker_cli(docker_host, "images", "-a", "-q", "--no-trunc").stdout.split()) == before


def test_pull_platform_of_a_single_image_of_another_platform_is_refused_as_docker_does(docker_host, base_env,
                                                                                       tmp_path):
    """A tag that holds one image: --platform naming its platform pulls it, another is refused
    (docker pull --platform refuses an image of another platform too) and nothing is loaded."""
    from realdocker import build_image
    env = dict(base_env, DOCKER_HOST=docker_host)
    store = tmp_path / "store"
    store.mkdir()
    image = build_image(docker_host, "plat/single:1", [{"single.txt": b"one platform\n"}], workdir=tmp_path)
    arch = docker_cli(docker_host, "version", "-f", "{{.Server.Arch}}").stdout.strip()
    ok(run_dogestry("push", str(store), "plat/single:1", env=env))
    docker_cli(docker_host, "rmi", "-f", image)
    other = "linux/s390x" if arch != "s390x" else "linux/amd64"
    proc = run_dogestry("pull", "--platform", other, str(store), "plat/single:1", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "dogestry: error: plat/single:1 in %s is an image for linux/%s only, not %s" % (store, arch, other))
    assert docker_cli(docker_host, "inspect", image, check=False).returncode != 0
    ok(run_dogestry("pull", "--platform", "linux/" + arch, str(store), "plat/single:1", env=env))
    assert image_id(docker_host, "plat/single:1") == image
