"""TLS and mutual TLS, end to end: facilities bound to a client-certificate
subject or fingerprint; a message whose MSH-4 is not the facility that
authenticated is rejected (AR) and recorded."""
from __future__ import annotations

import datetime as dt
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, text

from tests.support import ExchangeProcess, adt, msa, write_config


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Network"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer_name, issuer_key, *, ca=False, server=False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(directory: Path, stem: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("Test CA", None, None, ca=True)
    (d / "ca").mkdir()
    _write(d / "ca", "ca", ca_key, ca_cert)
    (d / "ca" / "ca.key").unlink()
    (d / "ca" / "ca.crt").rename(d / "ca" / "ca.pem")
    files = {"ca_dir": d / "ca", "ca": d / "ca" / "ca.pem"}
    for stem, cn, server in [("server", "localhost", True), ("genhosp", "genhosp-engine", False), ("oaknh", "oaknh-engine", False), ("rogue", "rogue-engine", False)]:
        key, cert = _issue(cn, ca_cert.subject, ca_key, server=server)
        files[stem] = _write(d, stem, key, cert)
        files[f"{stem}_fingerprint"] = cert.fingerprint(hashes.SHA256()).hex(":")
    return files


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    key, cert = pki["server"]
    facilities = f"""
[[facility]]
code = "GENHOSP"
name = "General Hospital"
kind = "hospital"
authority = "GENHOSP"
tls_subject = "CN=genhosp-engine,O=Test Network"

[[facility]]
code = "OAKNH"
name = "Oakwood Nursing Home"
kind = "nursing_home"
authority = "OAKNH"
tls_fingerprint = "sha256:{pki['oaknh_fingerprint'].upper()}"

[[facility]]
code = "HHCARE"
name = "Sunrise Home Health"
kind = "home_health"
authority = "HHCARE"
"""
    mllp = f'"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCertsDir={pki["ca_dir"]}"'
    database = f"sqlite:///{tmp / 'tls.db'}"
    proc = ExchangeProcess(write_config(tmp, mllp=mllp, facilities=facilities), database).start()
    proc.database_url = database
    yield proc
    proc.stop()


def tls_request(address, pki, client: str | None, payload: bytes) -> bytes:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if client:
        key, cert = pki[client]
        context.load_cert_chain(str(cert), str(key))
    import socket

    with socket.create_connection(address, timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"\x0b" + payload + b"\x1c\r")
            data = b""
            while b"\x1c\r" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
    return data[1:-2]


def test_bound_subject_is_accepted_for_its_own_facility(tls_server, pki):
    assert msa(tls_request(tls_server.address, pki, "genhosp", adt("TLS-1", facility="GENHOSP")))[:2] == ["AA", "TLS-1"]


def test_bound_fingerprint_is_accepted_for_its_own_facility(tls_server, pki):
    assert msa(tls_request(tls_server.address, pki, "oaknh", adt("TLS-2", facility="OAKNH")))[0] == "AA"


def test_a_certificate_claiming_another_facility_is_rejected_and_recorded(tls_server, pki):
    reply = msa(tls_request(tls_server.address, pki, "genhosp", adt("TLS-3", facility="OAKNH")))
    assert reply[:2] == ["AR", "TLS-3"]
    assert "certificate" in reply[2]
    # a certificate bound to GENHOSP may not send as an unbound facility either
    assert msa(tls_request(tls_server.address, pki, "genhosp", adt("TLS-4", facility="HHCARE")))[0] == "AR"
    # an unbound (but CA-signed) certificate may send as an unbound facility, not as a bound one
    assert msa(tls_request(tls_server.address, pki, "rogue", adt("TLS-5", facility="HHCARE")))[0] == "AA"
    assert msa(tls_request(tls_server.address, pki, "rogue", adt("TLS-6", facility="GENHOSP")))[0] == "AR"
    engine = create_engine(tls_server.database_url)
    with engine.connect() as conn:
        state, reason, peer = conn.execute(
            text("select state, reason, peer from message where control_id = 'TLS-3'")
        ).one()
    engine.dispose()
    assert state == "rejected"
    assert "certificate" in reason
    assert "CN=genhosp-engine" in peer


def test_a_client_without_a_certificate_cannot_connect(tls_server, pki):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_request(tls_server.address, pki, None, adt("TLS-7"))


def test_exchange_send_over_mutual_tls(tls_server, pki, tmp_path):
    key, cert = pki["genhosp"]
    message = tmp_path / "one.hl7"
    message.write_bytes(adt("TLS-SEND-1", facility="GENHOSP"))
    host, port = tls_server.address
    endpoint = f"tls:host=localhost:port={port}:caCertsDir={pki['ca_dir']}:certificate={cert}:privateKey={key}"
    done = subprocess.run(
        [sys.executable, "-m", "exchange.cli", "send", endpoint, str(message)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "TLS-SEND-1\tAA" in done.stdout


def test_exchange_send_to_a_server_it_does_not_trust_sends_nothing(tls_server, pki, tmp_path):
    """Found by a black-box audit: the refused handshake was counted as a message sent and
    unanswered ("sent 1, ... no reply 1": the receiver may have it), though nothing went."""
    other_key, other_ca = _issue("Another CA", None, None, ca=True)
    trust = tmp_path / "trust"
    trust.mkdir()
    _write(trust, "other", other_key, other_ca)
    (trust / "other.key").unlink()
    (trust / "other.crt").rename(trust / "other.pem")
    key, cert = pki["genhosp"]
    message = tmp_path / "one.hl7"
    message.write_bytes(adt("TLS-SEND-2", facility="GENHOSP"))
    host, port = tls_server.address
    endpoint = f"tls:host=localhost:port={port}:caCertsDir={trust}:certificate={cert}:privateKey={key}"
    done = subprocess.run([sys.executable, "-m", "exchange.cli", "send", endpoint, str(message)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("exchange send: cannot connect to tls:") and "certificate verify failed" in line


def _handshake(address, pki, *, ciphers: str | None = None, version=None) -> str:
    """The cipher a TLS client (genhosp's certificate) gets, or raises ssl.SSLError."""
    import socket

    context = ssl.create_default_context(cafile=str(pki["ca"]))
    key, cert = pki["genhosp"]
    context.load_cert_chain(str(cert), str(key))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    with socket.create_connection(address, timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            return s.cipher()[0]


def test_tls_takes_only_forward_secret_aead_suites(tls_server, pki):
    """Twisted's default list let a TLS 1.2 client use RSA key exchange and CBC with SHA-1
    (AES128-SHA), which hospitals' security scanners flag."""
    # (the test PKI's keys are ECDSA)
    assert _handshake(tls_server.address, pki, version=ssl.TLSVersion.TLSv1_2,
                      ciphers="ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    for weak in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"):
        with pytest.raises(ssl.SSLError):
            _handshake(tls_server.address, pki, version=ssl.TLSVersion.TLSv1_2, ciphers=weak)
    assert _handshake(tls_server.address, pki).startswith("TLS_")  # TLS 1.3 as a client prefers it
