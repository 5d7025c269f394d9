"""Certificates Ambassador obtains and renews itself (section 10) and the crypto they need
(section 36).

In process: RFC 6979's test vectors, DER, keys, CSRs, JWS, renewal points, the checks a new
certificate must pass (made here with the same crypto: wrong names, a key that does not match,
a chain that does not verify, expired), and the [certificates] schema.  Against openssl: what
the file makes, verified by another implementation.  Black-box, with real CAs nobody here
wrote: OpenBao's PKI engine (sign and issue; AppRole and JWT logins) and pebble, Let's
Encrypt's test ACME server (http-01, tls-alpn-01, External Account Binding)."""

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from conftest import (OpenBao, Pebble, metric, need, request, tls_get, toml_dump, wait_for,
                      AMBASSADOR, ambassador_command, ROOT)

RFC6979_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
SPIFFE = "spiffe://cluster.local/ns/default/sa/"


# ------------------------------------------------------------------------------ crypto, in process

def test_rfc6979_public_key():
    import ambassador
    x, y = ambassador.p256_public(RFC6979_KEY)
    assert x == 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
    assert y == 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299
    assert ambassador.p256_on_curve((x, y))


@pytest.mark.parametrize("message, k, r, s", [        # RFC 6979 A.2.5, P-256 with SHA-256
    (b"sample", 0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60,
     0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
     0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8),
    (b"test", 0xD16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0,
     0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
     0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083),
])
def test_rfc6979_vectors(message, k, r, s):
    import ambassador
    digest = hashlib.sha256(message).digest()
    assert next(ambassador.rfc6979_nonces(RFC6979_KEY, digest)) == k
    assert ambassador.ecdsa_sign(RFC6979_KEY, message) == (r, s)
    public = ambassador.p256_public(RFC6979_KEY)
    assert ambassador.ecdsa_verify(public, message, (r, s))
    assert not ambassador.ecdsa_verify(public, message + b"!", (r, s))
    assert not ambassador.ecdsa_verify(public, message, (r, s ^ 1))
    assert not ambassador.ecdsa_verify(public, message, (0, s))


def test_new_keys_sign_and_verify():
    import ambassador
    for _ in range(3):
        d = ambassador.p256_new_key()
        assert 1 <= d < ambassador.P256_N
        signature = ambassador.ecdsa_sign(d, b"payment 42")
        assert ambassador.ecdsa_verify(ambassador.p256_public(d), b"payment 42", signature)
        other = ambassador.p256_public(ambassador.p256_new_key())
        assert not ambassador.ecdsa_verify(other, b"payment 42", signature)


@pytest.mark.parametrize("value, encoded", [
    (0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"), (255, "020200ff"),
    (256, "02020100"), (2 ** 63, "0209008000000000000000"),
])
def test_der_integers(value, encoded):
    import ambassador
    assert ambassador.der_int(value).hex() == encoded


@pytest.mark.parametrize("oid, encoded", [
    ("1.2.840.10045.2.1", "06072a8648ce3d0201"),          # id-ecPublicKey
    ("1.2.840.10045.3.1.7", "06082a8648ce3d030107"),      # prime256v1
    ("2.5.29.17", "0603551d11"),                         # subjectAltName
    ("1.3.6.1.5.5.7.1.31", "06082b0601050507011f"),      # acmeIdentifier (RFC 8737)
])
def test_der_oids(oid, encoded):
    import ambassador
    assert ambassador.der_oid(oid).hex() == encoded


@pytest.mark.parametrize("size, head", [(0, "0400"), (127, "047f"), (128, "048180"),
                                        (255, "0481ff"), (256, "04820100"),
                                        (70000, "0483011170")])
def test_der_lengths_read_back(size, head):
    import ambassador
    element = ambassador.der_octets(b"x" * size)
    assert element.hex().startswith(head)
    assert ambassador.der_read(element) == (4, b"x" * size, len(element))


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x05\x01", b"\x30\x85\x01\x00\x00\x00\x00",
                                  b"\x30\x82\x01"])
def test_der_read_refuses_truncated_input(data):
    import ambassador
    with pytest.raises(ValueError):
        ambassador.der_read(data)


def test_key_pem_round_trips_as_sec1_and_pkcs8():
    import ambassador
    d = ambassador.p256_new_key()
    sec1 = ambassador.ec_key_pem(d)
    assert sec1.startswith("-----BEGIN EC PRIVATE KEY-----\n")
    assert ambassador.ec_key_from_pem(sec1) == d
    # PKCS#8 wraps SEC1: AlgorithmIdentifier(ecPublicKey, P-256), then SEC1 in an OCTET STRING.
    inner = ambassador.pem_blocks(sec1, "EC PRIVATE KEY")[0]
    pkcs8 = ambassador.pem("PRIVATE KEY", ambassador.der_seq(
        ambassador.der_int(0), ambassador.der_seq(ambassador.der_oid(ambassador.OID_EC_PUBLIC_KEY),
                                                  ambassador.der_oid(ambassador.OID_P256)),
        ambassador.der_octets(inner)))
    assert ambassador.ec_key_from_pem(pkcs8) == d
    with pytest.raises(ValueError):
        ambassador.ec_key_from_pem("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE "
                                   "KEY-----\n")


