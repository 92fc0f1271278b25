"""Where dogestry finds AWS credentials and the region (dogestry sections 7 and 8).

dogestry follows the AWS SDKs.  The first source that has credentials wins:

  1. environment: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), or the original
     dogestry's AWS_ACCESS_KEY/AWS_SECRET_KEY
  2. the shared files: [NAME] in ~/.aws/credentials, [profile NAME] in ~/.aws/config
     (NAME = AWS_PROFILE or "default"; AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE move them)
  3. web identity: STS AssumeRoleWithWebIdentity with AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN
  4. container credentials (ECS/EKS): AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI
  5. EC2 instance metadata: IMDSv2 (token PUT, then GETs), IMDSv1 when the PUT is refused;
     skipped when AWS_EC2_METADATA_DISABLED=true

`-use-metaservice` (CredentialChain(force_metadata=True)) goes straight to instance metadata.
Temporary credentials are fetched again when they are within 5 minutes of their Expiration.
The region is ?region= in the store URL, else AWS_REGION, AWS_DEFAULT_REGION, the profile's
region, us-east-1.

Three kinds of test:
  - in-process, no network: the order, the files, the region, the "nothing found" message;
  - against small HTTP servers started here on 127.0.0.1 (an ephemeral port, a thread each):
    container credentials, IMDS, STS, refresh and broken endpoints;
  - end to end (integration): `dogestry push` to a real radosgw from a real dockerd, with the
    credentials from each kind of source.

Nothing here contacts 169.254.x.x: unit tests pass CredentialChain an http function that
refuses any host but 127.0.0.1, and subprocesses get AWS_EC2_METADATA_DISABLED=true unless the
test points AWS_EC2_METADATA_SERVICE_ENDPOINT at a local server.
"""

import datetime
import io
import json
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, NamedTuple
from xml.sax.saxutils import escape as xml_escape

import pytest

import dogestry
from dogestry import AwsConfig, CredentialChain, DogestryError
from realdocker import build_image, run_dogestry

LOCAL = "127.0.0.1"
T0 = 1_800_000_000.0  # the injected "now" of refresh tests (2027-01-15)
UTC = datetime.timezone.utc
ROLE_ARN = "arn:aws:iam::123456789012:role/dogestry-ci"
IMDS_ROLE = "dogestry-instance-role"
IMDS_TOKEN = "imds-session-token-AQAEAExample=="
CREDS_PATH = "/latest/meta-data/iam/security-credentials/"


# --- helpers: time, files, a chain that may only talk to 127.0.0.1 ----------------------------

def iso(t):
    """ISO 8601 UTC, the way IMDS, ECS and STS write Expiration."""
    return datetime.datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeClock:
    """An injectable time.time."""

    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def local_only_http(url, *args, **kwargs):
    """dogestry.http_call, but a test that tries any host other than 127.0.0.1 fails loudly."""
    host = urllib.parse.urlsplit(url).hostname
    if host != LOCAL:
        raise AssertionError("the test tried to contact %s" % url)
    return dogestry.http_call(url, *args, **kwargs)


def make_chain(env, home, **kwargs):
    """A CredentialChain over ENV and HOME that can only reach 127.0.0.1."""
    kwargs.setdefault("http", local_only_http)
    return CredentialChain(AwsConfig(env, str(home)), **kwargs)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def one_line(message):
    assert "\n" not in message, message
    return message


@pytest.fixture
def home(tmp_path):
    """An empty HOME: no ~/.aws unless the test writes it."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def env():
    """The smallest environment: no credentials and instance metadata switched off."""
    return {"AWS_EC2_METADATA_DISABLED": "true"}


# --- small local HTTP endpoints ------------------------------------------------------------------

class Request(NamedTuple):
    method: str
    path: str
    headers: Dict[str, str]  # names in lower case
    body: bytes

    def form(self):
        return dict(urllib.parse.parse_qsl(self.body.decode("utf-8"), keep_blank_values=True))


class FakeEndpoint:
    """An HTTP server on 127.0.0.1:<ephemeral> in a thread: canned answers per (method, path).

    An answer is (status, body) or a function Request -> (status, body); a dict body is sent as
    JSON.  Unknown routes get 404.  Every request is recorded in .requests.
    """

    def __init__(self):
        self.routes = {}
        self.requests = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                  self.rfile.read(length) if length else b"")
                endpoint.requests.append(request)
                answer = endpoint.routes.get((self.command, self.path), (404, b"no such route"))
                status, body = answer(request) if callable(answer) else answer
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                elif isinstance(body, str):
                    body = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOCAL, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),  # poll: quick shutdown
                                       name="fake-endpoint", daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://%s:%d" % (LOCAL, self.server.server_address[1])

    def on(self, method, path, answer):
        self.routes[(method, path)] = answer
        return self

    def hits(self, path=None):
        return sum(1 for r in self.requests if path is None or r.path == path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def serve():
    """Factory: serve() -> a running FakeEndpoint; all are shut down after the test."""
    endpoints = []

    def start():
        endpoints.append(FakeEndpoint())
        return endpoints[-1]

    yield start
    for endpoint in endpoints:
        endpoint.close()


@pytest.fixture
def refused_url():
    """http://127.0.0.1:PORT where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        port = sock.getsockname()[1]
    return "http://%s:%d" % (LOCAL, port)


