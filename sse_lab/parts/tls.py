"""A throwaway self-signed certificate for the kit's loopback servers (nginx with HTTP/2, notebook 06).

Browsers speak HTTP/2 only over TLS, so measuring HTTP/2 needs a certificate. This
one is made at run time, is valid for 127.0.0.1, ::1 and localhost only, for one
day, and lives in the temporary directory of the server that uses it. A browser
is told to accept it (`--ignore-certificate-errors`) rather than to trust it.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
VALID_FOR = datetime.timedelta(days=1)


def write_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write `cert.pem` and `key.pem` (an EC P-256 key, owner-only) into `directory`; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sse-lab loopback")])
    now = datetime.datetime.now(datetime.timezone.utc)
    hosts = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    hosts.append(x509.IPAddress(ipaddress.ip_address("::1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