def test_ssl_loads_what_the_file_makes():
    """The standard library's own TLS takes a key and self-signed certificate made here."""
    import ambassador
    d = ambassador.p256_new_key()
    now = time.time()
    cert = ambassador.pem("CERTIFICATE", ambassador.make_self_signed(
        d, "order.default.svc", ["order.default.svc", "10.0.0.7", SPIFFE + "order"],
        now - 60, now + 3600))
    info = ambassador.decode_certificate(cert)
    assert info["subject"] == ((("commonName", "order.default.svc"),),)
    assert ("URI", SPIFFE + "order") in info["subjectAltName"]
    assert ("IP Address", "10.0.0.7") in info["subjectAltName"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with ambassador.pem_files(cert, ambassador.ec_key_pem(d)) as (c, k):
        if os.path.isdir("/dev/fd"):
            assert c.startswith("/dev/fd/") and k.startswith("/dev/fd/")   # never on a disk
        context.load_cert_chain(c, k)


def test_jws_es256_and_hs256():
    import ambassador
    import hmac
    d = ambassador.p256_new_key()
    signed = ambassador.jws({"alg": "ES256", "nonce": "n", "url": "https://ca/x"}, {"a": 1}, d)
    assert json.loads(ambassador.b64url_decode(signed["payload"])) == {"a": 1}
    raw = ambassador.b64url_decode(signed["signature"])
    assert len(raw) == 64                                     # r || s, 32 bytes each
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    signing_input = ("%s.%s" % (signed["protected"], signed["payload"])).encode()
    assert ambassador.ecdsa_verify(ambassador.p256_public(d), signing_input, (r, s))
    post_as_get = ambassador.jws({"alg": "ES256"}, None, d)
    assert post_as_get["payload"] == ""
    eab = ambassador.jws({"alg": "HS256", "kid": "k"}, ambassador.jwk_of(d), hmac_key=b"secret")
    expected = hmac.new(b"secret", ("%s.%s" % (eab["protected"], eab["payload"])).encode(),
                        "sha256").digest()
    assert ambassador.b64url_decode(eab["signature"]) == expected


def test_jwk_thumbprint_is_rfc7638s():
    import ambassador
    jwk = ambassador.jwk_of(RFC6979_KEY)
    canonical = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % (jwk["x"], jwk["y"])
    assert ambassador.jwk_thumbprint(dict(jwk, extra="ignored")) == ambassador.b64url(
        hashlib.sha256(canonical.encode()).digest())


# ------------------------------------------------------------------------------ policies, in process

@pytest.mark.parametrize("renew_before, lifetime, expected_left", [
    ("33%", 3000.0, 990.0),          # a third of the lifetime left
    ("10%", 1000.0, 100.0),
    ("12h", 86400.0 * 3, 43200.0),
    ("12h", 3600.0, 1800.0),         # longer than the lifetime allows: at half, never at once
    ("90%", 1000.0, 500.0),
])
def test_renewal_point(renew_before, lifetime, expected_left):
    import ambassador
    m = ambassador.Material("", "", "", 1000.0, 1000.0 + lifetime, "", "", (), "", "")
    assert m.not_after - ambassador.renewal_point(m, renew_before) == pytest.approx(expected_left)


def self_signed(names, cn=None, key=None, start=-60, end=3600):
    import ambassador
    key = key or ambassador.p256_new_key()
    now = time.time()
    return ambassador.pem("CERTIFICATE", ambassador.make_self_signed(
        key, cn, names, now + start, now + end)), ambassador.ec_key_pem(key)


def certificate_config(**extra):
    import ambassador
    return ambassador.CertificateConfig(**dict(dict(
        name="w", issuer="vault", common_name="order.svc", sans=("order.svc", "127.0.0.1")),
        **extra))


def test_check_material_takes_a_good_one():
    import ambassador
    cert, key = self_signed(["order.svc", "127.0.0.1"], "order.svc")
    m = ambassador.material_of(cert, key, cert, "test")
    ambassador.check_material(m, certificate_config())
    assert m.sans == ("order.svc", "127.0.0.1") and m.subject == "commonName=order.svc"


@pytest.mark.parametrize("case, words", [
    ("names", "not what was asked (missing 127.0.0.1, extra other.svc)"),
    ("key", "do not load together"),
    ("chain", "does not verify"),
    ("expired", "is not valid now"),
])
def test_check_material_refuses(case, words):
    """What a CA may send wrong: refused with the reason, so the certificate serving stays."""
    import ambassador
    names = ["order.svc", "127.0.0.1"]
    cert, key = self_signed(["order.svc", "other.svc"] if case == "names" else names)
    ca = cert
    if case == "key":
        key = ambassador.ec_key_pem(ambassador.p256_new_key())
    elif case == "chain":
        ca = self_signed(names)[0]                       # another issuer's certificate
    elif case == "expired":
        cert, key = self_signed(names, start=-7200, end=-3600)
        ca = cert
    m = ambassador.material_of(cert, key, ca, "test")
    with pytest.raises(ambassador.IssuerError) as e:
        ambassador.check_material(m, certificate_config())
    assert e.value.reason == "invalid" and words in str(e.value), str(e.value)


class FakeVault:
    """A Vault that answers every sign/issue with what the test gives: the faults a real CA
    does not produce (wrong names, a broken chain, a key for another certificate)."""

    def __init__(self):
        self.answer = None
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.requests = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int([l.split(b":")[1] for l in head.split(b"\r\n")
                              if l.lower().startswith(b"content-length")][0])
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append((head.split(b" ")[1].decode(), head, body))
                reply = json.dumps(self.answer).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(reply), reply))

    def close(self):
        self.sock.close()


