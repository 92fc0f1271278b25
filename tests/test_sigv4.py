"""SigV4 signing (dogestry section 6) against the AWS test suite, the S3 documentation and unit rules.

The suite (awslabs/aws-c-auth, Apache-2.0) is in tests/data/aws-sigv4-test-suite/v4: per case a raw
request.txt, its context.json (credentials, time, region, service, options) and the expected canonical
request, string to sign, signature and signed request, for header signing and for query signing.
"""

import datetime
import hashlib
import json
import urllib.parse
from pathlib import Path

import pytest

import dogestry
from dogestry import Credentials

SUITE = Path(__file__).resolve().parent / "data" / "aws-sigv4-test-suite" / "v4"
UTC = datetime.timezone.utc
EMPTY = hashlib.sha256(b"").hexdigest()

CASES = (
    "get-header-key-duplicate", "get-header-value-multiline", "get-header-value-order",
    "get-header-value-trim", "get-relative-normalized", "get-relative-relative-normalized",
    "get-relative-relative-unnormalized", "get-relative-unnormalized", "get-slash-dot-slash-normalized",
    "get-slash-dot-slash-unnormalized", "get-slash-normalized", "get-slash-pointless-dot-normalized",
    "get-slash-pointless-dot-unnormalized", "get-slash-unnormalized", "get-slashes-normalized",
    "get-slashes-unnormalized", "get-space-normalized", "get-space-unnormalized", "get-unreserved",
    "get-utf8", "get-vanilla", "get-vanilla-empty-query-key", "get-vanilla-query",
    "get-vanilla-query-order-encoded", "get-vanilla-query-order-key-case", "get-vanilla-query-unreserved",
    "get-vanilla-utf8-query", "get-vanilla-with-session-token", "post-header-key-case",
    "post-header-key-sort", "post-header-value-case", "post-sts-header-after", "post-sts-header-before",
    "post-vanilla", "post-vanilla-empty-query-value", "post-vanilla-query", "post-x-www-form-urlencoded",
    "post-x-www-form-urlencoded-parameters",
)


# --- reading the suite ---------------------------------------------------------------------------

def read(case, name):
    return (SUITE / case / name).read_bytes().decode("utf-8")


def parse_request(text):
    """(method, path, unencoded query pairs, {lowercase name: [values]}, body) of a raw request.

    The path may hold spaces (get-space-*), so the version is split off the end.  Query parts are
    percent-decoded ('+' stays '+').  A line starting with whitespace continues the previous header
    (obs-fold, get-header-value-multiline) and is joined with one space.
    """
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, target = lines[0].rsplit(" ", 1)[0].split(" ", 1)
    path, _, raw_query = target.partition("?")
    query = [tuple(urllib.parse.unquote(s) for s in part.partition("=")[::2])
             for part in raw_query.split("&") if part]
    headers, last = {}, None
    for line in filter(None, lines[1:]):
        if line[:1] in (" ", "\t"):
            headers[last][-1] += " " + line.strip()
        else:
            name, _, value = line.partition(":")
            last = name.strip().lower()
            headers.setdefault(last, []).append(value)
    return method, path, query, headers, body.encode("utf-8")


