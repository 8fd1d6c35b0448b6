"""Registry service: agents, terminals, kiosks' terminals, customers, meters, tariffs, vending keys.

Used by the CLI, the seeder, the admin API and the server alike; it never imports the server.
Creating an agent or a customer opens their ledger accounts in the same transaction.
Terminal keys are generated here, sealed under the master key and shown once to the caller;
only a POS terminal logs on with its key (a kiosk's record holds one it never uses).
"""

from __future__ import annotations

import functools
import re
import secrets
import unicodedata
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import asyncpg
import msgspec

from float_ledger.currency import ISO_4217_CODES
from float_ledger.ledger import create_account
from float_ledger.model import AccountKind, amount_minor_max
from gateway import sql
from gateway.errors import VendgateError
from gateway.keystore import KeyStore
from protocol import sts

terminal_key_bytes = 16  # AES-128 strength, as protocol v1 requires at least
AgentKind = Literal["shop", "property_manager", "village", "mobile_hall", "staff"]
_TERMINAL_ID = re.compile(r"^[A-Z0-9]{8}$")
SYSTEM_ACCOUNT_KINDS = (
    AccountKind.utility_collections,
    AccountKind.vat_payable,
    AccountKind.commission_expense,
    AccountKind.float_deposits,
    AccountKind.suspense,
)


class RegistryError(VendgateError):
    """Bad registry input (unknown agent, duplicate serial, bad time zone ...)."""


