"""STORE on the command line: a directory, file:///path or s3://bucket/prefix/, and nothing that
merely looks like one of them.  A location that starts with a URL scheme dogestry does not take
whole (`s3:/bucket`, `s3:bucket`, `http://...`, `foo:bar`) is one clear error, never a directory of
that name in the current directory; such a directory is given as ./NAME."""

import functools
import http.server
import threading

import pytest

from realdocker import build_image, ok, one_error_line, run_dogestry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_image(docker_host):
    return build_image(docker_host, "dgloc/app:1", [{"etc/app.conf": b"store locations\n"}])


@pytest.mark.parametrize("store, hint", [
    ("s3:/nc-test/repo", "s3://bucket/prefix/"),
    ("s3:nc-test", "s3://bucket/prefix/"),
    ("s3//nc-test", "did you mean s3://nc-test?"),
    ("http://127.0.0.1:9/bucket", "?endpoint=http://"),
    ("file:relative/dir", "file:///path"),
    ("foo:bar", "./foo:bar"),
])
def test_a_store_that_only_looks_like_a_url_is_one_error_and_writes_nothing(store, hint, small_image, docker_env,
                                                                             tmp_path):
    proc = run_dogestry("push", store, "dgloc/app:1", env=docker_env, cwd=str(tmp_path))

    one_error_line(proc, "store URL %r" % store, hint)
    assert proc.returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_a_directory_whose_name_looks_like_a_url_is_given_as_dot_slash_name(small_image, docker_env, tmp_path):
    ok(run_dogestry("push", "./s3:nc-test", "dgloc/app:1", env=docker_env, cwd=str(tmp_path)))

    assert (tmp_path / "s3:nc-test" / "repositories" / "dgloc" / "app" / "1").read_text() == small_image[7:]
    listing = ok(run_dogestry("list", "./s3:nc-test", env=docker_env, cwd=str(tmp_path))).stdout
    assert "dgloc/app" in listing


def test_upper_case_schemes_are_the_same_urls(small_image, docker_env, tmp_path):
    """URL schemes are case-insensitive (RFC 3986): FILE:///path is file:///path."""
    ok(run_dogestry("push", "FILE://%s/store" % tmp_path, "dgloc/app:1", env=docker_env))

    assert (tmp_path / "store" / "repositories" / "dgloc" / "app" / "1").read_text() == small_image[7:]


def test_a_config_file_remote_whose_name_has_a_colon_still_names_its_store(small_image, docker_env, tmp_path):
    """Remote names of -config are looked up before the location is read as one."""
    config = tmp_path / "dogestry.cfg"
    config.write_text('[remote "prod:eu"]\n  url=file://%s/store\n[remote "s3"]\n  url=%s/other\n'
                      % (tmp_path, tmp_path))

    ok(run_dogestry("-config", config, "push", "prod:eu", "dgloc/app:1", env=docker_env))
    ok(run_dogestry("-config", config, "push", "s3", "dgloc/app:1", env=docker_env))

    assert (tmp_path / "store" / "repositories" / "dgloc" / "app" / "1").read_text() == small_image[7:]
    assert (tmp_path / "other" / "repositories" / "dgloc" / "app" / "1").read_text() == small_image[7:]


# --- DOCKER_HOST (or a -pullhosts host) that is not a Docker engine ------------------------------

class _EveryPathIsAPage(http.server.BaseHTTPRequestHandler):
    """A web application that answers every path with a 200 HTML page."""

    def do_GET(self):
        body = b"<html><body>Welcome</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    """A plain file server (HTML 404 pages for what it lacks, /_ping among them)."""

    def log_message(self, *args):
        pass


@pytest.fixture(params=["file-server-404", "web-app-200"])
def web_server(request, tmp_path):
    """A real HTTP server on a random loopback port that is not a Docker engine: its tcp:// URL."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<html>hello</html>")
    handler = functools.partial(_QuietFiles, directory=str(root)) if request.param == "file-server-404" \
        else _EveryPathIsAPage
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "tcp://127.0.0.1:%d" % server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def stored_small_image(small_image, docker_env, tmp_path):
    store = tmp_path / "store"
    ok(run_dogestry("push", store, "dgloc/app:1", env=docker_env))
    return store


def test_push_to_a_docker_host_that_is_a_web_server_says_it_is_not_a_docker_engine(web_server, stored_small_image,
                                                                                    docker_env):
    proc = run_dogestry("push", stored_small_image, "dgloc/app:1", env=dict(docker_env, DOCKER_HOST=web_server))

    one_error_line(proc, "%s is not a Docker engine" % web_server, "GET /_ping answered HTTP")
    assert "html" not in proc.stderr.replace("text/html", "")


def test_pull_from_a_docker_host_that_is_a_web_server_says_it_is_not_a_docker_engine(web_server, stored_small_image,
                                                                                      docker_env):
    proc = run_dogestry("pull", stored_small_image, "dgloc/app:1", env=dict(docker_env, DOCKER_HOST=web_server))

    one_error_line(proc, "%s is not a Docker engine" % web_server, "GET /_ping answered HTTP")
    assert "html" not in proc.stderr.replace("text/html", "")


def test_pullhosts_naming_a_web_server_says_it_is_not_a_docker_engine(web_server, stored_small_image, docker_env):
    proc = run_dogestry("-pullhosts", web_server, "pull", stored_small_image, "dgloc/app:1", env=docker_env)

    line = one_error_line(proc, "%s is not a Docker engine" % web_server)
    assert line.count(web_server) == 1
