"""STORE on the command line: a directory, file:///path or s3://bucket/prefix/, and nothing that
merely looks like one of them.  A location that starts with a URL scheme dogestry does not take
whole (`s3:/bucket`, `s3:bucket`, `http://...`, `foo:bar`) is one clear error, never a directory of
that name in the current directory; such a directory is given as ./NAME."""

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