class Quiet:
    warnings = None

    def __init__(self):
        self.results = []

    def certificate_renewed(self, name, result):
        self.results.append(result)


@pytest.mark.parametrize("case", ["names", "chain", "key"])
def test_a_wrong_answer_from_the_ca_keeps_the_certificate_serving(tmp_path, case):
    import ambassador
    vault = FakeVault()
    try:
        token = tmp_path / "token"
        token.write_text("s.a-token-that-must-not-leak\n")
        config = certificate_config(vault=ambassador.VaultIssuerConfig(
            address=vault.address, role="svc", mode="issue", token_file=str(token)))
        managed = ambassador.ManagedCertificate(config, Quiet())
        good_cert, good_key = self_signed(["order.svc", "127.0.0.1"], "order.svc")
        vault.answer = {"data": {"certificate": good_cert, "private_key": good_key,
                                 "ca_chain": [good_cert]}}
        managed.renew()
        serving = managed.material
        cert, key = self_signed(["order.svc", "other.svc"] if case == "names"
                                else ["order.svc", "127.0.0.1"], "order.svc")
        chain = self_signed(["x.svc"])[0] if case == "chain" else cert
        if case == "key":
            key = good_key
        vault.answer = {"data": {"certificate": cert, "private_key": key, "ca_chain": [chain]}}
        with pytest.raises(ambassador.IssuerError) as e:
            managed.renew()
        assert e.value.reason == "invalid"
        assert managed.material is serving
        assert "a-token-that-must-not-leak" not in str(e.value)
        path, head, body = vault.requests[-1]
        assert path == "/v1/pki/issue/svc" and b"X-Vault-Token: s.a-token-that" in head
        assert json.loads(body)["common_name"] == "order.svc"
    finally:
        vault.close()


def test_sign_mode_sends_a_csr_for_the_names_and_keeps_the_key(tmp_path):
    import ambassador
    vault = FakeVault()
    try:
        token = tmp_path / "token"
        token.write_text("t")
        config = certificate_config(sans=("order.svc", SPIFFE + "order", "127.0.0.1"),
                                    vault=ambassador.VaultIssuerConfig(
                                        address=vault.address, role="svc", token_file=str(token)))
        vault.answer = {"errors": []}
        with pytest.raises(ambassador.IssuerError):
            ambassador.ManagedCertificate(config, Quiet()).renew()
        sent = json.loads(vault.requests[-1][2])
        assert vault.requests[-1][0] == "/v1/pki/sign/svc"
        assert (sent["alt_names"], sent["ip_sans"], sent["uri_sans"]) == (
            "order.svc", "127.0.0.1", SPIFFE + "order")
        assert "private_key" not in sent and "PRIVATE" not in vault.requests[-1][2].decode()
        csr = ambassador.pem_blocks(sent["csr"], "CERTIFICATE REQUEST")[0]
        assert ambassador.der_oid(ambassador.OID_EXTENSION_REQUEST) in csr
    finally:
        vault.close()


# ------------------------------------------------------------------------------ the schema

BASE = ('[listeners.a]\nlisten = 0\ncluster = "c"\n[clusters.c]\nendpoints = ["127.0.0.1:1"]\n')