class Issuer:
    """Hands out temporary credentials, one set per fetch: PREFIX-1, PREFIX-2, ...

    With key/secret given (end-to-end tests: radosgw's real keys) every set has those keys.
    Each set is valid `lifetime` seconds from clock(); .issued counts the fetches.
    """

    def __init__(self, prefix="AKIDTEMP", clock=time.time, lifetime=3600.0, key=None, secret=None):
        self.prefix, self.clock, self.lifetime, self.key, self.secret = prefix, clock, lifetime, key, secret
        self.issued = 0

    def issue(self):
        self.issued += 1
        n = self.issued
        return {"Code": "Success", "Type": "AWS-HMAC", "LastUpdated": iso(self.clock()),
                "AccessKeyId": self.key or "%s-%d" % (self.prefix, n),
                "SecretAccessKey": self.secret or "secret-%s-%d" % (self.prefix, n),
                "Token": "token-%s-%d" % (self.prefix, n),
                "Expiration": iso(self.clock() + self.lifetime)}


def container_endpoint(serve, issuer, authorization=None):
    """An ECS/EKS-style credentials endpoint at /creds; with AUTHORIZATION, other callers get 401."""
    def answer(request):
        if authorization is not None and request.headers.get("authorization") != authorization:
            return 401, {"message": "unauthorized"}
        return 200, issuer.issue()
    return serve().on("GET", "/creds", answer)


def imds_endpoint(serve, issuer, token_put_status=200):
    """EC2 instance metadata.  token_put_status 200: IMDSv2 (GETs must carry the token);
    403/405: an IMDSv1-only service that refuses the token PUT (GETs need no token)."""
    v2 = token_put_status == 200

    def token(request):
        if token_put_status != 200:
            return token_put_status, b""
        if "x-aws-ec2-metadata-token-ttl-seconds" not in request.headers:
            return 400, b"missing ttl"
        return 200, IMDS_TOKEN

    def guarded(answer):
        def handle(request):
            if v2 and request.headers.get("x-aws-ec2-metadata-token") != IMDS_TOKEN:
                return 401, b""
            return answer(request)
        return handle

    return (serve().on("PUT", "/latest/api/token", token)
            .on("GET", CREDS_PATH, guarded(lambda r: (200, IMDS_ROLE + "\n")))
            .on("GET", CREDS_PATH + IMDS_ROLE, guarded(lambda r: (200, issuer.issue()))))


STS_RESPONSE = """<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:ci:dogestry</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/dogestry-ci/session</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:session</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>{Token}</SessionToken>
      <SecretAccessKey>{SecretAccessKey}</SecretAccessKey>
      <Expiration>{Expiration}</Expiration>
      <AccessKeyId>{AccessKeyId}</AccessKeyId>
    </Credentials>
    <Provider>oidc.eks.example.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
"""

