"""`vendgate ca init|server-cert` and `vendgate kiosk cert|revoke`: the gateway's and kiosks' certificates."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from gateway import database
from gateway.ca import CertificateAuthority, CertificateError, certificate_names, fingerprint_sha256
from gateway.cli.runner import run
from gateway.errors import VendgateError
from gateway.settings import Settings

SQL_CERT_INSERT = """
INSERT INTO kiosk_certificates (serial_hex, terminal_id, fingerprint, not_after) VALUES ($1, $2, $3, $4)"""
SQL_KIOSK_GET = "SELECT kind FROM terminals WHERE terminal_id = $1"
SQL_CERT_REVOKE = """
UPDATE kiosk_certificates SET revoked_at = now() WHERE terminal_id = $1 AND revoked_at IS NULL
RETURNING serial_hex"""


def ca_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "ca"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ca = subparsers.add_parser("ca", help="vendgate's kiosk certificate authority").add_subparsers(
        dest="ca_command", required=True)
    init = ca.add_parser("init", help="create the CA and the gateway's server certificate; run again, it issues "
                                      "the server certificate anew when missing or within 30 days of its end")
    init.set_defaults(handler=handle_init)
    server = ca.add_parser("server-cert", help="issue the gateway's server certificate anew under the CA now "
                                               "(restart `vendgate serve` to use it)")
    server.add_argument("--name", action="append", dest="names", metavar="NAME",
                        help="a DNS name or IP address kiosks reach the gateway by (repeatable; default: "
                             "those of the certificate it replaces)")
    server.set_defaults(handler=handle_server_cert)
    kiosk = subparsers.add_parser("kiosk", help="kiosk client certificates").add_subparsers(
        dest="kiosk_command", required=True)
    cert = kiosk.add_parser("cert", help="issue a client certificate bound to a kiosk terminal")
    cert.add_argument("terminal_id")
    cert.add_argument("--out", default=None, help="folder for <id>.pem and <id>.key (default: data_dir/kiosks)")
    cert.set_defaults(handler=handle_cert)
    revoke = kiosk.add_parser("revoke", help="revoke every certificate of a kiosk")
    revoke.add_argument("terminal_id")
    revoke.set_defaults(handler=handle_revoke)


def handle_init(args: argparse.Namespace, settings: Settings) -> int:
    authority = CertificateAuthority(ca_dir(settings))
    now = datetime.now(UTC)
    created = authority.init(now=now)
    renewed = None if created else authority.renew_server(now=now)
    print(f"{'created' if created else 'exists'}: CA {authority.ca_cert_path}, server certificate "
          f"{authority.server_cert_path}")
    if renewed is not None:
        print(f"server certificate issued anew, valid until {renewed.not_valid_after_utc.isoformat()}: "
              "restart `vendgate serve` to use it")
    return 0


def handle_server_cert(args: argparse.Namespace, settings: Settings) -> int:
    authority = CertificateAuthority(ca_dir(settings))
    if not authority.exists:
        raise CertificateError(f"no CA in {authority.directory}: run `vendgate ca init`")
    names = tuple(args.names) if args.names else None
    issued = authority.renew_server(now=datetime.now(UTC), server_names=names, force=True)
    assert issued is not None
    print(f"server certificate {authority.server_cert_path} for {', '.join(certificate_names(issued))}, valid until "
          f"{issued.not_valid_after_utc.isoformat()}: restart `vendgate serve` to use it")
    return 0


async def issue_kiosk_certificate(conn, authority: CertificateAuthority, terminal_id: str,  # type: ignore[no-untyped-def]
                                  out_dir: Path) -> tuple[Path, Path, str]:
    kind = await conn.fetchval(SQL_KIOSK_GET, terminal_id)
    if kind != "kiosk":
        raise VendgateError(f"{terminal_id} is not a registered kiosk terminal")
    cert, cert_path, key_path = authority.issue_client(terminal_id, out_dir, datetime.now(UTC))
    await conn.execute(SQL_CERT_INSERT, format(cert.serial_number, "x"), terminal_id, fingerprint_sha256(cert),
                       cert.not_valid_after_utc)
    return cert_path, key_path, fingerprint_sha256(cert)


def handle_cert(args: argparse.Namespace, settings: Settings) -> int:
    authority = CertificateAuthority(ca_dir(settings))
    out_dir = Path(args.out) if args.out else Path(settings.data_dir) / "kiosks"

    async def go() -> tuple[Path, Path, str]:
        url = await database.resolve_url(settings)
        conn = await database.connect(url, timeout_s=settings.database_connect_timeout_s)
        try:
            return await issue_kiosk_certificate(conn, authority, args.terminal_id, out_dir)
        finally:
            await conn.close()

    cert_path, key_path, fingerprint = run(go())
    print(f"kiosk {args.terminal_id}: certificate {cert_path}, key {key_path}, sha256 {fingerprint}")
    return 0


def handle_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def go() -> list[str]:
        url = await database.resolve_url(settings)
        conn = await database.connect(url, timeout_s=settings.database_connect_timeout_s)
        try:
            if await conn.fetchval(SQL_KIOSK_GET, args.terminal_id) != "kiosk":
                raise VendgateError(f"{args.terminal_id} is not a registered kiosk terminal")
            return [r["serial_hex"] for r in await conn.fetch(SQL_CERT_REVOKE, args.terminal_id)]
        finally:
            await conn.close()

    serials = run(go())
    if not serials:
        # Exit 1 as before: nothing was revoked (a script revoking a kiosk it still trusts learns so).
        print(f"kiosk {args.terminal_id}: no certificate left to revoke (none issued, or all revoked already)")
        return 1
    print(f"kiosk {args.terminal_id}: revoked {len(serials)} certificate(s): {', '.join(serials)}")
    return 0