@pytest.mark.parametrize("text, problem", [
    ('[certificates.w]\nissuer = "vault"\nsans = ["a.svc"]\n',
     'certificates.w.vault: required by issuer = "vault"'),
    ('[certificates.w]\nissuer = "acme"\n[certificates.w.acme]\ndirectory = "https://a/dir"\n',
     "certificates.w.sans: a certificate needs names"),
    ('[certificates.w]\nissuer = "ca"\nsans = ["a"]\n', 'certificates.w.issuer: expected one of'),
    ('[certificates.w]\nissuer = "vault"\nsans = ["a"]\nrenew_before = "150%"\n'
     '[certificates.w.vault]\naddress = "https://v"\nrole = "r"\ntoken_file = "/etc/hostname"\n',
     "certificates.w.renew_before: expected a share of the lifetime"),
    ('[certificates.w]\nissuer = "vault"\nsans = ["a"]\n[certificates.w.vault]\n'
     'address = "https://v"\nrole = "r"\nauth = "approle"\nrole_id_file = "/etc/hostname"\n',
     'certificates.w.vault.secret_id_file: required by auth = "approle"'),
    ('[certificates.w]\nissuer = "vault"\nsans = ["a"]\n[certificates.w.vault]\n'
     'address = "https://v"\nrole = "r"\ntoken_file = "/no/such/token"\n',
     "certificates.w.vault.token_file: no such file"),
    ('[certificates.w]\nissuer = "acme"\nsans = ["spiffe://c/x"]\n[certificates.w.acme]\n'
     'directory = "https://a/dir"\n', "certificates.w.sans: ACME validates DNS names"),
    ('[certificates.w]\nissuer = "acme"\nsans = ["a"]\n[certificates.w.acme]\n'
     'directory = "https://a/dir"\neab_kid = "k"\n', "certificates.w.acme.eab_kid: eab_kid and"),
    ('[certificates.w]\nissuer = "acme"\nsans = ["a"]\n[certificates.w.acme]\n'
     'directory = "https://a/dir"\nchalenge = "http-01"\n',
     'certificates.w.acme.chalenge: unknown key (did you mean "challenge"?)'),
    ('[listeners.a.tls]\ncertificate = "nope"\n', 'listeners.a.tls.certificate: no certificate '
     'named "nope"'),
    ('[listeners.a.tls]\nrequire_client_cert = true\n', "listeners.a.tls.cert: required key is "
     "missing"),
    ('[clusters.c.tls]\ntrust = "w2"\n', 'clusters.c.tls.trust: no certificate named "w2"'),
    ('[listeners.a.tls]\ncert = "/etc/hostname"\nkey = "/etc/hostname"\ncrl = "/no/crl"\n'
     'ca = "/etc/hostname"\n', "listeners.a.tls.crl: expected \"issuer\" or a CRL file"),
])
def test_bad_certificate_tables_name_their_key_path(text, problem):
    import ambassador
    with pytest.raises(ambassador.ConfigError) as e:
        ambassador.parse_config(ambassador.parse_toml(BASE + text))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_crl_issuer_needs_a_vault_certificate():
    import ambassador
    text = BASE + ('[certificates.w]\nissuer = "acme"\nsans = ["a"]\n[certificates.w.acme]\n'
                   'directory = "https://a/dir"\n[listeners.a.tls]\ncertificate = "w"\n'
                   'trust = "w"\ncrl = "issuer"\n')
    with pytest.raises(ambassador.ConfigError) as e:
        ambassador.parse_config(ambassador.parse_toml(text))
    assert any(p.startswith("listeners.a.tls.crl: \"issuer\" fetches the CRL") for p in
               e.value.problems), e.value.problems


# ------------------------------------------------------------------------------ against openssl

@pytest.mark.blackbox
def test_openssl_verifies_keys_requests_certificates_and_signatures(tmp_path):
    import ambassador
    d = ambassador.p256_new_key()
    (tmp_path / "k.pem").write_text(ambassador.ec_key_pem(d))
    (tmp_path / "csr.pem").write_text(ambassador.pem("CERTIFICATE REQUEST", ambassador.make_csr(
        d, "order.default.svc", ["order.default.svc", "10.0.0.7", SPIFFE + "order"])))
    now = time.time()
    (tmp_path / "c.pem").write_text(ambassador.pem("CERTIFICATE", ambassador.make_self_signed(
        d, "order.default.svc", ["order.default.svc"], now - 60, now + 3600)))
    (tmp_path / "msg").write_bytes(b"signed here, verified by openssl")
    r, s = ambassador.ecdsa_sign(d, b"signed here, verified by openssl")
    (tmp_path / "sig").write_bytes(ambassador.der_seq(ambassador.der_int(r), ambassador.der_int(s)))

    def openssl(*args):
        return subprocess.run(["openssl"] + list(args), cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=30)
    check = openssl("ec", "-check", "-noout", "-in", "k.pem")
    assert check.returncode == 0 and "EC Key valid" in check.stdout, check.stdout
    req = openssl("req", "-verify", "-noout", "-text", "-in", "csr.pem")
    assert req.returncode == 0 and "verify OK" in req.stdout, req.stdout
    assert "DNS:order.default.svc, IP Address:10.0.0.7, URI:%sorder" % SPIFFE in req.stdout
    assert "Subject: CN = order.default.svc" in req.stdout
    verify = openssl("verify", "-CAfile", "c.pem", "c.pem")
    assert verify.returncode == 0, verify.stdout
    assert openssl("pkey", "-in", "k.pem", "-pubout", "-out", "pub.pem").returncode == 0
    dgst = openssl("dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig", "msg")
    assert dgst.returncode == 0 and "Verified OK" in dgst.stdout, dgst.stdout
    same = openssl("x509", "-noout", "-pubkey", "-in", "c.pem")
    assert same.stdout == (tmp_path / "pub.pem").read_text()


