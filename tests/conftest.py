"""Shared pytest fixtures and hooks: one real dockerd per session, fleets, CI skip policy."""

import os
import shutil
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dogestry.py

from realdocker import (  # noqa: F401  (re-exported for tests that import from conftest)
    DockerdError, DockerdHandle, build_image, client_env, docker_cli, find_docker,
    image_layers, inspect_image, is_ci, random_bytes, remove_tree, run_dogestry, start_dockerd, stop_all,
    text_bytes,
)

_SKIPPED = []


def skip_or_fail(reason):
    """Skip with REASON locally; fail hard when CI=true (a skip there hides a missing part)."""
    if is_ci():
        pytest.fail("CI=true, refusing to skip: %s" % reason, pytrace=False)
    pytest.skip(reason)


def pytest_configure(config):
    """Register our markers."""
    config.addinivalue_line("markers", "integration: needs a real dockerd (and maybe other daemons)")


def pytest_runtest_logreport(report):
    """Remember skipped tests (not xfails) for the CI check."""
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """When CI=true, any skipped test fails the session."""
    if is_ci() and _SKIPPED and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Explain why a CI session with skips failed."""
    if is_ci() and _SKIPPED:
        terminalreporter.section("CI skip policy", sep="=", red=True, bold=True)
        terminalreporter.line("integration tests were skipped in CI (%d skipped); failing the run:"
                              % len(_SKIPPED), red=True)
        for nodeid in _SKIPPED:
            terminalreporter.line("  " + nodeid)


def _start_or_skip(workdir, tcp_address=None):
    """start_dockerd(), turning a failure into skip_or_fail()."""
    try:
        return start_dockerd(workdir, tcp_address)
    except DockerdError as e:
        reason = "cannot start dockerd: %s" % e
    skip_or_fail(reason)


@pytest.fixture(scope="session")
def docker_host():
    """DOCKER_HOST of a real daemon: $DOCKER_HOST if set, else one dockerd for the session."""
    if not find_docker():
        skip_or_fail("docker CLI not found on PATH (install docker.io)")
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]
        return
    workdir = tempfile.mkdtemp(prefix="dgst", dir="/tmp")
    try:
        handle = _start_or_skip(workdir)
        try:
            yield handle.host
        finally:
            handle.stop()
    finally:
        remove_tree(workdir)


@pytest.fixture
def docker_env(docker_host):
    """Copy of os.environ for subprocesses: DOCKER_HOST=the fixture host, DOCKER_BUILDKIT=0."""
    return client_env(docker_host)


@pytest.fixture
def dockerd_fleet(tmp_path):
    """Factory: start(tcp_address=None) -> ready DockerdHandle; all are stopped after the test."""
    handles = []

    def start(tcp_address=None):
        """Start one more dockerd in its own dir under tmp_path."""
        handle = _start_or_skip(tmp_path / ("dockerd%d" % len(handles)), tcp_address)
        handles.append(handle)
        return handle

    yield start
    stop_all(handles)


@pytest.fixture(scope="session")
def rgw():
    """A real, signature-checking S3: a one-node Ceph cluster with radosgw, for the session."""
    from radosgw import RadosGWError, start_radosgw
    if not shutil.which("radosgw"):
        skip_or_fail("radosgw not installed (apt-get install radosgw ceph-mon ceph-osd)")
    try:
        gw = start_radosgw(None)
    except RadosGWError as e:
        skip_or_fail("cannot start radosgw: %s" % e)
    try:
        yield gw
    finally:
        gw.stop()


def make_bucket(gw, name):
    """Create a bucket on the test radosgw (no location body: radosgw refuses AWS region names)."""
    import dogestry
    env = {"AWS_ACCESS_KEY_ID": gw.access_key, "AWS_SECRET_ACCESS_KEY": gw.secret_key}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(name, "", "us-east-1", gw.endpoint)
    dogestry.S3Client(location, dogestry.CredentialChain(config), config).request("PUT").read()
    return name


@pytest.fixture
def bucket(rgw):
    """A fresh, empty bucket."""
    return make_bucket(rgw, "dgtest-" + uuid.uuid4().hex[:12])


@pytest.fixture
def s3_env(rgw, docker_env, tmp_path):
    """Environment for dogestry against radosgw: keys in AWS_* variables, nothing else AWS-ish."""
    env = {k: v for k, v in docker_env.items() if not k.startswith("AWS_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY=rgw.secret_key,
               AWS_ENDPOINT_URL=rgw.endpoint, AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.fixture
def fault_proxy(rgw):
    """Factory: start(rule=None) -> a running FaultProxy in front of radosgw that records every
    request (and injects the faults `rule` asks for); all are stopped after the test."""
    from faultproxy import FaultProxy, started_servers
    with started_servers(lambda rule=None: FaultProxy(rgw.endpoint, rule)) as start:
        yield start


@pytest.fixture
def servers(tmp_path):
    """Factory: start(address, env, store=None, **kw) -> a ready Server; all are stopped after
    the test, and none may have printed a traceback."""
    started = []

    def start(address, env, store=None, **kw):
        from serverkit import Server
        server = Server(address, env, tmp_path, store, **kw)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.stop(timeout=5.0)
    for server in started:
        server.assert_no_traceback()


@pytest.fixture(scope="module")
def fleet(request, docker_host):
    """A dockerd for each address in the test module's HOSTS: a 'host' with a unix socket and
    tcp://HOST:2375 (test_fleet.py has a fleet of its own)."""
    from serverkit import started_dockerds
    try:
        with started_dockerds(["%s:2375" % a for a in request.module.HOSTS]) as handles:
            yield handles
    except DockerdError as e:
        skip_or_fail("cannot start dockerd: %s" % e)


@pytest.fixture(scope="module")
def base_env(docker_host, tmp_path_factory):
    """Environment without AWS or docker-config settings, HOME in a temp dir."""
    env = {k: v for k, v in client_env(docker_host).items() if not k.startswith("AWS_") and k != "DOCKER_CONFIG"}
    env["HOME"] = str(tmp_path_factory.mktemp("home"))
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: make(size) -> a fresh tmpfs of SIZE ('2m'): a disk that fills up (the suite runs
    as root, as dockerd needs); all are unmounted after the test."""
    import subprocess
    mounts = []

    def make(size):
        mount_point = tmp_path / ("tmpfs%d" % len(mounts))
        mount_point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(mount_point)], check=True)
        mounts.append(mount_point)
        return mount_point

    yield make
    for mount_point in mounts:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)
