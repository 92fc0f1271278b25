"""Who may push and delete through the registry API of `dogestry -server STORE`.

-htpasswd lines are `USER:HASH[:RIGHTS[:NAMES]]`: every user may pull, push and delete are rights
of their own, NAMES limits them to repository name prefixes, and HASH `*` is a user who logs in
only with a client certificate (-tlsverify: the certificate's subject CN names the user).  Writes
are never anonymous unless -anonymous-push (which never allows deletes).

In the tests against a real server, an answer other than 401 UNAUTHORIZED and 403 DENIED (and no
server error) means the request was let through to its route (`RegistryHandler._require`);
docker's own pushes show it end to end.
"""

import base64
import http.client
import os
import uuid

import pytest

import dogestry
from realdocker import build_image, docker_cli, loopback_addresses, ok, one_error_line, run_dogestry
from serverkit import PORT, Answer, call, registry_error_code, server_env, tls_client_context
from testcerts import CLIENT_EXT, ca_dir, make_leaf, server_ext
from test_registry import CountedChecks, puller  # noqa: F401  (puller: a dockerd of this module's own)

HOSTS = loopback_addresses(1)
FAST = 1000  # PBKDF2 iterations of the tests' own hashes (any count from 1 to 10**7 is accepted)


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}


def htpasswd_of(tmp_path, users, name="htpasswd"):
    """An -htpasswd file: USERS is {user: (password or '*', ':RIGHTS[:NAMES]' or '')}."""
    path = tmp_path / name
    path.write_text("# users of the tests\n" + "".join(
        "%s:%s%s\n" % (user, "*" if password == "*" else dogestry.password_hash(password, iterations=FAST), rest)
        for user, (password, rest) in users.items()))
    return path


error_code = registry_error_code


def error_message(answer):
    return answer.json()["errors"][0]["message"]


def refused(answer, status, code, *needles):
    """ANSWER is the spec's error STATUS/CODE, its message holding every needle."""
    assert (answer.status, error_code(answer)) == (status, code), answer
    for needle in needles:
        assert needle in error_message(answer), answer


def let_through(answer):
    """ANSWER reached the route behind _require: neither refused (401, 403) nor a server error."""
    assert answer.status not in (401, 403) and answer.status < 500, answer


# === the rights a line grants (pure) ================================================================

def test_htpasswd_lines_grant_rights_within_name_prefixes(tmp_path):
    path = htpasswd_of(tmp_path, {"reader": ("r", ""), "pusher": ("p", ":push:team/,app"),
                                  "admin": ("a", ":pull,push,delete"), "cleaner": ("c", ":delete:team/app"),
                                  "robot": ("*", ":push"), "viewer": ("*", ""), "listed": ("l", "::")})
    htpasswd = dogestry.Htpasswd(str(path))
    rights = {user: (sorted(r.rights), r.names) for user, r in htpasswd.rights.items()}
    assert rights == {"reader": (["pull"], ()), "pusher": (["pull", "push"], ("team/", "app")),
                      "admin": (["delete", "pull", "push"], ()), "cleaner": (["delete", "pull"], ("team/app",)),
                      "robot": (["pull", "push"], ()), "viewer": (["pull"], ()), "listed": (["pull"], ())}


@pytest.mark.parametrize("name,prefix,within", [
    ("team/app", "team/", True), ("team/a/b", "team/", True), ("team", "team/", False),
    ("teamx/app", "team/", False), ("app", "app", True), ("app/x", "app", True), ("apple", "app", False),
    ("team/app", "team/app", True), ("team/apps", "team/app", False),
])
def test_a_name_prefix_covers_whole_components(name, prefix, within):
    """`team/` covers team/app, not team; `app` covers app and app/..., never apple."""
    assert dogestry.name_within(name, prefix) is within


