"""The device refuses unusable TLS material, naming the file; the CA tooling makes good material."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.errors import BrokerRefused, TLSMaterialError, UplinkError
from agent.uplink.tls import (
    MIN_TLS_VERSION,
    check_material,
    classify_tls_error,
    client_context,
)
from noc.ca import CA, CAError, main, make_ca, make_key_and_csr
from tests.support.pki import PKI, Creds

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def material(pki: PKI, tmp_path: Path) -> Creds:
    """A private copy of pbx-test-1's certificate and key that a test may damage."""
    cert = tmp_path / "device.crt"
    key = tmp_path / "device.key"
    shutil.copy(pki.device("pbx-test-1").cert, cert)
    shutil.copy(pki.device("pbx-test-1").key, key)
    os.chmod(key, 0o600)
    return Creds("pbx-test-1", cert, key)


def test_good_material_is_accepted_and_described(pki: PKI, material: Creds) -> None:
    """Valid material passes and reports CN, expiry and the certificate's SHA-256 fingerprint."""
    info = check_material(pki.ca_file, material.cert, material.key, device_id="pbx-test-1")
    cert = x509.load_pem_x509_certificate(material.cert.read_bytes())
    assert info.cn == "pbx-test-1"
    assert info.not_after == cert.not_valid_after_utc
    assert info.fingerprint.replace(":", "") == cert.fingerprint(hashes.SHA256()).hex().upper()
    assert info.ca_count == 1


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o620, 0o610, 0o666])
def test_key_readable_or_writable_by_others_is_refused(
    pki: PKI, material: Creds, mode: int
) -> None:
    """A key file with any group/other bit is refused; the message says the mode and the fix."""
    os.chmod(material.key, mode)
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, material.cert, material.key)
    msg = str(err.value)
    assert msg.startswith(f"{material.key}:")
    assert f"{mode:04o}" in msg
    assert f"chmod 600 {material.key}" in msg


def test_owner_only_read_key_is_accepted(pki: PKI, material: Creds) -> None:
    """Mode 0400 is as private as 0600 and is accepted."""
    os.chmod(material.key, 0o400)
    assert check_material(pki.ca_file, material.cert, material.key).cn == "pbx-test-1"


def test_expired_certificate_is_refused_with_dates(pki: PKI) -> None:
    """An expired certificate is refused; the message names the file and the expiry date."""
    end = NOW - dt.timedelta(days=1)
    creds = pki.issue(
        "pbx-test-1", not_before=NOW - dt.timedelta(days=30), not_after=end, subdir="expired"
    )
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, creds.cert, creds.key)
    assert str(err.value).startswith(f"{creds.cert}:")
    assert "expired" in str(err.value)
    assert end.strftime("%Y-%m-%d") in str(err.value)


def test_not_yet_valid_certificate_is_refused_with_dates(pki: PKI) -> None:
    """A certificate valid only from tomorrow is refused, naming the file and the start date."""
    start = NOW + dt.timedelta(days=1)
    creds = pki.issue(
        "pbx-test-1", not_before=start, not_after=start + dt.timedelta(days=30), subdir="future"
    )
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, creds.cert, creds.key)
    assert str(err.value).startswith(f"{creds.cert}:")
    assert "not valid yet" in str(err.value)
    assert start.strftime("%Y-%m-%d") in str(err.value)


def test_validity_is_judged_at_the_given_time(pki: PKI, material: Creds) -> None:
    """``now`` decides validity: the same certificate is refused ten years from now."""
    later = NOW + dt.timedelta(days=3650)
    with pytest.raises(TLSMaterialError, match="expired"):
        check_material(pki.ca_file, material.cert, material.key, now=later)


def test_key_of_another_certificate_is_refused(pki: PKI, material: Creds) -> None:
    """pbx-test-1's certificate with pbx-test-2's key is refused, naming both files."""
    other_key = material.key.with_name("other.key")
    shutil.copy(pki.device("pbx-test-2").key, other_key)
    os.chmod(other_key, 0o600)
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, material.cert, other_key)
    assert str(err.value).startswith(f"{other_key}:")
    assert "does not match" in str(err.value)
    assert str(material.cert) in str(err.value)