# ------------------------------------------------------------------------------ OpenBao

def certificate_table(bao, tmp_path, auth="approle", mode="sign", sans=None, **extra):
    """A [certificates] table that logs in to bao with auth and asks role svc."""
    vault = {"address": bao.address, "ca": bao.ca, "role": "svc", "auth": auth, "mode": mode}
    if auth == "approle":
        (tmp_path / "role-id").write_text(bao.role_id)
        (tmp_path / "secret-id").write_text(bao.secret_id)
        vault.update(role_id_file=str(tmp_path / "role-id"),
                     secret_id_file=str(tmp_path / "secret-id"))
    elif auth == "jwt":
        (tmp_path / "jwt").write_text(bao.jwt())
        vault.update(jwt_file=str(tmp_path / "jwt"), login_role="order")
    return dict({"issuer": "vault", "common_name": (sans or ["payment.default.svc"])[0],
                 "sans": sans or ["payment.default.svc", "127.0.0.1", SPIFFE + "payment"],
                 "vault": vault}, **extra)


def mesh_configs(bao, tmp_path, app, **callee_tls):
    """Ambassador A (the caller's: a client certificate from bao by JWT) and B (the callee's:
    a server certificate from bao by AppRole), mTLS between them with SPIFFE names."""
    b = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
         "certificates": {"workload": certificate_table(bao, tmp_path)},
         "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "svc", "tls": dict({
             "certificate": "workload", "trust": "workload", "require_client_cert": True,
             "allowed_sans": [SPIFFE + "order"]}, **callee_tls)}},
         "clusters": {"svc": {"endpoints": [app.address]}}}
    a = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
         "certificates": {"workload": certificate_table(
             bao, tmp_path, auth="jwt", mode="issue",
             sans=["order.default.svc", SPIFFE + "order"])},
         "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "payment"}},
         "clusters": {"payment": {"endpoints": [], "tls": {
             "certificate": "workload", "trust": "workload", "server_name": "payment.default.svc",
             "match_san": [SPIFFE + "payment"]}}}}
    return a, b


def served_serial(port, context):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        with context.wrap_socket(plain, server_hostname="payment.default.svc") as s:
            return s.getpeercert()["serialNumber"]


def test_two_ambassadors_do_mtls_with_certificates_from_openbao(openbao, ambassador, upstream,
                                                                tmp_path):
    a_config, b_config = mesh_configs(openbao, tmp_path, upstream)
    b = ambassador(b_config)
    a_config["clusters"]["payment"]["endpoints"] = ["127.0.0.1:%d" % b.port()]
    a = ambassador(a_config)
    status, _, body = request(a.port(), "GET", "/pay")
    assert status == 200
    seen = upstream.requests[-1]
    assert "URI=%sorder" % SPIFFE in (seen.header("x-forwarded-client-cert") or "")
    for amb, names in ((a, ["order.default.svc", SPIFFE + "order"]),
                       (b, ["payment.default.svc", "127.0.0.1", SPIFFE + "payment"])):
        certs = json.loads(amb.admin("/certs")[1])["certificates"]
        assert [c["name"] for c in certs] == ["workload"]
        assert certs[0]["sans"] == names and certs[0]["issued_by"] == "commonName=Test Root"
        assert certs[0]["source"] == "vault " + openbao.address and certs[0]["last_error"] is None
        assert metric(amb, "ambassador_certificate_renewals_total", certificate="workload",
                      result="success") == 1
        expiry = metric(amb, "ambassador_certificate_expiry_timestamp_seconds",
                        certificate="workload")
        renewal = metric(amb, "ambassador_certificate_next_renewal_timestamp_seconds",
                         certificate="workload")
        assert time.time() < renewal < expiry
        # No secret anywhere an operator looks: log, /config, /certs, /metrics.
        seen_text = amb.stderr() + amb.admin("/config")[1] + amb.admin("/certs")[1] + \
            amb.admin("/metrics")[1]
        for secret in (openbao.secret_id, openbao.role_id, openbao.jwt().split(".")[2][:20],
                       "PRIVATE KEY"):
            assert secret not in seen_text
    # A caller without a client certificate from the issuer: refused at the handshake.
    stranger = ssl.create_default_context(cafile=openbao.ca)
    stranger.check_hostname = False
    stranger.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, OSError)):
        reply = tls_get(b.port(), stranger)
        assert not reply.startswith(b"HTTP/1.1 200")