STS_ERROR = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>
"""


def sts_endpoint(serve, issuer):
    """STS at '/': answers a well-formed AssumeRoleWithWebIdentity, refuses anything else."""
    def answer(request):
        form = request.form()
        if form.get("Action") != "AssumeRoleWithWebIdentity" or not form.get("WebIdentityToken"):
            return 400, STS_ERROR.format(code="InvalidAction", message="not AssumeRoleWithWebIdentity")
        return 200, STS_RESPONSE.format(**{k: xml_escape(str(v)) for k, v in issuer.issue().items()})
    return serve().on("POST", "/", answer)


def web_identity_env(tmp_path, sts, token="eyJhbGciOiJSUzI1NiJ9.ci-token.sig"):
    """Variables for web identity through the local STS."""
    token_file = write(tmp_path / "web-identity-token", token + "\n")
    return {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file), "AWS_ROLE_ARN": ROLE_ARN,
            "AWS_ENDPOINT_URL_STS": sts.url}


# === 1. Environment variables ===================================================================

def test_environment_keys_are_used_as_they_are(env, home):
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY="env/secret+key",
               AWS_SESSION_TOKEN="env-session-token")

    creds = make_chain(env, home).get()

    assert (creds.access_key, creds.secret_key, creds.token) == ("AKIDENV", "env/secret+key", "env-session-token")
    assert creds.expires is None  # static: never refreshed
    assert "environment" in creds.source


def test_the_original_dogestry_spelling_aws_access_key_and_aws_secret_key(env, home):
    """The original dogestry README said AWS_ACCESS_KEY and AWS_SECRET_KEY; they still work."""
    env.update(AWS_ACCESS_KEY="AKIDORIGINAL", AWS_SECRET_KEY="original-secret")

    creds = make_chain(env, home).get()

    assert (creds.access_key, creds.secret_key, creds.token) == ("AKIDORIGINAL", "original-secret", None)


def test_the_sdk_spelling_wins_over_the_original_one(env, home):
    env.update(AWS_ACCESS_KEY_ID="AKIDSDK", AWS_SECRET_ACCESS_KEY="sdk-secret",
               AWS_ACCESS_KEY="AKIDORIGINAL", AWS_SECRET_KEY="original-secret")

    assert make_chain(env, home).get().access_key == "AKIDSDK"


def test_static_credentials_are_looked_up_once(env, home):
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY="env-secret")
    clock = FakeClock()
    chain = make_chain(env, home, clock=clock)
    first = chain.get()

    env["AWS_ACCESS_KEY_ID"] = "AKIDCHANGED"
    clock.now += 10 * 365 * 86400

    assert chain.get() is first


# === 2. Shared profile files ====================================================================

def test_default_profile_from_the_credentials_file(env, home):
    write(home / ".aws" / "credentials",
          "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = default%secret/with+chars\n")

    creds = make_chain(env, home).get()

    assert (creds.access_key, creds.secret_key) == ("AKIDDEFAULT", "default%secret/with+chars")  # no % interpolation
    assert creds.source == "profile default"


def test_aws_profile_selects_name_in_credentials_and_profile_name_in_config(env, home):
    """AWS_PROFILE=ci reads [ci] from ~/.aws/credentials and [profile ci] from ~/.aws/config."""
    write(home / ".aws" / "credentials",
          "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = default-secret\n\n"
          "[ci]\naws_access_key_id = AKIDCI\naws_secret_access_key = ci-secret\naws_session_token = ci-token\n")
    write(home / ".aws" / "config",
          "[default]\nregion = us-west-1\n\n[profile ci]\nregion = eu-west-2\n")
    env["AWS_PROFILE"] = "ci"
    config = AwsConfig(env, str(home))

    creds = CredentialChain(config, http=local_only_http).get()

    assert (creds.access_key, creds.secret_key, creds.token) == ("AKIDCI", "ci-secret", "ci-token")
    assert creds.source == "profile ci"
    assert config.region() == "eu-west-2"


def test_config_file_sections_need_the_profile_prefix_and_credentials_file_sections_do_not(env, home):
    """[ci] in the config file and [profile ci] in the credentials file are not profile ci."""
    write(home / ".aws" / "credentials",
          "[profile ci]\naws_access_key_id = AKIDWRONG1\naws_secret_access_key = wrong\n")
    write(home / ".aws" / "config",
          "[ci]\naws_access_key_id = AKIDWRONG2\naws_secret_access_key = wrong\nregion = ap-south-1\n")
    env["AWS_PROFILE"] = "ci"
    config = AwsConfig(env, str(home))

    with pytest.raises(DogestryError, match="AWS profile 'ci' not found"):
        CredentialChain(config, http=local_only_http).get()


def test_keys_may_live_in_the_config_file_but_the_credentials_file_wins(env, home):
    write(home / ".aws" / "config",
          "[profile ci]\naws_access_key_id = AKIDCONFIG\naws_secret_access_key = config-secret\n")
    env["AWS_PROFILE"] = "ci"
    assert make_chain(env, home).get().access_key == "AKIDCONFIG"

    write(home / ".aws" / "credentials",
          "[ci]\naws_access_key_id = AKIDCREDENTIALS\naws_secret_access_key = credentials-secret\n")
    assert make_chain(env, home).get().access_key == "AKIDCREDENTIALS"


def test_shared_credentials_file_and_config_file_can_be_moved(env, home, tmp_path):
    write(home / ".aws" / "credentials", "[default]\naws_access_key_id = AKIDHOME\naws_secret_access_key = h\n")
    write(home / ".aws" / "config", "[default]\nregion = us-west-1\n")
    moved_credentials = write(tmp_path / "elsewhere" / "creds.ini",
                              "[default]\naws_access_key_id = AKIDMOVED\naws_secret_access_key = m\n")
    moved_config = write(tmp_path / "elsewhere" / "config.ini", "[default]\nregion = eu-central-1\n")
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(moved_credentials), AWS_CONFIG_FILE=str(moved_config))
    config = AwsConfig(env, str(home))

    assert CredentialChain(config, http=local_only_http).get().access_key == "AKIDMOVED"
    assert config.region() == "eu-central-1"


MALFORMED = {
    "no section header": "aws_access_key_id = AKIDX\naws_secret_access_key = SECRETVALUE\n",
    "line without '='": "[default]\naws_access_key_id = AKIDX\naws_secret_access_key SECRETVALUE\n",
    "repeated key": "[default]\naws_secret_access_key = SECRETVALUE\naws_secret_access_key = SECRETVALUE\n",
    "repeated section": "[default]\nregion = a\n[default]\nregion = b\n",
}


@pytest.mark.parametrize("which", ["credentials", "config"])
@pytest.mark.parametrize("problem", sorted(MALFORMED))
def test_a_malformed_profile_file_is_an_error_naming_the_file(env, home, which, problem):
    """The error says which file is broken (and does not echo its contents: it holds secrets)."""
    path = write(home / ".aws" / which, MALFORMED[problem])

    with pytest.raises(DogestryError) as caught:
        make_chain(env, home).get()

    message = one_line(str(caught.value))
    assert str(path) in message
    assert "SECRETVALUE" not in message


def test_a_profile_file_that_is_not_utf8_is_an_error_naming_the_file(env, home):
    path = home / ".aws" / "credentials"
    path.parent.mkdir()
    path.write_bytes(b"[default]\naws_access_key_id = AKID\xff\xfe\naws_secret_access_key = s\n")

    with pytest.raises(DogestryError, match=re.escape(str(path))):
        make_chain(env, home).get()


def test_an_aws_profile_that_exists_nowhere_is_an_error_not_a_fallback(env, home, serve):
    write(home / ".aws" / "credentials", "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = d\n")
    imds = imds_endpoint(serve, Issuer("AKIDIMDS"))
    env.update(AWS_PROFILE="typo", AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url)

    with pytest.raises(DogestryError, match="typo"):
        make_chain(env, home).get()


# === 3. The order of the sources ================================================================

ORDER = ("environment", "profile", "web identity", "container", "instance metadata")


@pytest.fixture
def every_source(env, home, tmp_path, serve):
    """All five sources configured at once, each handing out its own access key."""
    write(home / ".aws" / "credentials", "[ci]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = p\n")
    sts = sts_endpoint(serve, Issuer("AKIDWEBID"))
    container = container_endpoint(serve, Issuer("AKIDCONTAINER"))
    imds = imds_endpoint(serve, Issuer("AKIDIMDS"))
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY="e", AWS_PROFILE="ci",
               AWS_CONTAINER_CREDENTIALS_FULL_URI=container.url + "/creds",
               AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url,
               **web_identity_env(tmp_path, sts))
    return {"web identity": sts, "container": container, "instance metadata": imds}


def drop_source(name, env, home):
    if name == "environment":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    elif name == "profile":
        (home / ".aws" / "credentials").unlink()
        del env["AWS_PROFILE"]  # naming a profile that exists nowhere is an error, not a fallback
    elif name == "web identity":
        del env["AWS_WEB_IDENTITY_TOKEN_FILE"]
    elif name == "container":
        del env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]


@pytest.mark.parametrize("winner", ORDER)
def test_the_first_configured_source_wins_and_later_ones_are_not_asked(env, home, every_source, winner):
    """environment > profile > web identity > container > instance metadata."""
    for name in ORDER[:ORDER.index(winner)]:
        drop_source(name, env, home)

    creds = make_chain(env, home).get()

    expected = {"environment": "AKIDENV", "profile": "AKIDPROFILE", "web identity": "AKIDWEBID-1",
                "container": "AKIDCONTAINER-1", "instance metadata": "AKIDIMDS-1"}[winner]
    assert creds.access_key == expected
    asked = {name for name, endpoint in every_source.items() if endpoint.requests}
    assert asked == ({winner} if winner in every_source else set())


# === 4. Container credentials ===================================================================

def test_container_credentials_from_full_uri_with_an_authorization_token(env, home, serve):
    issuer = Issuer("AKIDCONTAINER")
    endpoint = container_endpoint(serve, issuer, authorization="Bearer eks-pod-identity-token")
    env.update(AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url + "/creds",
               AWS_CONTAINER_AUTHORIZATION_TOKEN="Bearer eks-pod-identity-token")

    creds = make_chain(env, home).get()

    assert (creds.access_key, creds.secret_key, creds.token) == (
        "AKIDCONTAINER-1", "secret-AKIDCONTAINER-1", "token-AKIDCONTAINER-1")
    assert creds.expires == pytest.approx(time.time() + 3600, abs=60)
    assert [(r.method, r.path, r.headers.get("authorization")) for r in endpoint.requests] == [
        ("GET", "/creds", "Bearer eks-pod-identity-token")]


def test_the_authorization_token_file_is_read_and_beats_the_token_variable(env, home, serve, tmp_path):
    """EKS Pod Identity mounts the token as a file (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)."""
    endpoint = container_endpoint(serve, Issuer("AKIDCONTAINER"), authorization="token-from-file")
    token_file = write(tmp_path / "eks-pod-identity-token", "token-from-file\n")
    env.update(AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url + "/creds",
               AWS_CONTAINER_AUTHORIZATION_TOKEN="token-from-variable",
               AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file))

    assert make_chain(env, home).get().access_key == "AKIDCONTAINER-1"
    assert endpoint.requests[0].headers["authorization"] == "token-from-file"


def test_a_wrong_authorization_token_is_refused_with_a_clear_error(env, home, serve):
    endpoint = container_endpoint(serve, Issuer("AKIDCONTAINER"), authorization="the-right-token")
    env.update(AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url + "/creds",
               AWS_CONTAINER_AUTHORIZATION_TOKEN="a-wrong-token")

    with pytest.raises(DogestryError) as caught:
        make_chain(env, home).get()

    assert one_line(str(caught.value)) == "cannot get container credentials from %s/creds: HTTP 401" % endpoint.url


def test_a_missing_authorization_token_file_is_an_error(env, home, serve, tmp_path):
    endpoint = container_endpoint(serve, Issuer("AKIDCONTAINER"))
    env.update(AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url + "/creds",
               AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(tmp_path / "absent"))

    with pytest.raises(DogestryError, match="AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"):
        make_chain(env, home).get()
    assert endpoint.requests == []


def test_relative_uri_means_the_ecs_agent_address_and_beats_full_uri(env, home):
    """AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is a path on http://169.254.170.2 (not contacted here)."""
    calls = []

    def fake_http(url, method="GET", headers=None, body=None, timeout=None, context=None):
        calls.append((method, url))
        return 200, json.dumps(Issuer("AKIDECS").issue()).encode()

    env.update(AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/v2/credentials/0123-abcd",
               AWS_CONTAINER_CREDENTIALS_FULL_URI="http://127.0.0.1:1/never")

    assert make_chain(env, home, http=fake_http).get().access_key == "AKIDECS-1"
    assert calls == [("GET", "http://169.254.170.2/v2/credentials/0123-abcd")]