def test_certificate_for_another_device_is_refused(pki: PKI, material: Creds) -> None:
    """A certificate whose CN is not the configured device id is refused, naming the file."""
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, material.cert, material.key, device_id="pbx-test-2")
    assert str(err.value).startswith(f"{material.cert}:")
    assert "'pbx-test-1'" in str(err.value)
    assert "'pbx-test-2'" in str(err.value)


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_missing_file_is_named(pki: PKI, material: Creds, tmp_path: Path, which: str) -> None:
    """Each missing file is refused with its own path and the configuration key to fix."""
    missing = tmp_path / f"missing-{which}.pem"
    files = {"ca": pki.ca_file, "cert": material.cert, "key": material.key} | {which: missing}
    with pytest.raises(TLSMaterialError) as err:
        check_material(files["ca"], files["cert"], files["key"])
    assert str(err.value).startswith(f"{missing}:")
    assert "not found" in str(err.value) or "cannot stat" in str(err.value)


def test_ca_file_without_certificate_is_refused(material: Creds, tmp_path: Path) -> None:
    """A CA file that holds no certificate (here: a private key) is refused, naming it."""
    bogus = tmp_path / "ca.pem"
    bogus.write_bytes(material.key.read_bytes())
    with pytest.raises(TLSMaterialError) as err:
        check_material(bogus, material.cert, material.key)
    assert str(err.value).startswith(f"{bogus}:")
    assert "no PEM certificate" in str(err.value)


def test_garbage_key_is_refused(pki: PKI, material: Creds) -> None:
    """A key file that is not a PEM key is refused, naming it."""
    material.key.write_text("not a key\n")
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, material.cert, material.key)
    assert str(err.value).startswith(f"{material.key}:")


def test_client_context_trusts_only_the_pinned_ca(pki: PKI, material: Creds) -> None:
    """The context pins exactly the CA file (no system store), checks names, needs TLS ≥ 1.2."""
    ctx = client_context(pki.ca_file, material.cert, material.key)
    assert ctx.minimum_version == MIN_TLS_VERSION == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    subjects = [c["subject"] for c in ctx.get_ca_certs()]
    assert subjects == [((("commonName", "pbx-agent test vendor CA"),),)]


def test_client_context_translates_load_errors(pki: PKI, material: Creds) -> None:
    """A key that does not load into the context becomes a TLSMaterialError naming the files."""
    with pytest.raises(TLSMaterialError) as err:
        client_context(pki.ca_file, material.cert, pki.device("pbx-test-2").key)
    assert str(material.cert) in str(err.value)


@pytest.mark.parametrize(
    ("text", "kind", "error"),
    [
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, "
            "certificate is not valid for 'x'. (_ssl.c:1006)",
            "wrong_host",
            UplinkError,
        ),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"
            " in certificate chain (_ssl.c:1006)",
            "wrong_ca",
            UplinkError,
        ),
        (
            "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:1006)",
            "client_refused",
            BrokerRefused,
        ),
        (
            "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert "
            "certificate required (_ssl.c:2580)",
            "client_refused",
            BrokerRefused,
        ),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", "not_tls", UplinkError),
        ("[Errno 111] Connection refused", "unreachable", UplinkError),
    ],
)
def test_tls_errors_are_classified(text: str, kind: str, error: type[UplinkError]) -> None:
    """Each OpenSSL failure text maps to its kind and to the agent error to raise."""
    failure = classify_tls_error(text, host="noc.example", ca_file="/etc/pbx-agent/ca.pem")
    assert failure.kind == kind
    assert type(failure.error()) is error
    assert text in failure.message


def test_verify_error_object_is_classified_by_code() -> None:
    """An SSLCertVerificationError is classified by its verify code, not only its text."""
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code = 62
    assert classify_tls_error(exc, host="noc.example").kind == "wrong_host"


# -- the CA tooling -------------------------------------------------------------


def test_box_key_and_csr_signed_by_the_ca_pass_the_checks(tmp_path: Path) -> None:
    """Key made on the box (0600) + CSR signed by the CA = material the agent accepts."""
    ca = make_ca(tmp_path / "ca")
    key, csr = make_key_and_csr("pbx-0001", tmp_path / "box")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in csr.read_bytes()
    cert = ca.sign_csr(csr.read_bytes(), tmp_path / "box" / "pbx-0001.crt", device_id="pbx-0001")
    info = check_material(ca.cert_path, cert, key, device_id="pbx-0001")
    assert info.cn == "pbx-0001"
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    eku = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_second_request_keeps_the_box_key(tmp_path: Path) -> None:
    """Re-running the request keeps the existing key: re-enrolling never changes the identity."""
    key, _ = make_key_and_csr("pbx-0001", tmp_path)
    before = key.read_bytes()
    make_key_and_csr("pbx-0001", tmp_path)
    assert key.read_bytes() == before