def test_short_lived_certificates_renew_under_load_without_a_failed_request(
        openbao, ambassador, upstream, tmp_path):
    """9-second certificates (so that CI waits seconds, not minutes), renewed at half their
    life, on both sides, three times, while a caller sends requests on new and kept
    connections alike: not one fails, and the callee serves a new certificate."""
    openbao.role("brief", "8s", not_before_duration="1s")
    a_config, b_config = mesh_configs(openbao, tmp_path, upstream)
    for config in (a_config, b_config):
        config["certificates"]["workload"]["vault"]["role"] = "brief"
        config["certificates"]["workload"]["renew_before"] = "50%"
    b = ambassador(b_config)
    a_config["clusters"]["payment"]["endpoints"] = ["127.0.0.1:%d" % b.port()]
    a = ambassador(a_config)
    first = json.loads(b.admin("/certs")[1])["certificates"][0]["serial"]
    failures, done, count = [], threading.Event(), [0]

    def load():
        import http.client
        while not done.is_set() and count[0] < 20000:
            conn = http.client.HTTPConnection("127.0.0.1", a.port(), timeout=10)
            try:
                for _ in range(5):                           # kept, then a new connection
                    conn.request("GET", "/x")
                    r = conn.getresponse()
                    r.read()
                    count[0] += 1
                    if r.status != 200:
                        failures.append(r.status)
            except OSError as e:
                failures.append(repr(e))
            finally:
                conn.close()
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(metric(x, "ambassador_certificate_renewals_total",
                                    certificate="workload", result="success") >= 4
                             for x in (a, b)), 45, "three renewals on each side")
    finally:
        done.set()
        for t in threads:
            t.join(20)
    assert failures == [] and count[0] > 50, (failures[:5], count[0])
    assert json.loads(b.admin("/certs")[1])["certificates"][0]["serial"] != first
    for x in (a, b):
        assert metric(x, "ambassador_certificate_renewals_total", certificate="workload",
                      result="failure") == 0


class Switch:
    """A TCP relay to a server that the test turns off and on: the CA "down" for a while,
    its state kept (OpenBao's dev server forgets everything when it restarts)."""

    def __init__(self, port):
        self.target = port
        self.up = True
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
                conn.close()                          # a reset, as from a host that is down
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_the_ca_down_during_a_renewal_the_old_certificate_serves(openbao, ambassador, upstream,
                                                                 tmp_path):
    openbao.role("sixteen", "15s", not_before_duration="1s")
    switch = Switch(openbao.port)
    try:
        table = certificate_table(openbao, tmp_path, renew_before="50%")
        table["vault"].update(role="sixteen", address="https://127.0.0.1:%d" % switch.port)
        config = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
                  "certificates": {"workload": table},
                  "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "svc", "tls": {
                      "certificate": "workload"}}},
                  "clusters": {"svc": {"endpoints": [upstream.address]}}}
        amb = ambassador(config)
        trust = ssl.create_default_context(cadata=openbao.api("GET", "pki/cert/ca")["data"][
            "certificate"])
        first = served_serial(amb.port(), trust)
        switch.up = False
        wait_for(lambda: metric(amb, "ambassador_certificate_renewals_total",
                                certificate="workload", result="failure") >= 2, 20,
                 "two failed renewals")
        assert served_serial(amb.port(), trust) == first              # the old one serves
        assert json.loads(amb.admin("/certs")[1])["certificates"][0]["last_error"] == \
            "unreachable"
        assert tls_get(amb.port(), trust, server_hostname="payment.default.svc").startswith(
            b"HTTP/1.1 200")
        switch.up = True
        wait_for(lambda: served_serial(amb.port(), trust) != first, 15, "a new certificate")
        assert json.loads(amb.admin("/certs")[1])["certificates"][0]["last_error"] is None
        # One line per change of reason, not one per retry.
        assert amb.stderr().count("renewal failed (unreachable)") == 1, amb.stderr()
    finally:
        switch.close()


