"""vendgate's own certificate authority for kiosks' client certificates (mutual TLS).

`vendgate ca init` creates the CA (EC P-256) and the gateway's server certificate in the data
folder; `vendgate kiosk cert <terminal>` issues a client certificate whose subject CN is the
kiosk's terminal id, records its serial and fingerprint against that kiosk, and writes key and
certificate files. Revocation is a row update checked on every kiosk request, so it takes effect
at once without a CRL round trip. Private keys are written mode 0600, into a new file renamed
over the old one, and never logged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import VendgateError

ca_validity_days = 3650
leaf_validity_days = 397
# `vendgate ca init` issues the gateway's server certificate anew this close to its end.
server_renew_days = 30
default_server_names = ("localhost", "127.0.0.1")


class CertificateError(VendgateError):
    pass


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key to `path` by way of a new file, mode 0600, renamed over it.

    Opening `path` itself would write the key into whatever is there: an earlier key file copied
    with a looser mode keeps that mode (os.open applies one only to a file it creates), and a
    symbolic link planted in a shared folder would take the key wherever it points. The key goes
    into a fresh file in the same folder instead (O_EXCL and O_NOFOLLOW: never one that exists,
    nor a link), made 0600 whatever the umask, synced, then renamed over `path`: a reader sees
    the old file or the whole new key, and a crash leaves no half-written key at `path`."""
    _write_whole(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    """A certificate, written as a key is but readable by all: never half of one at `path`."""
    _write_whole(path, data, 0o644)


def _write_whole(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.ca_cert_path = self.directory / "ca.pem"
        self.ca_key_path = self.directory / "ca.key"
        self.server_cert_path = self.directory / "server.pem"
        self.server_key_path = self.directory / "server.key"

    @property
    def exists(self) -> bool:
        return self.ca_cert_path.exists() and self.ca_key_path.exists()

    def init(self, *, server_names: tuple[str, ...] = default_server_names, now: dt.datetime) -> bool:
        """Create CA and server certificate unless present. Returns True when created.

        One of ca.pem and ca.key without the other (a data folder half restored, a file moved
        away) is refused rather than replaced by a new CA: that would void every kiosk
        certificate the old one issued, and the operator may still have the missing file."""
        if self.exists:
            return False
        present = [path for path in (self.ca_cert_path, self.ca_key_path) if path.is_symlink() or path.exists()]
        if present:
            missing = self.ca_key_path if present[0] == self.ca_cert_path else self.ca_cert_path
            raise CertificateError(f"{present[0]} is there but {missing.name} is not: restore {missing.name}, or "
                                   f"move {present[0].name} away to create a new CA (every kiosk certificate "
                                   "issued so far would then need issuing again)")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vendgate"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "vendgate kiosk CA")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=ca_validity_days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _write_private(self.ca_key_path, _key_pem(key))
        _write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._issue_server(now, server_names)
        return True

    def server_certificate(self) -> x509.Certificate | None:
        """The gateway's server certificate, None when it is missing or unreadable."""
        try:
            return x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
        except (OSError, ValueError):
            return None

    def renew_server(self, *, now: dt.datetime, server_names: tuple[str, ...] | None = None,
                     force: bool = False) -> x509.Certificate | None:
        """Issue the gateway's server certificate anew under this CA when it is missing, without
        its key, unreadable, within server_renew_days of its end, or `force`: the new one, else None.

        A server certificate lives leaf_validity_days (397), the CA ten years: without this the
        kiosks' handshakes would fail after 13 months, and a new CA would void every kiosk's
        certificate. `server_names` default to those of the certificate it replaces. The gateway
        loads its certificate when it starts: restart `vendgate serve` after a renewal.
        """
        if server_names is not None:
            server_names = checked_server_names(server_names)
        current = self.server_certificate()
        if current is not None and not force and self._server_key_matches(current) \
                and current.not_valid_after_utc - now > dt.timedelta(days=server_renew_days):
            return None
        if server_names is None:
            if current is None and self.server_cert_path.exists():
                raise CertificateError(f"{self.server_cert_path} cannot be read: name the gateway with "
                                       "`vendgate ca server-cert --name ...` to issue it anew")
            server_names = certificate_names(current) if current is not None else default_server_names
        return self._issue_server(now, server_names)

    def _server_key_matches(self, cert: x509.Certificate) -> bool:
        """The server key loads and is the certificate's (a renewal cut short between the two
        files leaves the new key beside the old certificate, which `serve` could not load)."""
        try:
            key = serialization.load_pem_private_key(self.server_key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            return False
        der = serialization.Encoding.DER
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)

    def _issue_server(self, now: dt.datetime, server_names: tuple[str, ...]) -> x509.Certificate:
        server_key, server_cert = self._issue("vendgate-gateway", now, server=True, names=server_names)
        # Certificate first: cut short here, the old key stays beside the new certificate, and a
        # renewal run again (the pair no longer matches) issues both anew, with the new names.
        _write_public(self.server_cert_path, server_cert.public_bytes(serialization.Encoding.PEM))
        _write_private(self.server_key_path, _key_pem(server_key))
        return server_cert

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.exists:
            raise CertificateError(f"no CA in {self.directory}: run `vendgate ca init`")
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    def _issue(self, common_name: str, now: dt.datetime, *, server: bool,
               names: tuple[str, ...] = ()) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        ca_key, ca_cert = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=leaf_validity_days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if names:
            alt: list[x509.GeneralName] = []
            for entry in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(entry)))
                except ValueError:
                    alt.append(x509.DNSName(entry))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    def issue_client(self, terminal_id: str, out_dir: Path, now: dt.datetime) -> tuple[x509.Certificate, Path, Path]:
        key, cert = self._issue(terminal_id, now, server=False)
        key_path = out_dir / f"{terminal_id}.key"
        cert_path = out_dir / f"{terminal_id}.pem"
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert, cert_path, key_path

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2+ server context that demands a client certificate from this CA."""
        if not self.exists:
            raise CertificateError(f"no CA in {self.directory}: run `vendgate ca init`")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.server_cert_path, self.server_key_path)
        context.load_verify_locations(cafile=str(self.ca_cert_path))
        context.verify_mode = ssl.CERT_REQUIRED
        return context


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def checked_server_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Names a server certificate can carry: IP addresses, and DNS names as their ASCII (IDNA)
    form; an empty name, or one IDNA cannot write, is refused before anything is issued."""
    checked: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            raise CertificateError("a server name cannot be empty")
        try:
            checked.append(str(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        try:
            ascii_name = name.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_name = ""
        labels = ascii_name.removeprefix("*.").split(".")
        if not ascii_name or len(ascii_name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise CertificateError(f"{name!r} is neither an IP address nor a DNS name")
        checked.append(ascii_name)
    return tuple(checked)


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP addresses a certificate is for, as _issue takes them."""
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return default_server_names
    names = [str(entry.value) for entry in alt if isinstance(entry, (x509.DNSName, x509.IPAddress))]
    return tuple(names) or default_server_names


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def fingerprint_of_der(der: bytes) -> str:
    return fingerprint_sha256(x509.load_der_x509_certificate(der))