# === 5. EC2 instance metadata ===================================================================

def test_imdsv2_gets_a_session_token_then_the_role_then_its_credentials(env, home, serve):
    endpoint = imds_endpoint(serve, Issuer("AKIDIMDS"))
    env.update(AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.url + "/")

    creds = make_chain(env, home).get()

    assert (creds.access_key, creds.secret_key, creds.token) == ("AKIDIMDS-1", "secret-AKIDIMDS-1", "token-AKIDIMDS-1")
    assert IMDS_ROLE in creds.source
    put, roles, role = endpoint.requests
    assert (put.method, put.path) == ("PUT", "/latest/api/token")
    assert int(put.headers["x-aws-ec2-metadata-token-ttl-seconds"]) > 0
    assert [(r.method, r.path, r.headers.get("x-aws-ec2-metadata-token")) for r in (roles, role)] == [
        ("GET", CREDS_PATH, IMDS_TOKEN), ("GET", CREDS_PATH + IMDS_ROLE, IMDS_TOKEN)]


@pytest.mark.parametrize("refusal", [403, 405])
def test_imdsv1_fallback_when_the_token_put_is_refused(env, home, serve, refusal):
    endpoint = imds_endpoint(serve, Issuer("AKIDIMDS"), token_put_status=refusal)
    env.update(AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.url)

    assert make_chain(env, home).get().access_key == "AKIDIMDS-1"
    assert [(r.method, r.path) for r in endpoint.requests] == [
        ("PUT", "/latest/api/token"), ("GET", CREDS_PATH), ("GET", CREDS_PATH + IMDS_ROLE)]
    assert not any("x-aws-ec2-metadata-token" in r.headers for r in endpoint.requests[1:])