def test_a_restart_reuses_state_dir_without_a_new_issuance(openbao, ambassador, upstream,
                                                           tmp_path):
    state = tmp_path / "state"
    table = certificate_table(openbao, tmp_path, state_dir=str(state))
    config = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
              "shutdown": {"drain_timeout": "5s", "min_drain": "0s"},
              "certificates": {"workload": table},
              "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "svc",
                                    "tls": {"certificate": "workload"}}},
              "clusters": {"svc": {"endpoints": [upstream.address]}}}
    first = ambassador(config)
    serial = json.loads(first.admin("/certs")[1])["certificates"][0]["serial"]
    for name in ("workload.cert.pem", "workload.key.pem", "workload.ca.pem"):
        assert os.stat(str(state / name)).st_mode & 0o777 == 0o600
    assert os.stat(str(state)).st_mode & 0o777 == 0o700
    first.terminate()
    first.wait()
    second = ambassador(config)
    certs = json.loads(second.admin("/certs")[1])["certificates"][0]
    assert certs["serial"] == serial and certs["source"] == "state_dir " + str(state)
    assert metric(second, "ambassador_certificate_renewals_total", certificate="workload",
                  result="success") == 0


def test_a_reload_issues_again_only_a_certificate_whose_table_changed(
        openbao, ambassador, upstream, tmp_path):
    config = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
              "certificates": {"workload": certificate_table(openbao, tmp_path),
                               "other": certificate_table(openbao, tmp_path,
                                                          sans=["other.default.svc"])},
              "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "svc",
                                    "tls": {"certificate": "workload"}}},
              "clusters": {"svc": {"endpoints": [upstream.address]}}}
    amb = ambassador(config)
    trust = ssl.create_default_context(cadata=openbao.api("GET", "pki/cert/ca")["data"][
        "certificate"])

    def issued(name):
        return metric(amb, "ambassador_certificate_renewals_total", certificate=name,
                      result="success")
    wait_for(lambda: issued("other") == 1, 10, "the second certificate")
    first = served_serial(amb.port(), trust)
    assert amb.admin("/reload", "POST")[0] == 200               # nothing changed
    assert (issued("workload"), issued("other")) == (1, 1)
    config["certificates"]["workload"]["sans"].append("pay.default.svc")
    with open(amb.config_path, "w") as f:
        f.write(toml_dump(config))
    assert amb.admin("/reload", "POST")[0] == 200
    # served_serial raises on a failed handshake: the old certificate serves until the new one.
    wait_for(lambda: served_serial(amb.port(), trust) != first, 10, "the listener's new one")
    certs = {c["name"]: c for c in json.loads(amb.admin("/certs")[1])["certificates"]}
    assert "pay.default.svc" in certs["workload"]["sans"]
    assert issued("other") == 1


@pytest.mark.parametrize("crl", ["issuer", "file"])
def test_a_revoked_client_certificate_is_refused_after_the_crl_refresh(openbao, ambassador,
                                                                       upstream, tmp_path, crl):
    """crl = "issuer": fetched from OpenBao each reload_interval; a file: watched (here the
    file is OpenBao's CRL, written by the test as a cron job would)."""
    crl_file = tmp_path / "issuer.crl"

    def write_crl():
        crl_file.write_text(openbao.api_text("GET", "pki/crl/pem"))
    write_crl()
    config = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
              "certificates": {"workload": certificate_table(openbao, tmp_path)},
              "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "svc", "tls": {
                  "certificate": "workload", "trust": "workload",
                  "crl": "issuer" if crl == "issuer" else str(crl_file),
                  "require_client_cert": True, "reload_interval": "300ms"}}},
              "clusters": {"svc": {"endpoints": [upstream.address]}}}
    amb = ambassador(config)
    issued = openbao.api("POST", "pki/issue/svc", {"common_name": "order.default.svc",
                                                   "uri_sans": SPIFFE + "order"})["data"]
    (tmp_path / "client.pem").write_text(issued["certificate"])
    (tmp_path / "client.key").write_text(issued["private_key"])
    context = ssl.create_default_context(cadata=issued["issuing_ca"])
    context.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    assert tls_get(amb.port(), context, server_hostname="payment.default.svc").startswith(
        b"HTTP/1.1 200")
    openbao.api("POST", "pki/revoke", {"serial_number": issued["serial_number"]})
    if crl == "file":
        time.sleep(0.01)                      # a new mtime, whatever the file system's grain
        write_crl()

    def refused():
        try:
            return not tls_get(amb.port(), context,
                               server_hostname="payment.default.svc").startswith(b"HTTP/1.1 200")
        except (ssl.SSLError, OSError):
            return True
    wait_for(refused, 10, "the revoked certificate refused")
    # Python 3.6's ssl gives no verification detail: there the reason is verify_failed.
    reason = "revoked" if sys.version_info >= (3, 7) else "verify_failed"
    wait_for(lambda: (metric(amb, "ambassador_tls_handshake_errors_total", side="downstream",
                             name="app", reason=reason) or 0) >= 1, 5, "the refusal counted")


