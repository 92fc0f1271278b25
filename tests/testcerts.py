"""A throwaway certificate authority for the TLS tests, made with the openssl CLI.

    make_ca(d, "ca")                                          # d/ca.pem, d/ca-key.pem
    make_leaf(d, "ca", "server", "/CN=host", server_ext("IP:127.0.0.1, DNS:localhost"))
                                                              # d/server-cert.pem, d/server-key.pem
Keys are EC P-256 (quick to make); certificates last two days.
"""

import shutil
import subprocess

import pytest

from conftest import skip_or_fail

CA_EXT = ("basicConstraints = critical, CA:TRUE\n"
          "keyUsage = critical, keyCertSign, cRLSign\n"
          "subjectKeyIdentifier = hash\n")
CLIENT_EXT = ("extendedKeyUsage = clientAuth\n"
              "keyUsage = critical, digitalSignature\n"
              "authorityKeyIdentifier = keyid, issuer\n")


def server_ext(alt_names):
    """The extensions of a server certificate for ALT_NAMES, e.g. 'IP:127.0.0.1, DNS:localhost'."""
    return ("subjectAltName = %s\n" % alt_names +
            "basicConstraints = CA:FALSE\n"
            "extendedKeyUsage = serverAuth\n"
            "keyUsage = critical, digitalSignature\n"
            "authorityKeyIdentifier = keyid, issuer\n")


def openssl(cwd, *args):
    """Run the openssl CLI in CWD; fail the test with its output if it fails."""
    proc = subprocess.run(["openssl"] + [str(a) for a in args], cwd=str(cwd), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail("openssl %s failed:\n%s" % (" ".join(map(str, args)), proc.stdout), pytrace=False)


def new_key(d, path):
    openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def ca_dir(tmp_path_factory, name):
    """A fresh directory holding a CA as ca.pem and ca-key.pem (openssl must be installed)."""
    if not shutil.which("openssl"):
        skip_or_fail("openssl not found on PATH (install openssl)")
    d = tmp_path_factory.mktemp(name)
    make_ca(d, "ca")
    return d


def make_ca(d, name):
    """A self-signed CA in D: NAME.pem and NAME-key.pem."""
    (d / "ca-ext.cnf").write_text(CA_EXT)
    new_key(d, name + "-key.pem")
    openssl(d, "req", "-new", "-key", name + "-key.pem", "-subj", "/CN=dogestry test %s" % name,
            "-out", name + ".csr")
    openssl(d, "x509", "-req", "-days", "2", "-sha256", "-in", name + ".csr", "-signkey", name + "-key.pem",
            "-extfile", "ca-ext.cnf", "-out", name + ".pem")


def make_leaf(d, ca, name, subject, ext):
    """A key NAME-key.pem and a cert NAME-cert.pem in D for SUBJECT, signed by CA (CA.pem, CA-key.pem)."""
    (d / (name + "-ext.cnf")).write_text(ext)
    new_key(d, name + "-key.pem")
    openssl(d, "req", "-new", "-key", name + "-key.pem", "-subj", subject, "-out", name + ".csr")
    openssl(d, "x509", "-req", "-days", "2", "-sha256", "-in", name + ".csr", "-CA", ca + ".pem",
            "-CAkey", ca + "-key.pem", "-CAcreateserial", "-extfile", name + "-ext.cnf",
            "-out", name + "-cert.pem")
    openssl(d, "verify", "-CAfile", ca + ".pem", name + "-cert.pem")