@pytest.mark.parametrize("disabled", ["true", "TRUE"])
def test_aws_ec2_metadata_disabled_keeps_the_chain_away_from_imds(env, home, serve, disabled):
    endpoint = imds_endpoint(serve, Issuer("AKIDIMDS"))
    env.update(AWS_EC2_METADATA_DISABLED=disabled, AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.url)

    with pytest.raises(DogestryError, match="no AWS credentials found"):
        make_chain(env, home).get()
    assert endpoint.requests == []


def test_no_instance_metadata_service_just_means_not_on_ec2(env, home, refused_url):
    """Unreachable IMDS at the end of the chain is not an error of its own: "nothing found"."""
    env.update(AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=refused_url)

    with pytest.raises(DogestryError, match="no AWS credentials found"):
        make_chain(env, home).get()


def test_use_metaservice_takes_imds_credentials_even_when_environment_keys_exist(env, home, serve):
    endpoint = imds_endpoint(serve, Issuer("AKIDIMDS"))
    write(home / ".aws" / "credentials", "[default]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = p\n")
    env.update(AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY="e",
               AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.url)

    assert make_chain(env, home, force_metadata=True).get().access_key == "AKIDIMDS-1"


def test_use_metaservice_is_explicit_so_it_overrides_aws_ec2_metadata_disabled(env, home, serve):
    endpoint = imds_endpoint(serve, Issuer("AKIDIMDS"))
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.url)

    assert make_chain(env, home, force_metadata=True).get().access_key == "AKIDIMDS-1"


def test_use_metaservice_without_a_role_says_so(env, home, serve):
    endpoint = serve().on("PUT", "/latest/api/token", (200, IMDS_TOKEN))  # no role: 404
    env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = endpoint.url

    with pytest.raises(DogestryError) as caught:
        make_chain(env, home, force_metadata=True).get()

    assert one_line(str(caught.value)) == "EC2 instance metadata at %s has no IAM role (HTTP 404)" % endpoint.url


# === 6. Web identity (STS AssumeRoleWithWebIdentity) ===========================================

def test_web_identity_exchanges_the_token_file_for_role_credentials(env, home, serve, tmp_path):
    issuer = Issuer("AKIDWEBID")
    sts = sts_endpoint(serve, issuer)
    env.update(web_identity_env(tmp_path, sts, token="eyJ.ci-token.sig"), AWS_ROLE_SESSION_NAME="ci-run-42")

    creds = make_chain(env, home).get()

    assert (creds.access_key, creds.secret_key, creds.token) == (
        "AKIDWEBID-1", "secret-AKIDWEBID-1", "token-AKIDWEBID-1")
    assert creds.expires == pytest.approx(time.time() + 3600, abs=60)
    assert ROLE_ARN in creds.source
    [request] = sts.requests
    assert (request.method, request.path) == ("POST", "/")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "authorization" not in request.headers  # the web identity token is the proof; unsigned
    assert request.form() == {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                              "RoleArn": ROLE_ARN, "RoleSessionName": "ci-run-42",
                              "WebIdentityToken": "eyJ.ci-token.sig"}


def test_web_identity_session_name_defaults_to_dogestry_and_the_time(env, home, serve, tmp_path):
    sts = sts_endpoint(serve, Issuer("AKIDWEBID"))
    env.update(web_identity_env(tmp_path, sts))

    make_chain(env, home, clock=FakeClock(T0)).get()

    assert sts.requests[0].form()["RoleSessionName"] == "dogestry-%d" % T0


def test_web_identity_settings_may_come_from_the_profile(env, home, serve, tmp_path):
    sts = sts_endpoint(serve, Issuer("AKIDWEBID"))
    token_file = write(tmp_path / "token", "profile-token")
    write(home / ".aws" / "config", "[profile ci]\nrole_arn = %s\nweb_identity_token_file = %s\n"
          "role_session_name = from-profile\n" % (ROLE_ARN, token_file))
    env.update(AWS_PROFILE="ci", AWS_ENDPOINT_URL_STS=sts.url)

    assert make_chain(env, home).get().access_key == "AKIDWEBID-1"
    assert sts.requests[0].form()["RoleSessionName"] == "from-profile"
    assert sts.requests[0].form()["WebIdentityToken"] == "profile-token"


def test_sts_refusing_the_token_is_one_clear_error_with_its_code(env, home, serve, tmp_path):
    sts = serve().on("POST", "/", (400, STS_ERROR.format(code="InvalidIdentityToken",
                                                         message="Couldn't retrieve verification key")))
    env.update(web_identity_env(tmp_path, sts))

    with pytest.raises(DogestryError) as caught:
        make_chain(env, home).get()

    assert one_line(str(caught.value)) == "STS AssumeRoleWithWebIdentity for %s failed: InvalidIdentityToken" % ROLE_ARN


def test_a_missing_web_identity_token_file_is_an_error_naming_it(env, home, serve, tmp_path):
    sts = sts_endpoint(serve, Issuer("AKIDWEBID"))
    env.update(web_identity_env(tmp_path, sts), AWS_WEB_IDENTITY_TOKEN_FILE=str(tmp_path / "absent-token"))

    with pytest.raises(DogestryError, match=re.escape(str(tmp_path / "absent-token"))):
        make_chain(env, home).get()
    assert sts.requests == []


# === 7. Refreshing temporary credentials ========================================================

def container_env(env, endpoint):
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = endpoint.url + "/creds"
    return env


def imds_env(env, endpoint):
    env.update(AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.url)
    return env