def test_csr_for_another_device_is_refused(tmp_path: Path) -> None:
    """The CA will not sign a request whose CN differs from the device id asked for."""
    ca = make_ca(tmp_path / "ca")
    _, csr = make_key_and_csr("pbx-0001", tmp_path / "box")
    with pytest.raises(CAError, match="pbx-0002"):
        ca.sign_csr(csr.read_bytes(), tmp_path / "x.crt", device_id="pbx-0002")


def test_ca_is_never_overwritten(tmp_path: Path) -> None:
    """make_ca refuses a directory that already holds a CA key."""
    make_ca(tmp_path)
    with pytest.raises(CAError, match="already exists"):
        make_ca(tmp_path)


def test_broker_certificate_names_loopback_and_given_names(tmp_path: Path) -> None:
    """The broker certificate carries DNS:localhost, IP:127.0.0.1 and the names given."""
    ca = make_ca(tmp_path)
    cert_path, key_path = ca.issue_server(["noc.vendor.example"], tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "noc.vendor.example"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_cli_init_broker_request_and_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line makes a CA, a broker certificate, and signs a box's CSR."""
    ca_dir, box = tmp_path / "ca", tmp_path / "box"
    assert main(["init", str(ca_dir)]) == 0
    assert main(["broker", str(ca_dir), "--name", "noc.example"]) == 0
    assert main(["request", str(box), "--id", "pbx-0009"]) == 0
    assert (
        main(
            [
                "device",
                str(ca_dir),
                "--id",
                "pbx-0009",
                "--csr",
                str(box / "pbx-0009.csr"),
                "--out",
                str(box),
            ]
        )
        == 0
    )
    info = check_material(
        CA.load(ca_dir).cert_path, box / "pbx-0009.crt", box / "pbx-0009.key", device_id="pbx-0009"
    )
    assert info.cn == "pbx-0009"
    assert main(["init", str(ca_dir)]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("years", [1, 40])  # UTCTime, and GeneralizedTime past 2049
def test_certificate_fields_are_read_as_cryptography_reads_them(pki: PKI, years: int) -> None:
    """The standard-library reader (agent/uplink/x509.py) gives the dates, common name and
    fingerprint that cryptography gives, for both encodings of time."""
    from agent.uplink import x509 as reader

    end = NOW.replace(microsecond=0) + dt.timedelta(days=365 * years)
    creds = pki.issue("pbx-test-1", not_after=end, subdir=f"years-{years}")
    ours = reader.load_pem_certificates(creds.cert.read_bytes())[0]
    theirs = x509.load_pem_x509_certificate(creds.cert.read_bytes())
    assert (ours.not_before, ours.not_after) == (
        theirs.not_valid_before_utc,
        theirs.not_valid_after_utc,
    )
    assert ours.not_after == end
    assert ours.cn == "pbx-test-1" and ours.subject == "CN=pbx-test-1"
    assert ours.issuer == theirs.issuer.rfc4514_string() and ours.serial == theirs.serial_number
    assert ours.der == theirs.public_bytes(serialization.Encoding.DER)


def test_encrypted_key_is_refused_without_a_prompt(pki: PKI, material: Creds) -> None:
    """A passphrase-protected key is refused, naming it, and nothing asks for a passphrase."""
    key = serialization.load_pem_private_key(material.key.read_bytes(), password=None)
    material.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, material.cert, material.key)
    assert str(err.value).startswith(f"{material.key}:")
    assert "encrypted" in str(err.value)


def test_truncated_certificate_is_refused(pki: PKI, material: Creds) -> None:
    """A certificate whose DER is cut short is refused naming the file, not a traceback."""
    text = material.cert.read_text().splitlines()
    material.cert.write_text("\n".join(text[:4] + text[-1:]) + "\n")
    with pytest.raises(TLSMaterialError) as err:
        check_material(pki.ca_file, material.cert, material.key)
    assert str(err.value).startswith(f"{material.cert}:")