def test_ready_waits_for_the_certificate_and_says_which(ambassador, upstream, tmp_path):
    """A CA that cannot be reached at start: the process serves its admin port, /ready is 503
    naming the certificate, and the log says why, without the token."""
    token = tmp_path / "token"
    token.write_text("s.never-printed")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))                          # bound, never listening: refused
    config = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
              "certificates": {"workload": {
                  "issuer": "vault", "sans": ["payment.default.svc"],
                  "vault": {"address": "http://127.0.0.1:%d" % dead.getsockname()[1],
                            "role": "svc", "token_file": str(token)}}},
              "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "svc",
                                    "tls": {"certificate": "workload"}}},
              "clusters": {"svc": {"endpoints": [upstream.address]}}}
    amb = ambassador(config, ready=False)
    try:
        # The first renewal may fail before the admin port is bound: wait for both.
        wait_for(lambda: "renewal failed (unreachable)" in amb.stderr() and
                 amb.bound().get("admin"), 15, "the failure logged and the admin port bound")
        status, body = amb.admin("/ready")
        assert status == 503
        assert "listener app: certificate workload not yet obtained" in body
        assert "never-printed" not in amb.stderr()
    finally:
        dead.close()


def test_check_loads_tls_that_names_certificates_without_the_network():
    """--check: the tables are valid, the certificates not there yet (no CA is asked)."""
    import ambassador
    config = ambassador.parse_config(ambassador.parse_toml(BASE + (
        '[certificates.w]\nissuer = "vault"\nsans = ["a.svc"]\n[certificates.w.vault]\n'
        'address = "https://127.0.0.1:9"\nrole = "r"\ntoken_file = "/etc/hostname"\n'
        '[listeners.a.tls]\ncertificate = "w"\ntrust = "w"\ncrl = "issuer"\n'
        '[clusters.c.tls]\ncertificate = "w"\ntrust = "w"\n')))
    ambassador.check_tls_material(config)


@pytest.mark.blackbox
def test_check_refuses_bad_certificate_tables_with_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE + '[certificates.w]\nissuer = "vault"\nsans = ["a.svc"]\n'
                    'renew_before = "0%"\n[certificates.w.vault]\naddress = "ftp://v"\n'
                    'role = "r"\n[listeners.a.tls]\ncertificate = "v"\n')
    result = subprocess.run(ambassador_command("-c", str(path), "--check"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=30)
    assert result.returncode == 2
    for problem in ("certificates.w.vault.address: expected an http:// or https:// URL",
                    'certificates.w.renew_before: expected a share of the lifetime',
                    'listeners.a.tls.certificate: no certificate named "v"'):
        assert problem in result.stderr, result.stderr


# ------------------------------------------------------------------------------ pebble (ACME)

@pytest.fixture(scope="module")
def pebble(tmp_path_factory, pki):
    import base64
    key = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    # A third of requests refused with badNonce: RFC 8555 6.5's retry works, or nothing does.
    p = Pebble(tmp_path_factory.mktemp("pebble"), pki, eab={"kid-order": key}, nonce_reject=30)
    p.eab_key = key
    yield p
    p.stop()


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_a_listener_serves_a_certificate_from_acme(pebble, ambassador, upstream, tmp_path,
                                                   challenge):
    (tmp_path / "eab").write_text(pebble.eab_key)
    port = pebble.http_port if challenge == "http-01" else pebble.tls_port
    config = {"admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
              "certificates": {"edge": {
                  "issuer": "acme", "sans": ["order.test", "www.order.test"],
                  "acme": {"directory": pebble.directory, "ca": pebble.ca,
                           "contact": "mailto:ops@example.com", "challenge": challenge,
                           "challenge_listen": "127.0.0.1:%d" % port, "eab_kid": "kid-order",
                           "eab_hmac_key_file": str(tmp_path / "eab")}}},
              "listeners": {"app": {"listen": "127.0.0.1:0", "cluster": "svc",
                                    "tls": {"certificate": "edge"}}},
              "clusters": {"svc": {"endpoints": [upstream.address]}}}
    amb = ambassador(config, ready=False).wait_ready(60)
    context = ssl.create_default_context(cadata=pebble.roots())
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    assert tls_get(amb.port(), context, server_hostname="www.order.test").startswith(
        b"HTTP/1.1 200")
    cert = json.loads(amb.admin("/certs")[1])["certificates"][0]
    assert cert["sans"] == ["order.test", "www.order.test"]
    assert cert["issued_by"].startswith("commonName=Pebble Intermediate CA")
    assert pebble.eab_key not in amb.stderr() + amb.admin("/config")[1]
    # The challenge responder is bound only while an order waits.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