TEMPORARY_SOURCES = {
    "container": (container_endpoint, container_env, "/creds"),
    "instance metadata": (imds_endpoint, imds_env, CREDS_PATH + IMDS_ROLE),
}


@pytest.mark.parametrize("source", sorted(TEMPORARY_SOURCES))
def test_temporary_credentials_are_fetched_again_when_near_expiry(env, home, serve, source):
    start, configure, creds_path = TEMPORARY_SOURCES[source]
    clock = FakeClock()
    issuer = Issuer("AKIDTEMP", clock=clock, lifetime=60)  # expires within the 5-minute margin
    endpoint = start(serve, issuer)
    chain = make_chain(configure(env, endpoint), home, clock=clock)

    assert chain.get().access_key == "AKIDTEMP-1"
    assert chain.get().access_key == "AKIDTEMP-2"
    assert endpoint.hits(creds_path) == 2


@pytest.mark.parametrize("source", sorted(TEMPORARY_SOURCES))
def test_fresh_credentials_are_kept_until_five_minutes_before_expiry(env, home, serve, source):
    start, configure, creds_path = TEMPORARY_SOURCES[source]
    clock = FakeClock()
    issuer = Issuer("AKIDTEMP", clock=clock, lifetime=3600)
    endpoint = start(serve, issuer)
    chain = make_chain(configure(env, endpoint), home, clock=clock)

    assert chain.get().access_key == "AKIDTEMP-1"
    clock.now = T0 + 3600 - 301
    assert chain.get().access_key == "AKIDTEMP-1"
    assert endpoint.hits(creds_path) == 1

    clock.now = T0 + 3600 - 299
    assert chain.get().access_key == "AKIDTEMP-2"
    assert chain.get().access_key == "AKIDTEMP-2"
    assert endpoint.hits(creds_path) == 2


def test_a_failed_refresh_keeps_credentials_that_are_still_valid(env, home, serve):
    clock = FakeClock()
    answers = iter([(200, Issuer("AKIDTEMP", clock=clock, lifetime=3600).issue()), (500, {"message": "down"})])
    endpoint = serve().on("GET", "/creds", lambda request: next(answers))
    chain = make_chain(dict(env, AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url + "/creds"), home, clock=clock)

    assert chain.get().access_key == "AKIDTEMP-1"
    clock.now = T0 + 3600 - 60          # inside the refresh margin: a refresh is tried and fails...
    assert chain.get().access_key == "AKIDTEMP-1"   # ...so the still-valid set is used
    clock.now = T0 + 3600 + 1           # expired and nothing better: now it is an error
    with pytest.raises(DogestryError):
        chain.get()


