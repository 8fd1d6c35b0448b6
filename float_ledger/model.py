"""The float ledger's types, limits and pure money rules: no I/O, no clock, no database.

A transfer moves `amount_minor` (> 0, minor units of `currency`) FROM `debit_account_id` (its
balance goes down) TO `credit_account_id` (its balance goes up), so all balances of one currency
sum to zero. A transfer's id is its idempotency key. Consecutive transfers of a batch sharing a
`group_id` are linked: they are posted together or not at all.

Rules kept here, each with unit tests that need no database:
- batch guards (`batch_columns`): structural errors are the caller's bug and raise InvalidTransfer;
  a refusal that depends on balances or accounts is a PostStatus from the database;
- commission and debt-recovery amounts, rounded down (the utility never pays more than the rate);
- the transfers of a top-up group and of the compensating reversal of a group;
- the UTC bounds of a business day in an IANA time zone.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from float_ledger.errors import InvalidAccount, InvalidTransfer, UnknownTimeZone

# -- limits -------------------------------------------------------------------------------------

batch_transfers_max = 8192
# 10^15 minor units is 10^13 units of any currency: far above any float, far below bigint overflow
# even summed over batch_transfers_max transfers.
amount_minor_max = 10**15
metadata_bytes_max = 2048
metadata_key_chars_max = 64
owner_ref_chars_max = 200
reason_chars_max = 200
# What a reversal keeps of its original's metadata when all of it would not fit beside its own keys.
reversal_kept_keys = ("client_txn_id", "terminal_id", "agent_id", "meter_number", "external_ref")
rate_ppm_max = 1_000_000
statement_page_size_max = 1000
events_page_size_max = 1000

assert amount_minor_max * batch_transfers_max < 2**63, "a batch's running balance must fit a bigint"

KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")


# -- enumerations -------------------------------------------------------------------------------


class AccountKind(StrEnum):
    agent_float = "agent_float"
    customer_credit = "customer_credit"
    customer_debt = "customer_debt"
    utility_collections = "utility_collections"
    float_deposits = "float_deposits"
    commission_expense = "commission_expense"
    commission_payable = "commission_payable"
    vat_payable = "vat_payable"
    suspense = "suspense"


class PostStatus(StrEnum):
    ok = "ok"
    exists = "exists"
    exists_with_different_content = "exists_with_different_content"
    insufficient_balance = "insufficient_balance"
    account_blocked = "account_blocked"
    account_missing = "account_missing"
    currency_mismatch = "currency_mismatch"
    # Refused because another transfer of its linked group failed.
    linked_failed = "linked_failed"

    @property
    def posted(self) -> bool:
        """The transfer is in the ledger (now or from before)."""
        return self in (PostStatus.ok, PostStatus.exists)


class TransferKind(StrEnum):
    """The kinds vendgate posts; reconciliation reads them. Transfer.kind is any KIND_PATTERN text."""

    deposit = "deposit"  # float_deposits -> agent_float
    collection = "collection"  # agent_float -> customer_credit: the float debit of a top-up
    debt_recovery = "debt_recovery"  # customer_credit -> customer_debt
    energy_sale = "energy_sale"  # customer_credit -> utility_collections
    commission = "commission"  # commission_expense -> commission_payable
    reversal = "reversal"  # compensates one transfer of a reversed group
    remittance = "remittance"
    adjustment = "adjustment"


class EventKind(StrEnum):
    float_below_threshold = "float_below_threshold"
    float_restored = "float_restored"


class DepositStatus(StrEnum):
    pending_approval = "pending_approval"
    posted = "posted"
    rejected = "rejected"
    # The posting was refused (account blocked, currency mismatch...): see Deposit.reason.
    refused = "refused"


# -- transfers ----------------------------------------------------------------------------------

Metadata = dict[str, str | int]


class Transfer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: uuid.UUID
    debit_account_id: int
    credit_account_id: int
    amount_minor: int
    currency: str
    kind: str
    group_id: uuid.UUID | None = None
    # terminal_id, agent_id, client_txn_id, receipt_number...: reconciliation reads terminal_id;
    # a reversal adds reverses, reversed_kind and reason.
    metadata: Metadata = {}


class PostedTransfer(Transfer, frozen=True, kw_only=True, forbid_unknown_fields=True):
    seq: int
    created_at: datetime  # timezone-aware UTC
    debit_balance_after_minor: int
    credit_balance_after_minor: int


class PostResult(msgspec.Struct, frozen=True):
    id: uuid.UUID
    status: PostStatus
    # The stored transfer for ok and exists; None otherwise.
    transfer: PostedTransfer | None = None


@dataclass(frozen=True, slots=True)
class TransferColumns:
    """A validated batch as the parallel arrays the database function takes."""

    ids: list[uuid.UUID]
    debit_account_ids: list[int]
    credit_account_ids: list[int]
    amounts_minor: list[int]
    currencies: list[str]
    kinds: list[str]
    group_ids: list[uuid.UUID | None]
    metadata_json: list[str]


_metadata_encoder = msgspec.json.Encoder()
_EMPTY_METADATA_JSON = "{}"


def _check_metadata(index: int, metadata: Mapping[str, str | int]) -> str:
    if not metadata:
        return _EMPTY_METADATA_JSON
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= metadata_key_chars_max:
            raise InvalidTransfer(f"transfer {index}: metadata key {key!r} is not 1..{metadata_key_chars_max} chars")
        # bool is an int in Python but would be stored as a JSON boolean.
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidTransfer(f"transfer {index}: metadata {key!r} is neither text nor an integer")
        # jsonb cannot hold U+0000 (PostgreSQL would refuse the batch with an error of its own).
        if "\x00" in key or (isinstance(value, str) and "\x00" in value):
            raise InvalidTransfer(f"transfer {index}: metadata {key!r} holds a NUL character")
    encoded = _metadata_encoder.encode(metadata)
    if len(encoded) > metadata_bytes_max:
        raise InvalidTransfer(f"transfer {index}: metadata is {len(encoded)} bytes, over {metadata_bytes_max}")
    return encoded.decode()


def _is_account_id(value: object) -> bool:
    return type(value) is int and -(2**63) <= value < 2**63


def batch_columns(transfers: Sequence[Transfer]) -> TransferColumns:
    """Check every structural rule of a batch and return its columns; raise InvalidTransfer."""
    if len(transfers) > batch_transfers_max:
        raise InvalidTransfer(f"batch of {len(transfers)} transfers, over {batch_transfers_max}")
    columns = TransferColumns([], [], [], [], [], [], [], [])
    groups_closed: set[uuid.UUID] = set()
    previous_group: uuid.UUID | None = None
    # The transfers of a group usually share one metadata dict, kind and currency: check each once.
    # id() is stable here: the transfers keep their dicts alive for the whole call.
    metadata_json: dict[int, str] = {}
    currencies_seen: set[str] = set()
    kinds_seen: set[str] = set()
    for index, transfer in enumerate(transfers):
        if not isinstance(transfer, Transfer):
            raise InvalidTransfer(f"transfer {index}: not a Transfer but {type(transfer).__name__}")
        amount = transfer.amount_minor
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= amount_minor_max:
            raise InvalidTransfer(f"transfer {index}: amount_minor {amount!r} not in 1..{amount_minor_max}")
        if not (_is_account_id(transfer.debit_account_id) and _is_account_id(transfer.credit_account_id)):
            raise InvalidTransfer(f"transfer {index}: account ids {transfer.debit_account_id!r} and "
                                  f"{transfer.credit_account_id!r} must be integers of PostgreSQL's bigint")
        if transfer.debit_account_id == transfer.credit_account_id:
            raise InvalidTransfer(f"transfer {index}: debit and credit account are both {transfer.debit_account_id}")
        if transfer.currency not in currencies_seen:
            if not isinstance(transfer.currency, str) or not CURRENCY_PATTERN.match(transfer.currency):
                raise InvalidTransfer(f"transfer {index}: currency {transfer.currency!r} is not an ISO 4217 code")
            currencies_seen.add(transfer.currency)
        if transfer.kind not in kinds_seen:
            if not isinstance(transfer.kind, str) or not KIND_PATTERN.match(transfer.kind):
                raise InvalidTransfer(f"transfer {index}: kind {transfer.kind!r} does not match {KIND_PATTERN.pattern}")
            kinds_seen.add(transfer.kind)
        group = transfer.group_id
        if group != previous_group:
            if previous_group is not None:
                groups_closed.add(previous_group)
            if group is not None and group in groups_closed:
                raise InvalidTransfer(f"transfer {index}: group {group} is not consecutive in the batch")
        previous_group = group
        columns.ids.append(transfer.id)
        columns.debit_account_ids.append(transfer.debit_account_id)
        columns.credit_account_ids.append(transfer.credit_account_id)
        columns.amounts_minor.append(amount)
        columns.currencies.append(transfer.currency)
        columns.kinds.append(transfer.kind)
        columns.group_ids.append(group)
        encoded = metadata_json.get(id(transfer.metadata))
        if encoded is None:
            encoded = metadata_json[id(transfer.metadata)] = _check_metadata(index, transfer.metadata)
        columns.metadata_json.append(encoded)
    return columns


def check_account(*, currency: str, owner_ref: str, lower_bound_minor: int | None,
                  low_threshold_minor: int | None, kind: AccountKind | None = None) -> None:
    """An account starts at balance 0, so its lower bound cannot be above 0; an agent's float is
    never below 0, so its bound is 0."""
    check_float_bound(kind, lower_bound_minor)
    if not CURRENCY_PATTERN.match(currency):
        raise InvalidAccount(f"currency {currency!r} is not an ISO 4217 code")
    if not 0 < len(owner_ref) <= owner_ref_chars_max:
        raise InvalidAccount(f"owner_ref must be 1..{owner_ref_chars_max} chars")
    if lower_bound_minor is not None and not -amount_minor_max <= lower_bound_minor <= 0:
        raise InvalidAccount(f"lower_bound_minor {lower_bound_minor} not in -{amount_minor_max}..0")
    if low_threshold_minor is not None and abs(low_threshold_minor) > amount_minor_max:
        raise InvalidAccount(f"low_threshold_minor {low_threshold_minor} beyond ±{amount_minor_max}")


def check_float_bound(kind: AccountKind | str | None, lower_bound_minor: int | None) -> None:
    """A prepaid float can never go negative (`vendgate ledger check` reports one that could)."""
    if kind == AccountKind.agent_float and lower_bound_minor != 0:
        raise InvalidAccount(f"an agent's float is never below 0: its lower bound is 0, not {lower_bound_minor}")


def derived_id(base: uuid.UUID, role: str) -> uuid.UUID:
    """A stable id for one role within an operation: a retry derives the same ids."""
    return uuid.uuid5(base, role)


# -- money rules --------------------------------------------------------------------------------


def commission_minor(amount_minor: int, rate_ppm: int) -> int:
    """Commission on `amount_minor` at `rate_ppm` parts per million, rounded down to the minor unit.

    Rounding down means the commission never exceeds the agreed rate: 1 % of 199 is 1, not 2.
    """
    if amount_minor < 0:
        raise ValueError(f"amount_minor {amount_minor} is negative")
    if not 0 <= rate_ppm <= rate_ppm_max:
        raise ValueError(f"rate_ppm {rate_ppm} not in 0..{rate_ppm_max}")
    return amount_minor * rate_ppm // rate_ppm_max


def debt_recovery_minor(payment_minor: int, debt_minor: int, rate_ppm: int) -> int:
    """The share of a payment that pays down debt: `rate_ppm` of it rounded down, never more than the debt.

    Rounding down leaves the customer the larger share for energy.
    """
    if payment_minor < 0 or debt_minor < 0:
        raise ValueError("payment_minor and debt_minor are amounts, never negative")
    if not 0 <= rate_ppm <= rate_ppm_max:
        raise ValueError(f"rate_ppm {rate_ppm} not in 0..{rate_ppm_max}")
    return min(debt_minor, payment_minor * rate_ppm // rate_ppm_max)


class TopUpAccounts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    float_account_id: int
    customer_credit_account_id: int
    customer_debt_account_id: int
    collections_account_id: int
    commission_expense_account_id: int
    commission_payable_account_id: int


def top_up_transfers(*, top_up_id: uuid.UUID, accounts: TopUpAccounts, amount_minor: int,
                     debt_recovery_minor: int, commission_rate_ppm: int, currency: str,
                     metadata: Mapping[str, str | int]) -> list[Transfer]:
    """The linked group of one customer payment collected by an agent, group id = top_up_id:

    1. collection     agent float     -> customer credit   amount (the float debit)
    2. debt_recovery  customer credit -> customer debt     debt share (omitted when 0)
    3. energy_sale    customer credit -> collections       the rest   (omitted when 0)
    4. commission     commission exp. -> agent's payable   commission (omitted when 0)

    Transfer ids derive from top_up_id, so a retried payment yields the same transfers.
    """
    if not 0 < amount_minor <= amount_minor_max:
        raise InvalidTransfer(f"amount_minor {amount_minor} not in 1..{amount_minor_max}")
    if not 0 <= debt_recovery_minor <= amount_minor:
        raise InvalidTransfer(f"debt_recovery_minor {debt_recovery_minor} not in 0..{amount_minor}")
    meta = dict(metadata)
    legs = [
        (TransferKind.collection, accounts.float_account_id, accounts.customer_credit_account_id, amount_minor),
        (TransferKind.debt_recovery, accounts.customer_credit_account_id, accounts.customer_debt_account_id,
         debt_recovery_minor),
        (TransferKind.energy_sale, accounts.customer_credit_account_id, accounts.collections_account_id,
         amount_minor - debt_recovery_minor),
        (TransferKind.commission, accounts.commission_expense_account_id, accounts.commission_payable_account_id,
         commission_minor(amount_minor, commission_rate_ppm)),
    ]
    return [
        Transfer(id=derived_id(top_up_id, kind), debit_account_id=debit, credit_account_id=credit,
                 amount_minor=amount, currency=currency, kind=kind, group_id=top_up_id, metadata=meta)
        for kind, debit, credit, amount in legs
        if amount > 0
    ]


def commission_transfer(*, transfer_id: uuid.UUID, expense_account_id: int, payable_account_id: int,
                        collected_minor: int, rate_ppm: int, currency: str, metadata: Mapping[str, str | int],
                        group_id: uuid.UUID | None = None) -> Transfer | None:
    """The accrual of commission on a collected amount; None when it rounds to 0."""
    amount = commission_minor(collected_minor, rate_ppm)
    if amount == 0:
        return None
    return Transfer(id=transfer_id, debit_account_id=expense_account_id, credit_account_id=payable_account_id,
                    amount_minor=amount, currency=currency, kind=TransferKind.commission, group_id=group_id,
                    metadata=dict(metadata))


def reversal_group_id_for(group_id: uuid.UUID) -> uuid.UUID:
    return derived_id(group_id, "reversal-group")


def reversal_transfers(originals: Sequence[PostedTransfer], *, reversal_group_id: uuid.UUID,
                       reason: str) -> list[Transfer]:
    """Compensating transfers for a posted group, as one linked group.

    They run in the reverse of the originals' posting order, so every intermediate account passes
    through the balances it had before, and the bounds the originals respected hold again. Each
    compensating id derives from the original id: reversing twice posts once.
    """
    if not 0 < len(reason) <= reason_chars_max:
        raise InvalidTransfer(f"reason must be 1..{reason_chars_max} chars")
    compensations = []
    for original in sorted(originals, key=lambda t: t.seq, reverse=True):
        own: Metadata = {"reverses": str(original.id), "reversed_kind": original.kind, "reason": reason}
        metadata: Metadata = {**original.metadata, **own}
        if len(_metadata_encoder.encode(metadata)) > metadata_bytes_max:
            # The original's metadata left no room for the reversal's own: it keeps what
            # reconciliation and support read; the rest stays on the original, which `reverses` names.
            metadata = {k: original.metadata[k] for k in reversal_kept_keys if k in original.metadata} | own
        compensations.append(Transfer(
            id=derived_id(original.id, "reversal"), debit_account_id=original.credit_account_id,
            credit_account_id=original.debit_account_id, amount_minor=original.amount_minor,
            currency=original.currency, kind=TransferKind.reversal, group_id=reversal_group_id,
            metadata=metadata))
    return compensations


# -- business days ------------------------------------------------------------------------------


def business_day_bounds(business_day: date, time_zone: str) -> tuple[datetime, datetime]:
    """[start, end) of a calendar day in an IANA time zone, as UTC instants (23 or 25 h across DST)."""
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise UnknownTimeZone(f"unknown IANA time zone {time_zone!r}") from None
    start = datetime.combine(business_day, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(business_day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    return start, end


# -- accounts, statements, events, deposits, reconciliation -----------------------------------------


class Account(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    kind: AccountKind
    currency: str
    owner_ref: str
    balance_minor: int
    lower_bound_minor: int | None
    low_threshold_minor: int | None
    blocked: bool
    created_at: datetime


class StatementCursor(msgspec.Struct, frozen=True, kw_only=True):
    """Where a statement page ended; pass it back to read the next page."""

    created_at: datetime
    seq: int


class StatementEntry(msgspec.Struct, frozen=True, kw_only=True):
    transfer_id: uuid.UUID
    seq: int
    created_at: datetime
    kind: str
    # Signed from the account's side: positive when credited, negative when debited.
    amount_minor: int
    balance_after_minor: int
    counterparty_account_id: int
    group_id: uuid.UUID | None
    metadata: Metadata


class StatementPage(msgspec.Struct, frozen=True, kw_only=True):
    account_id: int
    entries: list[StatementEntry]
    next_cursor: StatementCursor | None  # None on the last page


class EventCursor(msgspec.Struct, frozen=True):
    """Where a reader of low-float events is: after the event of transaction `txid` with `id`."""
    txid: int
    id: int


class LedgerEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    kind: EventKind
    account_id: int
    transfer_id: uuid.UUID | None  # the posting that crossed; None: the threshold was changed across the balance
    balance_minor: int
    threshold_minor: int
    created_at: datetime
    txid: int  # the transaction that wrote it

    @property
    def cursor(self) -> EventCursor:
        """What a reader keeps once it handled this event (events_after goes on from it)."""
        return EventCursor(self.txid, self.id)


class Deposit(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID  # also the id of the transfer that posts it
    float_account_id: int
    source_account_id: int
    amount_minor: int
    currency: str
    external_ref: str
    maker: str
    checker: str | None
    metadata: Metadata
    status: DepositStatus
    reason: str | None
    requested_at: datetime
    decided_at: datetime | None


class DepositResult(msgspec.Struct, frozen=True, kw_only=True):
    deposit: Deposit
    # The posting's result when this call posted or replayed it; None while pending or rejected.
    post: PostResult | None = None


class TerminalDay(msgspec.Struct, frozen=True, kw_only=True):
    terminal_id: str | None  # None: transfers that named no terminal
    collections_count: int = 0
    collections_minor: int = 0
    reversals_count: int = 0
    reversals_minor: int = 0
    commission_minor: int = 0


class AgentDay(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's business day from its float's transfers (and its commission accounts' transfers).

    closing = opening + deposits - collections + reversals + other_net, always.
    """

    float_account_id: int
    agent_ref: str
    currency: str
    business_day: date
    time_zone: str
    starts_at: datetime
    ends_at: datetime
    opening_float_minor: int
    deposits_count: int
    deposits_minor: int
    collections_count: int
    collections_minor: int
    # Reversed collections credited back to the float.
    reversals_count: int
    reversals_minor: int
    # Commission credited to the agent's commission_payable accounts, net of reversed commission.
    commission_minor: int
    # Every other movement of the float (reversed deposits, remittances, adjustments), signed.
    other_count: int
    other_net_minor: int
    closing_float_minor: int
    terminals: list[TerminalDay]
