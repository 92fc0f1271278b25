"""The command line as people type it: the options of every command go before or after the
command, a usage error shows the command's usage line, `list` of a store with no tags points at
the stores right below it, and `dogestry -server` says at start what it serves and to whom."""

import urllib.parse

import pytest

import dogestry
from conftest import make_bucket
from realdocker import build_image, docker_cli, image_id, loopback_addresses, ok, run_dogestry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_image(docker_host):
    return build_image(docker_host, "dgcli/app:1", [{"etc/app.conf": b"command line\n"}])


# --- global options after the command ------------------------------------------------------------

def test_every_commands_options_also_go_after_the_command(small_image, docker_env, tmp_path):
    """`push STORE IMAGE -tempdir DIR`, `list STORE -config FILE -lockfile PATH -q`: the options of
    every command work after it as before it."""
    store, spool, lock = tmp_path / "store", tmp_path / "spool", tmp_path / "lock"
    spool.mkdir()
    config = tmp_path / "dogestry.cfg"
    config.write_text('[remote "team"]\nurl = %s\n' % store)

    ok(run_dogestry("push", store, "dgcli/app:1", "-tempdir", spool, "-use-metaservice", "-q", env=docker_env))
    listed = ok(run_dogestry("list", "team", "-config", config, "--lockfile", lock, "-q", env=docker_env))

    assert listed.stdout.splitlines()[1].split() == ["dgcli/app", "1", small_image[7:19]]
    assert lock.exists()


def test_pull_takes_the_fleet_options_after_the_command_too(docker_host, docker_env, tmp_path):
    """`pull STORE IMAGE -pullhosts H -force-local -host-timeout S`, and the original's
    `-pullhosts H STORE IMAGE` form with an option of every command after it."""
    pulled = build_image(docker_host, "dgcli/pulled:1", [{"etc/pulled.conf": b"fleet options\n"}])
    store = tmp_path / "store"
    ok(run_dogestry("push", store, "dgcli/pulled:1", env=docker_env))
    docker_cli(docker_host, "rmi", "dgcli/pulled:1")

    ok(run_dogestry("pull", store, "dgcli/pulled:1", "-pullhosts", docker_host, "-force-local", "-host-timeout",
                    "30", "-disable-checks", env=docker_env))
    assert image_id(docker_host, "dgcli/pulled:1") == pulled

    docker_cli(docker_host, "rmi", "dgcli/pulled:1")
    ok(run_dogestry("-pullhosts", docker_host, store, "dgcli/pulled:1", "-tempdir", tmp_path, "-q", env=docker_env))
    assert image_id(docker_host, "dgcli/pulled:1") == pulled


# --- usage errors ----------------------------------------------------------------------------------

PUSH_USAGE = "usage: dogestry push STORE IMAGE[:TAG]... [--multi-platform | --single-platform]"


@pytest.mark.parametrize("argv, lines", [
    (["push", "hipache"], ["dogestry: error: the following arguments are required: IMAGE", PUSH_USAGE]),
    (["push", "store", "hipache", "-frobnicate"], ["dogestry: error: unrecognized arguments: -frobnicate",
                                                   PUSH_USAGE]),
    (["list"], ["dogestry: error: the following arguments are required: STORE", "usage: dogestry list STORE"]),
    (["gc", "store", "--grace"], ["dogestry: error: argument -grace/--grace: expected one argument",
                                  "usage: dogestry gc STORE [--grace DURATION] [--dry-run]"]),
    ([], ["dogestry: error: no command given (try 'dogestry help')", "usage: dogestry [OPTIONS] COMMAND [arg...]"]),
], ids=["missing-image", "unknown-option", "missing-store", "option-without-value", "no-command"])
def test_a_usage_error_is_one_error_line_then_the_commands_usage_line(argv, lines, tmp_path):
    proc = run_dogestry(*argv, cwd=str(tmp_path))

    assert proc.returncode == 2
    assert proc.stderr.splitlines() == lines
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_an_unknown_command_is_followed_by_dogestrys_usage_line(tmp_path):
    proc = run_dogestry("frobnicate", cwd=str(tmp_path))

    assert proc.returncode == 2
    error, usage = proc.stderr.splitlines()
    assert error.startswith("dogestry: error: argument COMMAND: invalid choice: 'frobnicate' (choose from 'push',")
    assert usage == "usage: dogestry [OPTIONS] COMMAND [arg...]"


# --- list: the stores below a store with no tags -------------------------------------------------

def test_list_of_a_directory_holding_stores_names_them(small_image, docker_env, tmp_path):
    """Images pushed to stores/team and stores/ci: `list stores` prints its (empty) table and one
    line on stderr naming team/ and ci/ (and not other/, which holds no store); once stores itself
    has a tag, no such line."""
    stores = tmp_path / "stores"
    for name in ("team", "ci"):
        ok(run_dogestry("push", stores / name, "dgcli/app:1", "-q", env=docker_env))
    (stores / "other").mkdir()

    proc = ok(run_dogestry("list", stores, env=docker_env))

    assert proc.stdout == "REPOSITORY   TAG   IMAGE ID\n"
    assert proc.stderr == ("dogestry: no tags at the top of %s, but stores below it: ci/, team/; list one with "
                           "'dogestry list %s/ci/'\n" % (stores, stores))
    ok(run_dogestry("push", stores, "dgcli/app:1", "-q", env=docker_env))
    assert ok(run_dogestry("list", stores, env=docker_env)).stderr == ""


