import re
import pytest
import test_s3_tls as t
from test_s3_tls import certs, tls_relay, tls_image  # noqa
from realdocker import run_dogestry
import time

def test_show(rgw, s3_env, certs, tls_relay, tls_image, bucket):
    for cert, host, bundle in [("server", "127.0.0.1", None), ("wrong-name", "127.0.0.1", certs.ca), ("wrong-name", "localhost", certs.ca),
                               ("server", "127.0.0.1", certs.dir / "nope.pem"), ("server", "127.0.0.1", certs.ca_key), ("server", "127.0.0.1", certs.dir)]:
        r = tls_relay(cert)
        env = t.https_env(s3_env, ca_bundle=bundle, endpoint="https://%s:%d" % (host, r.port))
        for cmd in (["push", "s3://%s/x/" % bucket, t.IMAGE], ["list", "s3://%s/x/" % bucket]):
            t0 = time.time()
            p = run_dogestry(*cmd, env=env)
            print("\n###", cert, host, bundle, cmd[0], "rc", p.returncode, "%.1fs" % (time.time()-t0), "handshake failures", len(r.failed_handshakes), r.failed_handshakes[:1])
            print(p.stderr)