@pytest.mark.parametrize("line,needle", [
    ("bob:HASH:write", "unknown right 'write'"),
    ("bob:HASH:push:Team/", "invalid repository name prefix 'Team/'"),
    ("bob:HASH:push:team/../x", "invalid repository name prefix"),
    ("bob:HASH:push:team/:more", "expected USER:HASH[:RIGHTS[:NAMES]]"),
    ("bob:secret", "expected USER:HASH[:RIGHTS[:NAMES]]"),
    ("bob", "expected USER:HASH[:RIGHTS[:NAMES]]"),
], ids=["unknown-right", "upper-case-prefix", "dot-dot-prefix", "five-fields", "plain-password", "no-hash"])
def test_a_bad_htpasswd_line_is_one_clear_error_with_its_number(line, needle, tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text("alice:%s\n%s\n" % (dogestry.password_hash("a", iterations=FAST),
                                        line.replace("HASH", dogestry.password_hash("b", iterations=FAST))))
    with pytest.raises(dogestry.UsageError) as error:
        dogestry.Htpasswd(str(path))
    assert "line 2" in str(error.value) and needle in str(error.value)
    proc = run_dogestry("-server", "-address", "127.0.0.1", "-port", "0", "-htpasswd", path, tmp_path, timeout=60)
    assert proc.returncode == 2
    one_error_line(proc, "line 2", needle)


def test_a_certificate_only_user_never_logs_in_with_a_password_and_costs_the_same_check(tmp_path):
    """HASH `*`: no password is the user's, not even '*', and checking one costs the PBKDF2 work
    of any other user's, so answer times do not tell such users apart."""
    checks = CountedChecks()
    path = htpasswd_of(tmp_path, {"robot": ("*", ":push"), "alice": ("a", "")})
    htpasswd = dogestry.Htpasswd(str(path), matches=checks)
    for password in ("*", "", "a"):
        assert htpasswd.login(basic("robot", password)["Authorization"], "10.0.0.1") is None
    assert checks.iterations == [FAST] * 3
    assert htpasswd.login(basic("alice", "a")["Authorization"], "10.0.0.2") == "alice"


# callers: (user, how they showed who they are)
READER, PUSHER, ADMIN, CLEANER = (("reader", "password"), ("pusher", "password"), ("admin", "password"),
                                  ("cleaner", "password"))
ROBOT, VISITOR, NOBODY = ("robot", "certificate"), ("visitor", "certificate"), ("", "")


@pytest.mark.parametrize("right,name,caller,users,anonymous_push,answer", [
    ("pull", "", NOBODY, False, False, None),              # no -htpasswd: anyone pulls, as before
    ("pull", "", NOBODY, True, False, 401),
    ("pull", "", READER, True, False, None),
    ("pull", "", VISITOR, True, False, None),              # a certificate holder without an entry pulls
    ("push", "team/app", NOBODY, False, False, 401),       # never anonymous...
    ("push", "team/app", NOBODY, True, False, 401),
    ("push", "team/app", NOBODY, False, True, None),       # ...unless -anonymous-push
    ("delete", "team/app", NOBODY, False, True, 401),      # which never allows deletes
    ("push", "team/app", READER, True, False, 403),
    ("push", "team/app", READER, True, True, None),        # -anonymous-push: anyone, users too
    ("delete", "team/app", READER, True, True, 403),
    ("push", "team/app", PUSHER, True, False, None),
    ("push", "team/app/x", PUSHER, True, False, None),
    ("push", "team", PUSHER, True, False, 403),            # team/ covers names under team, not team
    ("push", "other/app", PUSHER, True, False, 403),
    ("push", "app", PUSHER, True, False, None),
    ("push", "apple", PUSHER, True, False, 403),
    ("delete", "team/app", PUSHER, True, False, 403),      # deleting is a right of its own
    ("push", "other", ADMIN, True, False, None),
    ("delete", "other", ADMIN, True, False, None),
    ("delete", "team/app", CLEANER, True, False, None),
    ("delete", "team/web", CLEANER, True, False, 403),
    ("push", "team/app", CLEANER, True, False, 403),
    ("push", "x", ROBOT, True, False, None),               # a certificate's CN is a user of the file
    ("push", "x", VISITOR, True, False, 403),              # ...or, without an entry, may pull only
    ("push", "x", VISITOR, False, False, 403),             # no -htpasswd: certificate holders pull...
    ("push", "x", VISITOR, False, True, None),             # ...and push with -anonymous-push
    ("delete", "x", VISITOR, False, True, 403),
])
def test_who_may_pull_push_and_delete(right, name, caller, users, anonymous_push, answer, tmp_path):
    htpasswd = dogestry.Htpasswd(str(htpasswd_of(tmp_path, {
        "reader": ("r", ""), "pusher": ("p", ":push:team/,app"), "admin": ("a", ":push,delete"),
        "cleaner": ("c", ":delete:team/app"), "robot": ("*", ":push")}))) if users else None
    caller = dogestry.Caller(*caller)
    if answer is None:
        dogestry.registry_access(right, name, caller, htpasswd, anonymous_push)
        return
    with pytest.raises(dogestry.RegistryError) as error:
        dogestry.registry_access(right, name, caller, htpasswd, anonymous_push)
    assert (error.value.status, error.value.code) == (answer, {401: "UNAUTHORIZED", 403: "DENIED"}[answer])


# === dogestry passwd ================================================================================

def test_passwd_writes_the_rights_and_name_prefixes_of_a_user(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    line = ok(run_dogestry("passwd", "bob", "--push", "--delete", "--names", "team/, app", input="pw\n", env=env))
    user, hash_, rights, names = line.stdout.strip().split(":")
    assert (user, rights, names) == ("bob", "push,delete", "team/,app") and hash_.startswith("pbkdf2_sha256$")
    path = tmp_path / "htpasswd"
    path.write_text(line.stdout + ok(run_dogestry("passwd", "robot", "--certificate", "--push", env=env)).stdout)
    htpasswd = dogestry.Htpasswd(str(path))
    assert htpasswd.login(basic("bob", "pw")["Authorization"]) == "bob"
    assert htpasswd.rights["bob"] == dogestry.UserRights(frozenset(("pull", "push", "delete")), ("team/", "app"))
    assert htpasswd.users["robot"] == "*" and sorted(htpasswd.rights["robot"].rights) == ["pull", "push"]

    one_error_line(run_dogestry("passwd", "bob", "--names", "team/", input="pw\n", env=env), "--push or --delete")
    one_error_line(run_dogestry("passwd", "bob", "--push", "--names", "Team/", input="pw\n", env=env),
                   "invalid repository name prefix 'Team/'")


# === a real server ==================================================================================

@pytest.fixture(scope="module")
def stored(docker_host, base_env, tmp_path_factory):
    """A directory store holding team/app:1 (a small image of its own)."""
    work = tmp_path_factory.mktemp("accstore")
    build_image(docker_host, "team/app:1", [{"etc/access": uuid.uuid4().hex.encode()}], workdir=work)
    store = work / "store"
    ok(run_dogestry("push", store, "team/app:1", env=base_env))
    docker_cli(docker_host, "rmi", "team/app:1")
    return store


@pytest.fixture(scope="module")
def engine(puller):  # noqa: F811
    """A dockerd of the module's own: the docker CLI's engine for login, pull and push."""
    return puller


def serve(servers, base_env, engine, store, *args, **kw):
    """A dogestry server on HOSTS[0]:PORT serving STORE."""
    return servers(HOSTS[0], server_env(base_env, engine, ""), store=store, args=args, **kw)


def ref(name):
    return "%s:%d/%s" % (HOSTS[0], PORT, name)


def v2(method, path, headers=None):
    return call(HOSTS[0], method, path, headers)


def docker_as(engine, config, *args, input=None):
    """The docker CLI with its own config directory (its logins)."""
    return docker_cli(engine.host, "--config", str(config), *args, check=False, input=input)


def docker_login(engine, tmp_path, user, password):
    """`docker login` as USER into a fresh config directory; the directory."""
    config = tmp_path / ("docker-config-" + user)
    config.mkdir()
    logged = docker_as(engine, config, "login", "-u", user, "--password-stdin", "%s:%d" % (HOSTS[0], PORT),
                       input=password + "\n")
    assert logged.returncode == 0 and "Login Succeeded" in logged.stdout, logged
    return config


def test_a_read_only_user_logs_in_and_pulls_but_its_pushes_are_denied(stored, servers, base_env, engine, tmp_path):
    """docker login as a user of an old `USER:HASH` line (pull only): docker pull works, docker push
    is refused with 403 DENIED at its first write, and so is a delete."""
    server = serve(servers, base_env, engine, stored, "-htpasswd", htpasswd_of(tmp_path, {"reader": ("r3ad", "")}))
    config = docker_login(engine, tmp_path, "reader", "r3ad")
    pulled = docker_as(engine, config, "pull", ref("team/app:1"))
    assert pulled.returncode == 0, pulled.stderr
    docker_cli(engine.host, "tag", ref("team/app:1"), ref("team/app:2"))

    pushed = docker_as(engine, config, "push", ref("team/app:2"))

    assert pushed.returncode != 0 and "denied: user reader may not push (rights: pull)" in pushed.stderr, pushed
    writes = [entry for entry in server.access_log() if entry[1] not in ("GET", "HEAD")]
    assert writes and {status for _, _, _, status in writes} == {403}, writes
    refused(v2("DELETE", "/v2/team/app/manifests/1", basic("reader", "r3ad")), 403, "DENIED", "may not delete")
    tags = v2("GET", "/v2/team/app/tags/list", basic("reader", "r3ad"))
    assert tags.status == 200 and tags.json()["tags"] == ["1"]
    docker_cli(engine.host, "rmi", "-f", ref("team/app:1"), ref("team/app:2"), check=False)


def test_a_pushing_user_pushes_only_under_its_prefixes_and_deletes_only_with_the_right(stored, servers, base_env,
                                                                                        engine, tmp_path):
    """pusher may push under team/ (docker push succeeds), never outside it (403 DENIED: docker says
    so) and never delete; admin may delete."""
    path = htpasswd_of(tmp_path, {"pusher": ("pu5h", ":push:team/"), "admin": ("adm1n", ":push,delete")})
    serve(servers, base_env, engine, stored, "-htpasswd", path)
    config = docker_login(engine, tmp_path, "pusher", "pu5h")
    assert docker_as(engine, config, "pull", ref("team/app:1")).returncode == 0
    docker_cli(engine.host, "tag", ref("team/app:1"), ref("other/app:1"))
    docker_cli(engine.host, "tag", ref("team/app:1"), ref("team/app:2"))

    outside = docker_as(engine, config, "push", ref("other/app:1"))
    inside = docker_as(engine, config, "push", ref("team/app:2"))

    assert outside.returncode != 0 and "denied: user pusher may push only under team/, not other/app" \
        in outside.stderr, outside
    assert inside.returncode == 0, inside
    let_through(v2("POST", "/v2/team/app/blobs/uploads/", basic("pusher", "pu5h")))
    let_through(v2("PUT", "/v2/team/a/b/manifests/2", basic("pusher", "pu5h")))
    refused(v2("POST", "/v2/team/blobs/uploads/", basic("pusher", "pu5h")), 403, "DENIED", "only under team/")
    refused(v2("DELETE", "/v2/team/app/manifests/1", basic("pusher", "pu5h")), 403, "DENIED",
            "user pusher may not delete (rights: pull, push)")
    let_through(v2("DELETE", "/v2/team/app/manifests/2", basic("admin", "adm1n")))  # the tag pusher pushed
    let_through(v2("POST", "/v2/other/blobs/uploads/", basic("admin", "adm1n")))
    docker_cli(engine.host, "rmi", "-f", ref("team/app:1"), ref("team/app:2"), ref("other/app:1"), check=False)


@pytest.mark.parametrize("users", [False, True], ids=["no-users", "htpasswd"])
def test_an_anonymous_write_gets_401_with_the_basic_challenge_and_says_what_would_allow_it(users, stored, servers,
                                                                                           base_env, engine,
                                                                                           tmp_path):
    args = ["-htpasswd", htpasswd_of(tmp_path, {"pusher": ("p", ":push")})] if users else []
    serve(servers, base_env, engine, stored, *args)

    for method, path in (("POST", "/v2/team/app/blobs/uploads/"), ("PUT", "/v2/team/app/manifests/2"),
                         ("PATCH", "/v2/team/app/blobs/uploads/" + "0" * 32), ("DELETE", "/v2/team/app/manifests/1")):
        answer = v2(method, path)
        refused(answer, 401, "UNAUTHORIZED", "authentication required")
        assert answer.headers.getheader("WWW-Authenticate") == 'Basic realm="dogestry"'
        assert answer.headers.getheader("Docker-Distribution-API-Version") == "registry/2.0"
        if not users:
            assert "this server has no users (-htpasswd)" in error_message(answer), answer
    assert v2("GET", "/v2/").status == (401 if users else 200)  # pulls exactly as before
    if users:
        let_through(v2("POST", "/v2/team/app/blobs/uploads/", basic("pusher", "p")))


def test_anonymous_push_lets_anyone_push_and_nobody_delete_without_the_right(stored, servers, base_env, engine,
                                                                              tmp_path):
    """-anonymous-push alone: anyone pushes, nobody deletes.  With -htpasswd too, every request needs
    a user first (pulls do), then every user may push and only users with the right delete."""
    first = serve(servers, base_env, engine, stored, "-anonymous-push")
    let_through(v2("POST", "/v2/team/app/blobs/uploads/"))
    let_through(v2("PUT", "/v2/any/name/manifests/1"))
    refused(v2("DELETE", "/v2/team/app/manifests/1"), 401, "UNAUTHORIZED", "delete")
    first.stop()

    path = htpasswd_of(tmp_path, {"reader": ("r", ""), "admin": ("a", ":delete")})
    serve(servers, base_env, engine, stored, "-anonymous-push", "-htpasswd", path)
    refused(v2("POST", "/v2/team/app/blobs/uploads/"), 401, "UNAUTHORIZED")
    let_through(v2("POST", "/v2/team/app/blobs/uploads/", basic("reader", "r")))
    refused(v2("DELETE", "/v2/team/app/manifests/1", basic("reader", "r")), 403, "DENIED", "may not delete")
    let_through(v2("DELETE", "/v2/team/app/manifests/nosuch", basic("admin", "a")))  # 404: let through, nothing gone


# === client certificates (-tlsverify) ===============================================================

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, the server's certificate for HOSTS[0], and client certificates of CN robot and visitor."""
    d = ca_dir(tmp_path_factory, "acctls")
    make_leaf(d, "ca", "server", "/CN=%s" % HOSTS[0], server_ext("IP:%s" % HOSTS[0]))
    for user in ("robot", "visitor"):
        make_leaf(d, "ca", user, "/O=dogestry tests/CN=%s" % user, CLIENT_EXT)
    return d


def as_holder(certs, user):
    """A TLS client context showing USER's certificate."""
    return tls_client_context(certs / "ca.pem", certs / ("%s-cert.pem" % user), certs / ("%s-key.pem" % user))


def tls_call(ctx, method, path, headers=None):
    conn = http.client.HTTPSConnection(HOSTS[0], PORT, timeout=60, context=ctx)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, resp, resp.read())
    finally:
        conn.close()


def tls_args(certs):
    return ["-tlsverify", "-tlscacert", certs / "ca.pem", "-tlscert", certs / "server-cert.pem",
            "-tlskey", certs / "server-key.pem"]


def test_a_client_certificate_is_the_user_its_common_name_names(stored, servers, base_env, engine, certs, tmp_path):
    """robot (`robot:*:push:team/`) pushes under team/ with its certificate alone and can never log
    in with a password; visitor, a certificate of the CA without an entry, may pull only; a password
    login over any certificate is that user."""
    path = htpasswd_of(tmp_path, {"robot": ("*", ":push:team/"), "alice": ("a", ":push")})
    robot, visitor = as_holder(certs, "robot"), as_holder(certs, "visitor")
    serve(servers, base_env, engine, stored, "-htpasswd", path, *tls_args(certs), tls=robot)

    assert tls_call(robot, "GET", "/v2/team/app/tags/list").json()["tags"] == ["1"]
    let_through(tls_call(robot, "POST", "/v2/team/app/blobs/uploads/"))
    refused(tls_call(robot, "POST", "/v2/other/blobs/uploads/"), 403, "DENIED",
            "the certificate of robot may push only under team/")
    refused(tls_call(robot, "DELETE", "/v2/team/app/manifests/1"), 403, "DENIED", "may not delete")
    assert tls_call(visitor, "GET", "/v2/team/app/tags/list").json()["tags"] == ["1"]
    refused(tls_call(visitor, "POST", "/v2/team/app/blobs/uploads/"), 403, "DENIED",
            "the certificate of visitor may pull only: it has no entry in this server's -htpasswd")
    for password in ("*", "x"):
        answer = tls_call(visitor, "POST", "/v2/team/app/blobs/uploads/", basic("robot", password))
        refused(answer, 401, "UNAUTHORIZED", "wrong user name or password")
    let_through(tls_call(visitor, "POST", "/v2/other/blobs/uploads/", basic("alice", "a")))


def test_without_users_a_client_certificate_pulls_and_pushes_only_with_anonymous_push(stored, servers, base_env,
                                                                                       engine, certs):
    robot = as_holder(certs, "robot")
    server = serve(servers, base_env, engine, stored, *tls_args(certs), tls=robot)
    assert tls_call(robot, "GET", "/v2/team/app/tags/list").json()["tags"] == ["1"]
    refused(tls_call(robot, "POST", "/v2/team/app/blobs/uploads/"), 403, "DENIED",
            "may pull only: this server has no users (-htpasswd)")
    server.stop()

    serve(servers, base_env, engine, stored, "-anonymous-push", *tls_args(certs), tls=robot)
    let_through(tls_call(robot, "POST", "/v2/team/app/blobs/uploads/"))
    refused(tls_call(robot, "DELETE", "/v2/team/app/manifests/1"), 403, "DENIED")