def s3_store(rgw, bucket, prefix=""):
    """An in-process S3Store straight to radosgw (no proxy)."""
    env = {"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, prefix, "us-east-1", rgw.endpoint)
    return dogestry.S3Store(location, dogestry.S3Client(location, dogestry.CredentialChain(config), config))


def test_list_of_a_bucket_whose_images_sit_under_a_prefix_names_the_prefix(small_image, s3_env, rgw, fault_proxy):
    """On radosgw: an image pushed to s3://BUCKET/team/, and 11 other prefixes that hold no store;
    `list s3://BUCKET/` names team/ with a bounded look: one delimited listing and one listing of
    at most one key for each of the first 8 prefixes (team/ among them), no more."""
    bucket = make_bucket(rgw, "dgcli-" + urllib.parse.quote(small_image[7:17]))
    ok(run_dogestry("push", "s3://%s/team/" % bucket, "dgcli/app:1", "-q", env=s3_env))
    root = s3_store(rgw, bucket)
    for n in range(11):
        root.put_bytes("z-junk%02d/readme.txt" % n, b"not a store\n")
    proxy = fault_proxy()
    url = "s3://%s/?endpoint=%s" % (bucket, urllib.parse.quote(proxy.url, safe=""))

    proc = ok(run_dogestry("list", url, env=s3_env))

    assert proc.stdout == "REPOSITORY   TAG   IMAGE ID\n"
    assert proc.stderr == ("dogestry: no tags at the top of %s, but stores below it (looked into 8 of the 12 "
                           "there): team/; list one with 'dogestry list s3://%s/team/?endpoint=%s'\n"
                           % (url, bucket, urllib.parse.quote(proxy.url, safe="")))
    queries = [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(e["target"]).query)) for e in proxy.log]
    assert [q.get("delimiter") for q in queries if "delimiter" in q] == ["/"], queries
    looked_into = [q["prefix"] for q in queries if q.get("prefix", "").endswith("/repositories/")]
    assert sorted(looked_into) == ["team/repositories/"] + ["z-junk%02d/repositories/" % n for n in range(7)]
    assert len(queries) == 2 + 1 + 8, queries  # list's own (bucket check, tags), then the hint's


# --- what the server says at start ---------------------------------------------------------------

def test_a_server_without_store_says_it_serves_no_registry_and_why(servers, docker_env):
    (address,) = loopback_addresses(1)
    server = servers(address, docker_env)

    lines = server.stdout.splitlines()
    assert lines[0].startswith("dogestry server %s listening on %s:%d over plain HTTP (Docker at %s;"
                               % (dogestry.__version__, address, server.port, docker_env["DOCKER_HOST"]))
    assert lines[1:3] == [
        "  Docker API: docker pull into %s, from any S3 bucket a client has keys for" % docker_env["DOCKER_HOST"],
        "  registry API: off (no STORE given; 'dogestry -server STORE' serves it at /v2/)"]


def test_a_server_with_a_store_names_its_registry_and_its_users(servers, docker_env, tmp_path):
    """-htpasswd with three users (two may push, one may delete, one logs in by certificate only)
    and -anonymous-push: the start-up lines say so, and the registry answers at /v2/."""
    store = tmp_path / "store"
    store.mkdir()
    htpasswd = tmp_path / "htpasswd"
    hashed = dogestry.password_hash("secret", iterations=1000)
    htpasswd.write_text("ci:%s:pull,push\nbot:*:push,delete\ndeploy:%s\n" % (hashed, hashed))
    (address,) = loopback_addresses(1)
    server = servers(address, docker_env, store=store, args=["-htpasswd", htpasswd, "-anonymous-push"])

    lines = server.stdout.splitlines()
    assert " over plain HTTP " in lines[0]
    assert lines[1:3] == [
        "  Docker API: docker pull into %s, from %s (and prefixes under it)" % (docker_env["DOCKER_HOST"], store),
        "  registry API: /v2/ for %s; 3 users of -htpasswd %s (2 may push, 1 may delete, 1 by client "
        "certificate only); -anonymous-push: every user may push" % (store, htpasswd)]


def test_a_registry_without_users_says_who_may_pull_and_push(servers, docker_env, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (address,) = loopback_addresses(1)
    server = servers(address, docker_env, store=store)

    assert server.stdout.splitlines()[2] == (
        "  registry API: /v2/ for %s; anyone who reaches the port may pull, nobody may push (no -htpasswd "
        "users, no -anonymous-push)" % store)


def test_a_registry_with_one_user_says_user_not_users(servers, docker_env, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ci:%s:pull,push\n" % dogestry.password_hash("secret", iterations=1000))
    (address,) = loopback_addresses(1)
    server = servers(address, docker_env, store=store, args=["-htpasswd", htpasswd])

    assert server.stdout.splitlines()[2] == (
        "  registry API: /v2/ for %s; 1 user of -htpasswd %s (1 may push, 0 may delete)" % (store, htpasswd))