class Agent(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: int
    kind: str
    name: str
    currency: str
    float_account_id: int
    commission_account_id: int
    commission_rate_bp: int
    low_float_threshold_minor: int
    time_zone: str


class TerminalContext(msgspec.Struct, frozen=True, kw_only=True):
    """What the vending path needs to know about a terminal and its agent."""

    terminal_id: str
    kind: str
    status: str
    agent_id: int
    currency: str
    float_account_id: int
    commission_account_id: int
    commission_rate_bp: int
    low_float_threshold_minor: int
    time_zone: str
    allowed_operations: list[str]
    txn_min_minor: int
    txn_max_minor: int
    daily_limit_minor: int
    key_version: int


def terminal_key_record(terminal_id: str, key_version: int) -> str:
    return f"terminal:{terminal_id}:v{key_version}"


def vending_key_record(supply_group_code: str, key_revision: int) -> str:
    return f"vending:{supply_group_code}:{key_revision}"


# Line breaks, other control characters and lone surrogates (what Python makes of bytes that are
# not UTF-8 in a command's arguments): a name or address is printed on one receipt line and
# written into one log line.
_NOT_ONE_LINE = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _check_one_line(what: str, text: str) -> None:
    for char in text:
        category = unicodedata.category(char)
        if category in _NOT_ONE_LINE:
            problem = ("is not valid UTF-8 text" if category == "Cs"
                       else f"holds the control character U+{ord(char):04X}")
            raise RegistryError(f"{what} {problem}: one line of printable text")


def _check_currency(currency: str) -> None:
    # An agent or a customer cannot be deleted: a mistyped code would make for good an account
    # that no tariff or float of the deployment can ever meet.
    if currency not in ISO_4217_CODES:
        raise RegistryError(f"currency must be a current ISO 4217 code like EUR, not {currency!r}")


async def system_account(conn: asyncpg.Connection, kind: AccountKind, currency: str) -> int:
    """The utility's account of this kind and currency, opened on first use."""
    account_id = await conn.fetchval(sql.SYSTEM_ACCOUNT_GET, kind.value, currency)
    if account_id is not None:
        return int(account_id)
    async with conn.transaction():
        new_id = await create_account(conn, kind=kind, currency=currency, owner_ref=f"system:{kind.value}",
                                      lower_bound_minor=None)
        await conn.execute(sql.SYSTEM_ACCOUNT_INSERT, kind.value, currency, new_id)
        account_id = await conn.fetchval(sql.SYSTEM_ACCOUNT_GET, kind.value, currency)
    return int(account_id)


async def ensure_system_accounts(conn: asyncpg.Connection, currency: str) -> dict[AccountKind, int]:
    _check_currency(currency)
    return {kind: await system_account(conn, kind, currency) for kind in SYSTEM_ACCOUNT_KINDS}


agent_text_chars_max = 200  # an agent's name and contact (agents.name's CHECK)


# Names the time zone path holds that are no agent's zone: the host's own (its days would move
# with the machine) and the placeholder that has no offset.
_NOT_AGENT_ZONES = frozenset({"localtime", "Factory"})


def _check_time_zone(time_zone: str) -> None:
    """An IANA zone name as the tz database lists it (posix/... and right/... copies, posixrules
    and the host's localtime are refused): business days are worked out from it in Python."""
    if time_zone in _NOT_AGENT_ZONES or time_zone not in available_time_zones():
        raise RegistryError(f"unknown time zone {time_zone!r}: an IANA name such as Africa/Nairobi")
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise RegistryError(f"unknown time zone {time_zone!r}") from None


@functools.cache
def available_time_zones() -> frozenset[str]:
    return frozenset(available_timezones())


async def add_agent(
    conn: asyncpg.Connection,
    *,
    kind: AgentKind,
    name: str,
    currency: str,
    contact: str = "",
    commission_rate_bp: int = 0,
    low_float_threshold_minor: int = 0,
    time_zone: str = "UTC",
) -> Agent:
    _check_currency(currency)
    _check_time_zone(time_zone)
    if not 0 <= commission_rate_bp <= 10_000:
        raise RegistryError("commission rate must be 0..10000 basis points")
    _check_one_line("an agent's name", name)
    _check_one_line("an agent's contact", contact)
    if not 0 < len(name) <= agent_text_chars_max or not name.strip():
        raise RegistryError(f"an agent's name is 1..{agent_text_chars_max} characters, not only spaces")
    if len(contact) > agent_text_chars_max:
        raise RegistryError(f"an agent's contact is at most {agent_text_chars_max} characters")
    if not 0 <= low_float_threshold_minor <= amount_minor_max:
        raise RegistryError(f"the low-float threshold is an amount in minor units, 0..{amount_minor_max}")
    await ensure_system_accounts(conn, currency)
    async with conn.transaction():
        agent_id = int(await conn.fetchval(sql.AGENT_NEXT_ID))
        owner = agent_owner_ref(agent_id)
        float_id = await create_account(conn, kind=AccountKind.agent_float, currency=currency,
                                        owner_ref=owner, lower_bound_minor=0,
                                        low_threshold_minor=low_float_threshold_minor or None)
        commission_id = await create_account(conn, kind=AccountKind.commission_payable, currency=currency,
                                             owner_ref=owner, lower_bound_minor=0)
        await conn.execute(sql.AGENT_INSERT, agent_id, kind, name, contact, currency, float_id, commission_id,
                           commission_rate_bp, low_float_threshold_minor, time_zone)
    return await get_agent(conn, agent_id)


def agent_owner_ref(agent_id: int) -> str:
    """The owner of an agent's float and commission accounts: its id, never its name (names need
    not be unique; reconciliation finds the agent's commission accounts by their owner)."""
    return f"agent:{agent_id}"


async def get_agent(conn: asyncpg.Connection, agent_id: int) -> Agent:
    row = await conn.fetchrow(sql.AGENT_GET, agent_id)
    if row is None:
        raise RegistryError(f"no agent {agent_id}")
    return msgspec.convert({k: row[k] for k in Agent.__struct_fields__}, Agent)


async def add_terminal(
    conn: asyncpg.Connection,
    keystore: KeyStore,
    *,
    terminal_id: str,
    serial: str,
    agent_id: int,
    kind: Literal["pos", "kiosk"] = "pos",
    model: str = "",
    location: str = "",
    txn_min_minor: int = 1,
    txn_max_minor: int = 100_000_000,
    daily_limit_minor: int = 1_000_000_000,
) -> bytes:
    """Register a terminal; returns its new secret key, which is shown once and never again (a
    kiosk's is not shown at all: its record must hold one, and no logon accepts it)."""
    if not _TERMINAL_ID.match(terminal_id):
        raise RegistryError("terminal id must be 8 characters A-Z, 0-9")
    for what, text in (("a terminal's serial", serial), ("a terminal's model", model),
                       ("a terminal's location", location)):
        _check_one_line(what, text)
    if not 0 < txn_min_minor <= txn_max_minor or daily_limit_minor <= 0:
        raise RegistryError("limits must satisfy 0 < min <= max and a positive daily limit")
    key = secrets.token_bytes(terminal_key_bytes)
    sealed = keystore.seal(key, terminal_key_record(terminal_id, 1))
    try:
        await conn.execute(sql.TERMINAL_INSERT, terminal_id, serial, model, kind, agent_id, location, sealed,
                           txn_min_minor, txn_max_minor, daily_limit_minor)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "terminals_serial_in_service":
            raise RegistryError(f"serial {serial} belongs to a terminal in service: retire that one first") from None
        raise RegistryError(f"terminal {terminal_id} already registered") from None
    except asyncpg.ForeignKeyViolationError:
        raise RegistryError(f"no agent {agent_id}") from None
    return key


async def terminal_context(conn: asyncpg.Connection, terminal_id: str) -> TerminalContext | None:
    row = await conn.fetchrow(sql.TERMINAL_GET, terminal_id)
    if row is None:
        return None
    return msgspec.convert({k: row[k] for k in TerminalContext.__struct_fields__}, TerminalContext)


async def terminal_key(conn: asyncpg.Connection, keystore: KeyStore, terminal_id: str) -> tuple[bytes, str] | None:
    """(key, status) of a POS terminal, for its logon; None when no POS terminal has this id.

    A kiosk's id gets None too, as an unknown id does: a kiosk is served over HTTPS with its
    client certificate alone (revocation included), never with the key its record holds.
    """
    row = await conn.fetchrow(sql.TERMINAL_GET, terminal_id)
    if row is None or row["kind"] != "pos":
        return None
    key = keystore.open(bytes(row["key_ciphertext"]), terminal_key_record(terminal_id, row["key_version"]))
    return key, str(row["status"])


async def set_terminal_status(conn: asyncpg.Connection, terminal_id: str,
                              status: Literal["active", "blocked", "retired"]) -> None:
    """Block, unblock or retire a terminal. Retirement is final: the device is out of service
    and its key with it, so a retired terminal is never made active or blocked again (a device put
    back into service is registered anew, with a key of its own)."""
    async with conn.transaction():
        current = await conn.fetchval(sql.TERMINAL_STATUS_FOR_UPDATE, terminal_id)
        if current is None:
            raise RegistryError(f"no terminal {terminal_id}")
        if current == "retired" and status != "retired":
            raise RegistryError(f"terminal {terminal_id} is retired, and retirement is final: register the device "
                                "anew (a terminal id of its own; its serial is free) to put it back into service")
        await conn.execute(sql.TERMINAL_SET_STATUS, terminal_id, status)


tariff_code_chars_max = 40  # every receipt states it in full


async def add_tariff(
    conn: asyncpg.Connection,
    *,
    tariff_code: str,
    valid_from: datetime,
    currency: str,
    energy_price_minor_per_mwh: int,
    energy_vat_rate_bp: int,
    fee_per_purchase_minor: int = 0,
    fee_vat_rate_bp: int = 0,
) -> None:
    _check_currency(currency)
    if not 0 < len(tariff_code) <= tariff_code_chars_max or not tariff_code.isprintable() or tariff_code != \
            tariff_code.strip():
        raise RegistryError(f"a tariff code is 1..{tariff_code_chars_max} printable characters, no spaces around")
    if valid_from.tzinfo is None:
        raise RegistryError("tariff valid_from must be timezone-aware")
    # A new version keeps the code's currency: the meters on it are paid in their customers' currency.
    priced_in = await conn.fetchval(sql.TARIFF_CURRENCIES, tariff_code)
    if priced_in and priced_in != [currency]:
        raise RegistryError(f"tariff {tariff_code} is priced in {', '.join(priced_in)}: a new version cannot be "
                            f"in {currency}")
    await conn.execute(sql.TARIFF_INSERT, tariff_code, valid_from, currency, energy_price_minor_per_mwh,
                       energy_vat_rate_bp, fee_per_purchase_minor, fee_vat_rate_bp)


async def set_vending_key(conn: asyncpg.Connection, keystore: KeyStore, *, supply_group_code: str,
                          key_revision: int, key_type: int, vending_key: bytes) -> None:
    if len(vending_key) != 8:
        raise RegistryError("an STS vending key is 8 bytes (16 hex digits)")
    sealed = keystore.seal(vending_key, vending_key_record(supply_group_code, key_revision))
    await conn.execute(sql.VENDING_KEY_UPSERT, supply_group_code, key_revision, key_type, sealed)


async def add_customer(
    conn: asyncpg.Connection,
    *,
    account_number: str,
    name: str,
    currency: str,
    address: str = "",
    phone: str = "",
    debt_recovery_share_bp: int = 0,
) -> int:
    _check_currency(currency)
    for what, text in (("a customer's account number", account_number), ("a customer's name", name),
                       ("a customer's address", address), ("a customer's phone", phone)):
        _check_one_line(what, text)
    async with conn.transaction():
        credit_id = await create_account(conn, kind=AccountKind.customer_credit, currency=currency,
                                         owner_ref=f"customer:{account_number}", lower_bound_minor=None)
        debt_id = await create_account(conn, kind=AccountKind.customer_debt, currency=currency,
                                       owner_ref=f"customer:{account_number}", lower_bound_minor=None)
        try:
            customer_id = await conn.fetchval(sql.CUSTOMER_INSERT, account_number, name, address, phone,
                                              credit_id, debt_id, debt_recovery_share_bp)
        except asyncpg.UniqueViolationError:
            raise RegistryError(f"account {account_number} already exists") from None
    return int(customer_id)


async def add_meter(
    conn: asyncpg.Connection,
    *,
    meter_number: str,
    customer_id: int,
    supply_mode: Literal["smart", "sts"],
    tariff_code: str,
    sts_supply_group_code: str | None = None,
    sts_tariff_index: str | None = None,
    sts_key_revision: int | None = None,
    sts_base_year: int | None = None,
) -> None:
    """A customer's meter on a tariff priced in the customer's currency (else no top-up could pay it);
    a token meter's number is one STS can carry (an 11- or 13-digit meter number with its check
    digit, or an 18-digit PAN: sts.meter_pan), else no token could ever be issued to it."""
    if supply_mode == "sts":
        try:
            sts.meter_pan(meter_number)
        except sts.StsError as exc:
            raise RegistryError(f"meter {meter_number} cannot take STS tokens: {exc}") from None
    customer_currency = await conn.fetchval(sql.CUSTOMER_CURRENCY, customer_id)
    if customer_currency is None:
        raise RegistryError(f"no customer {customer_id}")
    priced_in = await conn.fetchval(sql.TARIFF_CURRENCIES, tariff_code)
    if not priced_in:
        raise RegistryError(f"no tariff {tariff_code}")
    if priced_in != [customer_currency]:
        raise RegistryError(f"meter {meter_number}: tariff {tariff_code} is priced in {', '.join(priced_in)}, "
                            f"the customer's accounts are in {customer_currency}")
    try:
        async with conn.transaction():  # a savepoint in the caller's: the lookup below needs it usable
            await conn.execute(sql.METER_INSERT, meter_number, customer_id, supply_mode, tariff_code,
                               sts_supply_group_code, sts_tariff_index, sts_key_revision, sts_base_year)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "meters_sts_pan":  # 0029: one token meter, two of its numbers
            registered = await conn.fetchval(sql.STS_METER_BY_PAN, meter_number)
            raise RegistryError(f"meter {meter_number} is the token meter registered as {registered} "
                                "(one STS PAN): a meter is registered once") from None
        raise RegistryError(f"meter {meter_number} already exists") from None
    except asyncpg.CheckViolationError as exc:
        raise RegistryError(f"meter {meter_number}: {exc.constraint_name or 'invalid fields'}") from None