class Case:
    """One suite case, in the terms dogestry's signer takes."""

    def __init__(self, name):
        self.name = name
        ctx = json.loads(read(name, "context.json"))
        self.region, self.service, self.expires = ctx["region"], ctx["service"], ctx["expiration_in_seconds"]
        cred = ctx["credentials"]
        self.creds = Credentials(cred["access_key_id"], cred["secret_access_key"], cred.get("token"))
        self.now = datetime.datetime.strptime(ctx["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        self.timestamp = dogestry.amz_date(self.now)
        self.sign_body = ctx["sign_body"]
        self.sign_token = not ctx.get("omit_session_token", False)
        self.method, self.path, self.query, self.headers, body = parse_request(read(name, "request.txt"))
        self.payload_hash = hashlib.sha256(body).hexdigest()
        # request.txt paths are unencoded and the suite encodes them exactly once (no suite path holds
        # a '%', so this is also the "encode the wire path again" of generic services): double_encode
        # is off and only normalisation follows the context.
        self.path_rules = dict(normalize=ctx["normalize"], double_encode=False)

    def scope(self):
        return dogestry.credential_scope(self.timestamp, self.region, self.service)

    def presign(self):
        """presign_query with every request header signed and the body's hash, as the suite does."""
        headers = {k: v for k, v in self.headers.items() if k != "host"}
        return dogestry.presign_query(self.method, self.headers["host"][0], self.path, self.query, self.creds,
                                      self.region, self.service, self.now, self.expires, headers=headers,
                                      payload_hash=self.payload_hash, sign_token=self.sign_token,
                                      **self.path_rules)


@pytest.fixture(params=CASES)
def case(request):
    return Case(request.param)


def test_suite_data_is_complete():
    """All 38 cases are here, each with the ten files these tests read."""
    files = {"context.json", "request.txt"} | {"%s-%s.txt" % (kind, part) for kind in ("header", "query")
                                               for part in ("canonical-request", "string-to-sign",
                                                            "signature", "signed-request")}
    assert sorted(p.name for p in SUITE.iterdir()) == sorted(CASES)
    for name in CASES:
        assert {p.name for p in (SUITE / name).iterdir()} == files, name


# --- suite: signing with the Authorization header ------------------------------------------------

def test_header_canonical_request(case):
    """The request's headers plus X-Amz-Date (and the token / body hash when signed) give the canonical request."""
    added = {"x-amz-date": case.timestamp}
    if case.creds.token and case.sign_token:
        added["x-amz-security-token"] = case.creds.token
    if case.sign_body:
        added["x-amz-content-sha256"] = case.payload_hash
    headers = list(case.headers.items()) + list(added.items())
    canonical = dogestry.canonical_request(case.method, case.path, case.query, headers, case.payload_hash,
                                           **case.path_rules)
    assert canonical == read(case.name, "header-canonical-request.txt")


def test_header_string_to_sign(case):
    canonical = read(case.name, "header-canonical-request.txt")
    assert dogestry.string_to_sign(case.timestamp, case.scope(), canonical) == \
        read(case.name, "header-string-to-sign.txt")


def test_header_signature(case):
    """sign_request returns exactly the headers of the suite's signed request, Authorization included."""
    added = dogestry.sign_request(case.method, case.path, case.query, case.headers, case.payload_hash,
                                  case.creds, case.region, case.service, case.now,
                                  content_sha256=case.sign_body, sign_token=case.sign_token, **case.path_rules)
    signed_headers = parse_request(read(case.name, "header-signed-request.txt"))[3]
    assert {k.lower(): [v] for k, v in added.items()} == \
        {k: v for k, v in signed_headers.items() if k not in case.headers}
    assert added["Authorization"].endswith(", Signature=" + read(case.name, "header-signature.txt"))


# --- suite: presigned query strings --------------------------------------------------------------

def test_query_canonical_request(case):
    """Every parameter presign_query returns is signed, except the signature and an unsigned token."""
    params = case.presign()[:-1]
    if not case.sign_token:
        params.remove(("X-Amz-Security-Token", case.creds.token))
    canonical = dogestry.canonical_request(case.method, case.path, params, case.headers, case.payload_hash,
                                           **case.path_rules)
    assert canonical == read(case.name, "query-canonical-request.txt")


def test_query_string_to_sign(case):
    canonical = read(case.name, "query-canonical-request.txt")
    assert dogestry.string_to_sign(case.timestamp, case.scope(), canonical) == \
        read(case.name, "query-string-to-sign.txt")


def test_query_signature(case):
    """presign_query returns the suite's query parameters, X-Amz-Signature last."""
    params = case.presign()
    assert params[-1] == ("X-Amz-Signature", read(case.name, "query-signature.txt"))
    assert sorted(params) == sorted(parse_request(read(case.name, "query-signed-request.txt"))[2])


# --- AWS documentation examples ------------------------------------------------------------------

S3_CREDS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_NOW = datetime.datetime(2013, 5, 24, tzinfo=UTC)
S3_HOST = "examplebucket.s3.amazonaws.com"
S3_SCOPE = "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"


def test_s3_get_object_canonical_request():
    """S3 docs, GET Object with Range: the canonical request and its hash."""
    headers = {"Host": S3_HOST, "Range": "bytes=0-9", "x-amz-content-sha256": EMPTY,
               "x-amz-date": "20130524T000000Z"}
    canonical = dogestry.canonical_request("GET", "/test.txt", None, headers, EMPTY)
    assert canonical == ("GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
                         "x-amz-content-sha256:%s\nx-amz-date:20130524T000000Z\n\n"
                         "host;range;x-amz-content-sha256;x-amz-date\n%s" % (EMPTY, EMPTY))
    assert hashlib.sha256(canonical.encode()).hexdigest() == \
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"


@pytest.mark.parametrize("method, path, query, headers, body, signed, signature", [
    pytest.param("GET", "/test.txt", None, {"Range": "bytes=0-9"}, b"",
                 "host;range;x-amz-content-sha256;x-amz-date",
                 "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41", id="get-object-range"),
    pytest.param("PUT", "/test$file.text", None,  # '$' is encoded once: /test%24file.text
                 {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
                 b"Welcome to Amazon S3.", "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
                 "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd", id="put-object"),
    pytest.param("GET", "/", {"lifecycle": None}, {}, b"",  # a valueless subresource signs as 'lifecycle='
                 "host;x-amz-content-sha256;x-amz-date",
                 "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543", id="get-bucket-lifecycle"),
    pytest.param("GET", "/", [("prefix", "J"), ("max-keys", "2")], {}, b"",  # sorted: max-keys first
                 "host;x-amz-content-sha256;x-amz-date",
                 "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7", id="list-objects"),
])
def test_s3_documentation_examples(method, path, query, headers, body, signed, signature):
    """S3 docs, "Signature Calculations for the Authorization Header": S3 adds and signs X-Amz-Content-SHA256."""
    payload_hash = hashlib.sha256(body).hexdigest()
    added = dogestry.sign_request(method, path, query, dict(headers, Host=S3_HOST), payload_hash, S3_CREDS,
                                  "us-east-1", "s3", S3_NOW)
    assert added == {
        "X-Amz-Date": "20130524T000000Z",
        "X-Amz-Content-SHA256": payload_hash,
        "Authorization": "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=%s, Signature=%s"
                         % (S3_SCOPE, signed, signature)}


def test_s3_presigned_url_example():
    """S3 docs, "Authenticating Requests: Using Query Parameters": GET /test.txt valid for a day."""
    url = dogestry.presign_url("GET", "https", S3_HOST, "/test.txt", S3_CREDS, "us-east-1", S3_NOW, 86400)
    assert url == ("https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                   "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
                   "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
                   "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    assert dogestry.presign_query("GET", S3_HOST, "/test.txt", None, S3_CREDS, "us-east-1", "s3", S3_NOW,
                                  86400)[-1][1].startswith("aeeed9bb")


def test_presigned_signatures_of_many_paths_make_the_urls_presign_url_makes():
    """presign_signatures (delegated pulls' chunks): one shared query and a signature per path, which
    make for each path exactly the URL presign_url makes at that time (a session token included)."""
    paths = ["/examplebucket/test.txt", "/examplebucket/a dir/\u00fc+x.txt",
             "/examplebucket/chunks/sha256/" + "ab" * 32]
    for creds in (S3_CREDS, Credentials(S3_CREDS.access_key, S3_CREDS.secret_key, "tok/en+=" * 100)):
        query, signatures = dogestry.presign_signatures("GET", S3_HOST, paths, creds, "us-east-1", S3_NOW, 900)
        assert "X-Amz-Signature" not in query and len(signatures) == len(paths)
        for path, signature in zip(paths, signatures):
            assert "https://%s%s?%s&X-Amz-Signature=%s" % (S3_HOST, dogestry.uri_encode(path, safe="/"), query,
                                                            signature) == \
                dogestry.presign_url("GET", "https", S3_HOST, path, creds, "us-east-1", S3_NOW, 900)


def test_iam_signing_key_example():
    """AWS General Reference, "Derive a signing key": secret, 20150830, us-east-1, iam."""
    key = dogestry.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830", "us-east-1", "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"


# --- unit rules ----------------------------------------------------------------------------------

CREDS = Credentials("AK", "SK")
TOKEN_CREDS = Credentials("AK", "SK", "tok/en+=")
NOW = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_credentials_defaults():
    assert Credentials("AK", "SK") == ("AK", "SK", None, None, "")


@pytest.mark.parametrize("now", [
    datetime.datetime(2013, 5, 24, 0, 0, 0),  # naive: taken as UTC
    datetime.datetime(2013, 5, 24, 0, 0, 0, tzinfo=UTC),
    datetime.datetime(2013, 5, 24, 2, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    datetime.datetime(2013, 5, 23, 19, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
])
def test_amz_date_is_utc(now):
    assert dogestry.amz_date(now) == "20130524T000000Z"


@pytest.mark.parametrize("text, safe, encoded", [
    ("-._~AZaz09", "", "-._~AZaz09"),  # unreserved characters are kept
    ("a b", "", "a%20b"),  # space is %20, never '+'
    ("+*=&?#%$!'()@,;:", "", "%2B%2A%3D%26%3F%23%25%24%21%27%28%29%40%2C%3B%3A"),  # hex is upper case
    ("a/b", "", "a%2Fb"),
    ("a/b c", "/", "a/b%20c"),  # safe keeps '/' (paths)
    ("\u1234", "", "%E1%88%B4"),  # UTF-8 bytes
    ("\u00e9\U0001f433", "", "%C3%A9%F0%9F%90%B3"),
    ("", "", ""),
])
def test_uri_encode(text, safe, encoded):
    assert dogestry.uri_encode(text, safe) == encoded


@pytest.mark.parametrize("query, canonical", [
    (None, ""),
    ([], ""),
    ({"b": "2", "a": "1"}, "a=1&b=2"),  # a mapping or pairs, sorted by key
    ([("a", "z"), ("b", "1"), ("a", "y")], "a=y&a=z&b=1"),  # a repeated key: sorted by value
    ([("Param2", "x"), ("Param1", "y"), ("param0", "z")], "Param1=y&Param2=x&param0=z"),  # code points
    ([("Param-3", "1"), ("Param", "2")], "Param=2&Param-3=1"),
    ([("\u1234", "1"), ("A", "2")], "%E1%88%B4=1&A=2"),  # sorted after encoding
    ([("empty", ""), ("none", None)], "empty=&none="),  # empty values keep the '='
    ([("k y", "v a/l+u=e&")], "k%20y=v%20a%2Fl%2Bu%3De%26"),
    ([("max-keys", 2)], "max-keys=2"),  # values are str()ed
])
def test_canonical_query(query, canonical):
    assert dogestry.canonical_query(query) == canonical


@pytest.mark.parametrize("path, normalized", [
    ("/", "/"),
    ("//", "/"),
    ("/./", "/"),
    ("/a/..", "/"),
    ("/a/b/../..", "/"),
    ("/../a", "/a"),  # '..' never climbs above the root
    ("//a//b//", "/a/b/"),
    ("/./a/./b", "/a/b"),
    ("/a/b/../c/", "/a/c/"),
])
def test_remove_dot_segments(path, normalized):
    assert dogestry.remove_dot_segments(path) == normalized


@pytest.mark.parametrize("path, s3, generic", [
    ("", "/", "/"),
    ("/", "/", "/"),
    ("/bucket/my key", "/bucket/my%20key", "/bucket/my%2520key"),
    ("/b//a/./k y/../z", "/b//a/./k%20y/../z", "/b/a/z"),  # S3 keys may hold '//', '.' and '..'
    ("/a%2Fb", "/a%252Fb", "/a%25252Fb"),  # a '%' in a key is data, not an escape
    ("/\u1234/", "/%E1%88%B4/", "/%25E1%2588%25B4/"),
])
def test_canonical_uri_s3_vs_generic(path, s3, generic):
    """S3 encodes the path once and keeps it as is; other services normalise it and encode it twice."""
    assert dogestry.canonical_uri(path) == s3
    assert dogestry.canonical_uri(path, normalize=True, double_encode=True) == generic


@pytest.mark.parametrize("service, rules", [
    ("s3", dict(normalize=False, double_encode=False)),
    ("sts", dict(normalize=True, double_encode=True)),
    ("execute-api", dict(normalize=True, double_encode=True)),
])
def test_service_picks_path_rules(service, rules):
    """Left as None, normalize and double_encode follow the service (sign_request and presign_query)."""
    path, hdrs = "/a//b/../c d", {"Host": "h"}
    assert dogestry.sign_request("GET", path, None, hdrs, EMPTY, CREDS, "r", service, NOW) == \
        dogestry.sign_request("GET", path, None, hdrs, EMPTY, CREDS, "r", service, NOW, **rules)
    assert dogestry.presign_query("GET", "h", path, None, CREDS, "r", service, NOW, 60) == \
        dogestry.presign_query("GET", "h", path, None, CREDS, "r", service, NOW, 60, **rules)


@pytest.mark.parametrize("headers, block, names", [
    ({"Host": "h"}, "host:h\n", "host"),
    ([("X-B", "2"), ("x-a", "1"), ("HOST", "h")], "host:h\nx-a:1\nx-b:2\n", "host;x-a;x-b"),  # lower, sorted
    ([("X-A", "v2"), ("x-a", "v1"), ("x-A", "v3")], "x-a:v2,v1,v3\n", "x-a"),  # repeats joined in order
    ({"x-a": ["v2", "v1"], "x-b": ("b",)}, "x-a:v2,v1\nx-b:b\n", "x-a;x-b"),  # list values
    ({"x-a": '  "a   b\tc"  '}, 'x-a:"a b c"\n', "x-a"),  # trimmed, runs of blanks collapsed (quotes too)
    ({"x-a": "v1\r\n  v2"}, "x-a:v1 v2\n", "x-a"),  # folded lines become one
    ({" X-A ": "1", "x-b": ""}, "x-a:1\nx-b:\n", "x-a;x-b"),  # names trimmed; empty values kept
    ({"x-n": 13}, "x-n:13\n", "x-n"),
])
def test_canonical_headers(headers, block, names):
    assert dogestry.canonical_headers(headers) == (block, names)


def test_canonical_request_layout():
    assert dogestry.canonical_request("get", "/a b", {"q": "1"}, {"Host": "h"}, "HASH") == \
        "GET\n/a%20b\nq=1\nhost:h\n\nhost\nHASH"


def _signed_names(added):
    return added["Authorization"].split("SignedHeaders=")[1].split(",")[0]


@pytest.mark.parametrize("service, content_sha256, sends", [
    ("s3", None, True), ("sts", None, False), ("s3", False, False), ("sts", True, True),
])
def test_sign_request_content_sha256(service, content_sha256, sends):
    """S3 requires X-Amz-Content-SHA256 (signed); other services only on request."""
    added = dogestry.sign_request("PUT", "/k", None, {"Host": "h"}, "PAYLOAD", CREDS, "r", service, NOW,
                                  content_sha256=content_sha256)
    assert ("X-Amz-Content-SHA256" in added) is sends
    assert _signed_names(added) == ("host;x-amz-content-sha256;x-amz-date" if sends else "host;x-amz-date")
    if sends:
        assert added["X-Amz-Content-SHA256"] == "PAYLOAD"


def test_sign_request_replaces_its_own_headers():
    """Stale X-Amz-Date, X-Amz-Content-SHA256, token or Authorization from the caller are not signed."""
    stale = {"Host": "h", "X-AMZ-DATE": "19700101T000000Z", "authorization": "old",
             "x-amz-content-sha256": "old", "X-Amz-Security-Token": "old"}
    assert dogestry.sign_request("GET", "/", None, stale, EMPTY, TOKEN_CREDS, "r", "s3", NOW) == \
        dogestry.sign_request("GET", "/", None, {"Host": "h"}, EMPTY, TOKEN_CREDS, "r", "s3", NOW)


def test_sign_request_session_token():
    """A token is sent as X-Amz-Security-Token and signed; sign_token=False sends it unsigned."""
    plain = dogestry.sign_request("GET", "/", None, {"Host": "h"}, EMPTY, CREDS, "r", "sts", NOW)
    signed = dogestry.sign_request("GET", "/", None, {"Host": "h"}, EMPTY, TOKEN_CREDS, "r", "sts", NOW)
    unsigned = dogestry.sign_request("GET", "/", None, {"Host": "h"}, EMPTY, TOKEN_CREDS, "r", "sts", NOW,
                                     sign_token=False)
    assert "X-Amz-Security-Token" not in plain
    assert signed["X-Amz-Security-Token"] == unsigned["X-Amz-Security-Token"] == "tok/en+="
    assert _signed_names(signed) == "host;x-amz-date;x-amz-security-token"
    assert signed["Authorization"] != plain["Authorization"]
    assert unsigned["Authorization"] == plain["Authorization"]  # as if there were no token
    assert signed["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AK/20200102/r/sts/aws4_request, SignedHeaders=")
    assert signed["X-Amz-Date"] == "20200102T030405Z"


def test_presign_query_session_token():
    """The token is a query parameter before the signature; sign_token=False leaves it out of the signature."""
    plain = dogestry.presign_query("GET", "h", "/k", None, CREDS, "r", "s3", NOW, 60)
    signed = dogestry.presign_query("GET", "h", "/k", None, TOKEN_CREDS, "r", "s3", NOW, 60)
    unsigned = dogestry.presign_query("GET", "h", "/k", None, TOKEN_CREDS, "r", "s3", NOW, 60, sign_token=False)
    token = ("X-Amz-Security-Token", "tok/en+=")
    assert token not in plain
    assert signed[:-1] == unsigned[:-1] == plain[:-1] + [token]
    assert signed[-1] != plain[-1]
    assert unsigned[-1] == plain[-1]


def test_presign_query_parameters():
    """Caller parameters first, then the X-Amz-* ones; host and any given headers are signed."""
    params = dogestry.presign_query("PUT", "h", "/k", [("partNumber", 1)], CREDS, "eu-west-1", "s3", NOW, 300,
                                    headers={"Content-MD5": "x", "Host": "ignored"})
    assert params[:-1] == [
        ("partNumber", "1"),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", "AK/20200102/eu-west-1/s3/aws4_request"),
        ("X-Amz-Date", "20200102T030405Z"),
        ("X-Amz-Expires", "300"),
        ("X-Amz-SignedHeaders", "content-md5;host")]
    assert params == dogestry.presign_query("PUT", "h", "/k", {"partNumber": "1"}, CREDS, "eu-west-1", "s3", NOW,
                                            300, headers={"Content-MD5": "x"})


@pytest.mark.parametrize("service, payload_hash", [("s3", "UNSIGNED-PAYLOAD"), ("sts", EMPTY)])
def test_presign_query_default_payload_hash(service, payload_hash):
    """Presigned S3 URLs leave the body unsigned; other services sign an empty body."""
    assert dogestry.presign_query("GET", "h", "/", None, CREDS, "r", service, NOW, 60) == \
        dogestry.presign_query("GET", "h", "/", None, CREDS, "r", service, NOW, 60, payload_hash=payload_hash)


@pytest.mark.parametrize("expires", [1, 60, 604800])
def test_presign_expires_within_limits(expires):
    params = dict(dogestry.presign_query("GET", "h", "/", None, CREDS, "r", "s3", NOW, expires))
    assert params["X-Amz-Expires"] == str(expires)


@pytest.mark.parametrize("expires", [0, -1, 604801, 10 ** 9])
def test_presign_expires_outside_limits(expires):
    """A presigned URL lives 1 second to 7 days."""
    with pytest.raises(dogestry.UsageError):
        dogestry.presign_query("GET", "h", "/", None, CREDS, "r", "s3", NOW, expires)
    with pytest.raises(dogestry.UsageError):
        dogestry.presign_url("GET", "https", "h", "/", CREDS, "r", NOW, expires)


def test_presign_url_encodes_path_query_and_token():
    url = dogestry.presign_url("GET", "http", "h:9000", "/bucket/my key+", TOKEN_CREDS, "r", NOW, 60,
                               query={"x": "1 2"})
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", "h:9000", "/bucket/my%20key%2B")
    assert "&X-Amz-Security-Token=tok%2Fen%2B%3D&" in parts.query
    assert "&x=1%202&" in parts.query
    params = dogestry.presign_query("GET", "h:9000", "/bucket/my key+", {"x": "1 2"}, TOKEN_CREDS, "r", "s3",
                                    NOW, 60)
    assert parts.query == dogestry.canonical_query(params[:-1]) + "&X-Amz-Signature=" + params[-1][1]