@pytest.mark.parametrize("present, absent", [("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
                                             ("AWS_SECRET_KEY", "AWS_ACCESS_KEY")])
def test_half_a_key_pair_in_the_environment_is_an_error(env, home, present, absent):
    env[present] = "x"
    with pytest.raises(DogestryError, match="%s is set but %s is not" % (present, absent)):
        make_chain(env, home).get()


def test_web_identity_credentials_are_refreshed_too(env, home, serve, tmp_path):
    clock = FakeClock()
    sts = sts_endpoint(serve, Issuer("AKIDWEBID", clock=clock, lifetime=900))
    chain = make_chain(dict(env, **web_identity_env(tmp_path, sts)), home, clock=clock)

    assert chain.get().access_key == "AKIDWEBID-1"
    clock.now += 900 - 299
    assert chain.get().access_key == "AKIDWEBID-2"
    assert len(sts.requests) == 2


def test_s3_expired_token_answer_forces_a_refresh_and_a_retry(env, home, serve):
    """An S3 'ExpiredToken' answer makes the client fetch new credentials and sign again."""
    endpoint = container_endpoint(serve, Issuer("AKIDTEMP"))
    answers = iter([(400, "<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>"),
                    (200, "ok")])
    s3 = serve().on("GET", "/bkt/key", lambda request: next(answers))
    config = AwsConfig(container_env(env, endpoint), str(home))
    location = dogestry.S3Location("bkt", "", "us-east-1", s3.url)
    client = dogestry.S3Client(location, CredentialChain(config, http=local_only_http), config,
                               sleep=lambda seconds: None)

    assert client.get("key").read() == b"ok"

    assert endpoint.hits() == 2
    signed_with = [(re.search(r"Credential=([^/]+)/", r.headers["authorization"]).group(1),
                    r.headers.get("x-amz-security-token")) for r in s3.requests]
    assert signed_with == [("AKIDTEMP-1", "token-AKIDTEMP-1"), ("AKIDTEMP-2", "token-AKIDTEMP-2")]


# === 8. Broken endpoints: one clear DogestryError ===============================================

BROKEN = {
    "HTTP 500": (500, "<html><body>Internal Server Error</body></html>"),
    "garbage JSON": (200, "{'AccessKeyId': oops"),
    "not UTF-8": (200, b"\xff\xfe\xfa"),
    "JSON without keys": (200, {"Code": "Success", "Message": "nothing for you"}),
    "JSON that is a list": (200, ["AKID", "secret"]),
}


def broken_container(serve, env, answer):
    endpoint = serve().on("GET", "/creds", answer)
    return container_env(env, endpoint), {}


def broken_imds(serve, env, answer):
    endpoint = (serve().on("PUT", "/latest/api/token", (200, IMDS_TOKEN))
                .on("GET", CREDS_PATH, (200, IMDS_ROLE)).on("GET", CREDS_PATH + IMDS_ROLE, answer))
    return imds_env(env, endpoint), {"force_metadata": True}


def broken_sts(serve, env, answer, tmp_path):
    status, body = answer
    body = body if isinstance(body, (bytes, str)) else json.dumps(body)  # STS speaks XML: JSON is garbage too
    sts = serve().on("POST", "/", (status, body))
    env.update(web_identity_env(tmp_path, sts))
    return env, {}


@pytest.mark.parametrize("problem", sorted(BROKEN))
@pytest.mark.parametrize("source, what", [("container", "container credentials"),
                                          ("imds", "instance"),
                                          ("sts", "web ?identity")])
def test_a_broken_endpoint_gives_one_clear_error(env, home, serve, tmp_path, source, what, problem):
    if source == "sts":
        env, kwargs = broken_sts(serve, env, BROKEN[problem], tmp_path)
    else:
        env, kwargs = {"container": broken_container, "imds": broken_imds}[source](serve, env, BROKEN[problem])

    with pytest.raises(DogestryError) as caught:
        make_chain(env, home, **kwargs).get()

    assert re.search(what, one_line(str(caught.value)), re.IGNORECASE), str(caught.value)


@pytest.mark.parametrize("source, expected", [
    ("container", "cannot get container credentials from {url}/creds: Connection refused"),
    ("imds", "cannot reach EC2 instance metadata at {url}: Connection refused"),
    ("sts", "cannot reach STS at {url} for web identity credentials: Connection refused"),
])
def test_a_refused_connection_gives_one_clear_error(env, home, tmp_path, refused_url, source, expected):
    kwargs = {}
    if source == "container":
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = refused_url + "/creds"
    elif source == "imds":
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = refused_url
        kwargs["force_metadata"] = True
    else:
        env.update(AWS_WEB_IDENTITY_TOKEN_FILE=str(write(tmp_path / "token", "t")), AWS_ROLE_ARN=ROLE_ARN,
                   AWS_ENDPOINT_URL_STS=refused_url)

    with pytest.raises(DogestryError) as caught:
        make_chain(env, home, **kwargs).get()

    assert one_line(str(caught.value)) == expected.format(url=refused_url)


def run_main(argv, environ):
    """dogestry.main in-process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    status = dogestry.main(argv, environ, stdout, stderr)
    return status, stdout.getvalue(), stderr.getvalue()


def test_the_command_line_reports_a_broken_endpoint_in_one_line(env, home, serve):
    endpoint = serve().on("GET", "/creds", (200, "{garbage"))
    s3 = serve()
    environ = dict(container_env(env, endpoint), HOME=str(home))

    status, stdout, stderr = run_main(["list", "s3://bkt/repo/?endpoint=%s" % s3.url], environ)

    assert status == 1 and stdout == ""
    assert stderr.startswith("dogestry: error: cannot get container credentials from %s/creds: " % endpoint.url)
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert s3.requests == []


# === 9. Nothing anywhere ========================================================================

def test_no_credentials_anywhere_says_where_it_looked(env, home):
    with pytest.raises(DogestryError) as caught:
        make_chain(env, home).get()

    message = one_line(str(caught.value))
    for place in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY", "AWS_SECRET_KEY",
                  "profile 'default'", str(home / ".aws" / "credentials"), str(home / ".aws" / "config"),
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "container credentials", "EC2 instance metadata"):
        assert place in message


def test_no_credentials_anywhere_names_the_profile_and_moved_files(env, home, tmp_path):
    env.update(AWS_PROFILE="ci", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "c.ini"),
               AWS_CONFIG_FILE=str(tmp_path / "f.ini"))

    with pytest.raises(DogestryError) as caught:
        make_chain(env, home).get()

    message = str(caught.value)
    assert "profile 'ci'" in message and str(tmp_path / "c.ini") in message and str(tmp_path / "f.ini") in message


def test_no_credentials_on_the_command_line_is_one_error_line_and_no_request(env, home, serve):
    s3 = serve()

    status, stdout, stderr = run_main(["list", "s3://bkt/repo/?endpoint=%s" % s3.url], dict(env, HOME=str(home)))

    assert status == 1 and stdout == ""
    assert stderr.startswith("dogestry: error: no AWS credentials found: looked in ")
    assert stderr.count("\n") == 1 and str(home / ".aws" / "credentials") in stderr
    assert s3.requests == []


# === 10. Region =================================================================================

@pytest.mark.parametrize("url_region, variables, profile_region, expected", [
    ("eu-north-1", {"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "ca-central-1"}, "sa-east-1", "eu-north-1"),
    (None, {"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "ca-central-1"}, "sa-east-1", "ap-south-1"),
    (None, {"AWS_DEFAULT_REGION": "ca-central-1"}, "sa-east-1", "ca-central-1"),
    (None, {}, "sa-east-1", "sa-east-1"),
    (None, {}, None, "us-east-1"),
], ids=["url", "AWS_REGION", "AWS_DEFAULT_REGION", "profile", "fallback"])
def test_region_precedence(env, home, url_region, variables, profile_region, expected):
    """?region= > AWS_REGION > AWS_DEFAULT_REGION > the profile's region > us-east-1."""
    write(home / ".aws" / "config", "[default]\nregion = us-west-2\n[profile ci]\n%s\n"
          % ("region = " + profile_region if profile_region else ""))
    env.update(variables, AWS_PROFILE="ci", AWS_ACCESS_KEY_ID="AKID", AWS_SECRET_ACCESS_KEY="s")
    location = dogestry.parse_s3_url("s3://bkt/repo/" + ("?region=" + url_region if url_region else ""))
    config = AwsConfig(env, str(home))

    client = dogestry.S3Client(location, CredentialChain(config, http=local_only_http), config)

    assert client.region == expected


# === 11. End to end: dogestry push to radosgw from dockerd ======================================

IMAGE = "dgtest/awscreds:1"


@pytest.fixture(scope="module")
def small_image(docker_host):
    build_image(docker_host, IMAGE, [{"etc/motd": b"credentials from everywhere\n"}])
    return IMAGE


@pytest.fixture
def clean_env(docker_env, rgw, tmp_path):
    """docker_env without any inherited AWS_* variable: a temp HOME, radosgw as the S3 endpoint,
    no instance metadata.  Credentials are up to each test."""
    env = {k: v for k, v in docker_env.items() if not k.startswith("AWS_")}
    home = tmp_path / "e2e-home"
    home.mkdir()
    env.update(HOME=str(home), AWS_ENDPOINT_URL=rgw.endpoint, AWS_EC2_METADATA_DISABLED="true")
    return env


def rgw_client(rgw, bucket):
    """An in-process S3Client for BUCKET with radosgw's real keys."""
    config = AwsConfig({"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}, "/nonexistent")
    location = dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint)
    return dogestry.S3Client(location, CredentialChain(config), config)


def bucket_keys(rgw, bucket):
    return sorted(key for key, _ in rgw_client(rgw, bucket).list(""))


def push(env, bucket, *global_options):
    return run_dogestry(*global_options, "push", "s3://%s/repo/" % bucket, IMAGE, env=env)


def assert_pushed(proc, rgw, bucket):
    assert proc.returncode == 0, proc.stderr
    keys = bucket_keys(rgw, bucket)
    assert "repo/repositories/dgtest/awscreds/1" in keys
    assert any(k.startswith("repo/images/") and k.endswith("/manifest.json") for k in keys), keys


@pytest.mark.integration
def test_radosgw_accepts_and_ignores_an_unknown_session_token(rgw, bucket):
    """Why the end-to-end servers below may hand out a Token: radosgw (no STS configured) takes a
    signed request with the user's long-term keys and any X-Amz-Security-Token, and ignores the token."""
    config = AwsConfig({"AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key,
                        "AWS_SESSION_TOKEN": "made-up-token-radosgw-never-issued"}, "/nonexistent")
    chain = CredentialChain(config)
    assert chain.get().token == "made-up-token-radosgw-never-issued"
    client = dogestry.S3Client(dogestry.S3Location(bucket, "", "us-east-1", rgw.endpoint), chain, config)

    assert list(client.list("")) == []


@pytest.mark.integration
def test_push_with_the_original_aws_access_key_and_aws_secret_key(clean_env, rgw, bucket, small_image):
    env = dict(clean_env, AWS_ACCESS_KEY=rgw.access_key, AWS_SECRET_KEY=rgw.secret_key)

    assert_pushed(push(env, bucket), rgw, bucket)


@pytest.mark.integration
def test_push_with_a_profile_chosen_by_aws_profile(clean_env, rgw, bucket, small_image):
    aws = Path(clean_env["HOME"]) / ".aws"
    write(aws / "credentials",
          "[default]\naws_access_key_id = AKIDWRONG\naws_secret_access_key = wrong\n\n"
          "[radosgw]\naws_access_key_id = %s\naws_secret_access_key = %s\n" % (rgw.access_key, rgw.secret_key))
    write(aws / "config", "[profile radosgw]\nregion = %s\n" % rgw.region)
    env = dict(clean_env, AWS_PROFILE="radosgw")

    assert_pushed(push(env, bucket), rgw, bucket)


@pytest.mark.integration
def test_push_with_container_credentials(clean_env, rgw, bucket, small_image, serve):
    issuer = Issuer(key=rgw.access_key, secret=rgw.secret_key)  # plus a Token, which radosgw ignores
    endpoint = container_endpoint(serve, issuer, authorization="pod-identity-token")
    env = dict(clean_env, AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url + "/creds",
               AWS_CONTAINER_AUTHORIZATION_TOKEN="pod-identity-token")

    assert_pushed(push(env, bucket), rgw, bucket)
    assert issuer.issued == 1  # valid for an hour: fetched once per run


@pytest.mark.integration
@pytest.mark.parametrize("use_metaservice", [True, False], ids=["-use-metaservice", "end-of-chain"])
def test_push_with_instance_metadata(clean_env, rgw, bucket, small_image, serve, use_metaservice):
    """IMDS at AWS_EC2_METADATA_SERVICE_ENDPOINT; with -use-metaservice it beats (wrong) environment keys."""
    issuer = Issuer(key=rgw.access_key, secret=rgw.secret_key)
    endpoint = imds_endpoint(serve, issuer)
    env = dict(clean_env, AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.url)
    del env["AWS_EC2_METADATA_DISABLED"]
    options = ()
    if use_metaservice:
        env.update(AWS_ACCESS_KEY_ID=rgw.access_key, AWS_SECRET_ACCESS_KEY="wrong-" + rgw.secret_key)
        options = ("-use-metaservice",)

    assert_pushed(push(env, bucket, *options), rgw, bucket)
    assert issuer.issued == 1
    assert endpoint.requests[0].method == "PUT"  # IMDSv2


@pytest.mark.integration
def test_a_wrong_secret_fails_in_one_line_naming_signature_does_not_match_and_writes_nothing(
        clean_env, rgw, bucket, small_image):
    env = dict(clean_env, AWS_ACCESS_KEY=rgw.access_key, AWS_SECRET_KEY="not-" + rgw.secret_key)

    proc = push(env, bucket)

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dogestry: error:")]
    assert len(errors) == 1, proc.stderr
    assert "SignatureDoesNotMatch" in errors[0]
    assert "credentials from environment (AWS_ACCESS_KEY)" in errors[0]  # which source gave the bad key
    assert bucket_keys(rgw, bucket) == []
