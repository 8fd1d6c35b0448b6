"""Float deposits: money an agent paid in (bank transfer, cash office) credited to its float.

Rules:
- A deposit names its external reference (bank or receipt reference); one reference of one source
  account credits a float once, and the deposit id is the idempotency key of the request.
- A deposit of at most `approval_threshold_minor` posts at once. A larger one waits for a second
  operator (maker/checker): the checker, never the maker, approves (posts it) or rejects it. Names
  are compared as operator_identity() has them, so "ALICE" cannot check alice's deposit.
- The posting transfer's id is the deposit id, kind `deposit`, from the source account (a
  float_deposits account, unbounded) to the float; its metadata carries external_ref, maker and
  checker. A refused posting (account blocked...) leaves the deposit `refused` with the reason.
- Every function runs in the caller's transaction (a savepoint of it) or in its own.
"""

from __future__ import annotations

import unicodedata
import uuid
from typing import Any

import asyncpg
import msgspec

from float_ledger import sql
from float_ledger.errors import AccountNotFound, CheckerIsMaker, DepositConflict, DepositNotFound, InvalidTransfer
from float_ledger.ledger import apply_transfers, get_transfer
from float_ledger.model import (
    Deposit,
    DepositResult,
    DepositStatus,
    Metadata,
    PostResult,
    PostStatus,
    Transfer,
    TransferKind,
    amount_minor_max,
    batch_columns,
    reason_chars_max,
)

operator_chars_max = 200
pending_page_size_max = 1000
deposit_reserved_keys = frozenset({"external_ref", "maker", "checker"})

_metadata_decoder = msgspec.json.Decoder(Metadata)
_metadata_encoder = msgspec.json.Encoder()


def _deposit(record: Any) -> Deposit:
    return Deposit(
        id=record["id"], float_account_id=record["float_account_id"], source_account_id=record["source_account_id"],
        amount_minor=record["amount_minor"], currency=record["currency"], external_ref=record["external_ref"],
        maker=record["maker"], checker=record["checker"], metadata=_metadata_decoder.decode(record["metadata"]),
        status=DepositStatus(record["status"]), reason=record["reason"], requested_at=record["requested_at"],
        decided_at=record["decided_at"])


# Code points that render as nothing, beyond the format characters (category Cf): Unicode's
# Other_Default_Ignorable_Code_Point and the variation selectors, from the Unicode Character
# Database, DerivedCoreProperties.txt (Default_Ignorable_Code_Point) and PropList.txt.
_invisible_ranges = (
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER
    (0x115F, 0x1160),  # HANGUL CHOSEONG FILLER..HANGUL JUNGSEONG FILLER
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ..AA
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTORS, VOWEL SEPARATOR
    (0x2065, 0x2065),
    (0x3164, 0x3164),  # HANGUL FILLER
    (0xFE00, 0xFE0F),  # VARIATION SELECTOR-1..16
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),  # SHORTHAND FORMAT CONTROLS
    (0x1D173, 0x1D17A),  # MUSICAL SYMBOL BEGIN BEAM..END PHRASE
    (0xE0000, 0xE0FFF),  # TAGS, VARIATION SELECTOR-17..256
)


def _is_invisible(c: str) -> bool:
    """Control, format, unassigned, private-use or surrogate, or a default-ignorable code point."""
    if unicodedata.category(c)[0] == "C":
        return True
    code = ord(c)
    return any(low <= code <= high for low, high in _invisible_ranges)


def _check_operator(role: str, name: str) -> None:
    if not 0 < len(name) <= operator_chars_max:
        raise InvalidTransfer(f"{role} must be 1..{operator_chars_max} chars")
    if any(_is_invisible(c) for c in name):
        raise InvalidTransfer(f"{role} may not hold control or invisible characters")
    if not operator_identity(name):
        raise InvalidTransfer(f"{role} must name an operator, not only spaces")


def _is_odd_space(c: str) -> bool:
    """White space that compatibility normalisation does not make a space: line and paragraph
    separators, the Ogham space mark. A reference's key (0020_deposit_ref_spellings.sql) trims and
    joins only the spaces PostgreSQL's \\s matches, so "REF\\u2029" would be a reference of its own."""
    return c.isspace() and unicodedata.normalize("NFKC", c) != " "


def _check_text(field: str, text: str, chars_max: int) -> None:
    """A reference or a reason: text an operator reads back, so nothing in it may hide."""
    if not 0 < len(text) <= chars_max:
        raise InvalidTransfer(f"{field} must be 1..{chars_max} chars")
    if any(_is_invisible(c) for c in text):
        raise InvalidTransfer(f"{field} may not hold control or invisible characters")
    if any(_is_odd_space(c) for c in text):
        raise InvalidTransfer(f"{field} may not hold line or paragraph separators, nor white space other than spaces")
    normalised = unicodedata.normalize("NFKC", text)
    if not normalised.strip():
        # (The reference's key trims white space: " " would credit a float against no reference.)
        raise InvalidTransfer(f"{field} must say something, not only spaces")


# Signs drawn as a short horizontal stroke that are not dash punctuation (category Pd): MINUS SIGN,
# MODIFIER LETTER MINUS SIGN, HYPHEN BULLET, HEAVY MINUS SIGN, and the minus signs of the
# superscripts and subscripts (NFKC makes those U+2212).
_minus_like = frozenset("\u2212\u02d7\u2043\u2796")


def _check_reference(external_ref: str) -> None:
    """A reference as a bank statement or a receipt prints it, and as the key compares it.

    Typographic dashes and the minus sign look like a hyphen but are other characters, so
    "BANK\u20102026" pasted from a statement would be a reference of its own beside "BANK-2026"
    and credit the float a second time: they are refused, to be typed as '-'.
    """
    _check_text("external_ref", external_ref, operator_chars_max)
    normalised = unicodedata.normalize("NFKC", external_ref)
    if any(c != "-" and (unicodedata.category(c) == "Pd" or c in _minus_like) for c in normalised):
        raise InvalidTransfer("external_ref may hold dashes only as '-' (hyphen-minus): "
                              "retype the dashes of a pasted reference")


def operator_identity(name: str) -> str:
    """The operator a name stands for: "Alice", " alice ", "ALICE" and ALICE in full-width letters are one.

    Invisible code points dropped (names holding one are refused, but stored ones may predate that
    rule), then compatibility-normalised (NFKC), case-folded, normalised again (case folding can
    undo NFKC) and runs of white space made one space. Maker and checker are compared by this
    form, so no spelling of the maker's own name lets them decide their own deposit.
    """
    # White space first (a tab or a line break is a space between words), then the invisible.
    visible = "".join(" " if c.isspace() else c for c in name if c.isspace() or not _is_invisible(c))
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", visible).casefold())
    return " ".join(folded.split())


def _is_maker(checker: str, deposit: Deposit) -> bool:
    return operator_identity(checker) == operator_identity(deposit.maker)


def deposit_transfer(deposit: Deposit) -> Transfer:
    metadata: Metadata = {**deposit.metadata, "external_ref": deposit.external_ref, "maker": deposit.maker}
    if deposit.checker is not None:
        metadata["checker"] = deposit.checker
    return Transfer(id=deposit.id, debit_account_id=deposit.source_account_id,
                    credit_account_id=deposit.float_account_id, amount_minor=deposit.amount_minor,
                    currency=deposit.currency, kind=TransferKind.deposit, metadata=metadata)


async def _post(conn: Any, deposit: Deposit, checker: str | None) -> DepositResult:
    [result] = await apply_transfers(conn, [deposit_transfer(msgspec.structs.replace(deposit, checker=checker))])
    if result.status.posted:
        record = await conn.fetchrow(sql.SQL_DECIDE_DEPOSIT, deposit.id, DepositStatus.posted.value, checker, None)
    else:
        record = await conn.fetchrow(sql.SQL_DECIDE_DEPOSIT, deposit.id, DepositStatus.refused.value, checker,
                                     result.status.value)
    return DepositResult(deposit=_deposit(record), post=result)


async def _with_stored_post(conn: Any, deposit: Deposit) -> DepositResult:
    post = None
    if deposit.status is DepositStatus.posted:
        stored = await get_transfer(conn, deposit.id)
        assert stored is not None, f"posted deposit {deposit.id} without its transfer"
        post = PostResult(deposit.id, PostStatus.exists, stored)
    return DepositResult(deposit=deposit, post=post)


# uuid5 namespace of the deposit ids deposit_id_for_ref() makes.
_DEPOSIT_ID_NAMESPACE = uuid.UUID("5d1c2b0e-8f7a-4c3e-9b61-0a7e4f2d9c10")


async def deposit_id_for_ref(conn: Any, *, source_account_id: int, external_ref: str) -> uuid.UUID:
    """The id a request for this reference takes, for a caller with no id of its own (an operator
    typing a bank reference). While a deposit of the reference, spelled as here, is pending or
    posted it is that deposit's id, so asking again is a repeat, never a second credit; once every
    one was rejected or refused (credited nothing), a new one. A live reference spelled another way
    (ledger_deposit_ref_key) gets another id, which request_deposit refuses with DepositConflict
    naming the deposit that holds the reference."""
    _check_reference(external_ref)
    dead = int(await conn.fetchval(sql.SQL_DEAD_DEPOSITS_OF_REF, source_account_id, external_ref))
    return uuid.uuid5(_DEPOSIT_ID_NAMESPACE, f"{source_account_id}:{dead}:{external_ref}")


async def request_deposit(conn: Any, *, deposit_id: uuid.UUID, float_account_id: int, source_account_id: int,
                          amount_minor: int, currency: str, external_ref: str, maker: str,
                          approval_threshold_minor: int, metadata: Metadata | None = None) -> DepositResult:
    """Record a deposit; post it now when amount_minor <= approval_threshold_minor, else leave it pending.

    A repeated request (same id, same content) returns the deposit as it stands; the same id or
    external reference with other content raises DepositConflict.
    """
    if not 0 < amount_minor <= amount_minor_max:
        raise InvalidTransfer(f"amount_minor {amount_minor} not in 1..{amount_minor_max}")
    if approval_threshold_minor < 0:
        raise InvalidTransfer("approval_threshold_minor is an amount, never negative")
    _check_reference(external_ref)
    _check_operator("maker", maker)
    deposit_metadata: Metadata = dict(metadata or {})
    if reserved := sorted(deposit_reserved_keys & deposit_metadata.keys()):
        # They are the deposit's own record on its transfer: a maker's metadata cannot name them
        # (a checker's name on a deposit nobody checked, say).
        raise InvalidTransfer(f"metadata keys {', '.join(reserved)} are set by vendgate")
    # Refuse now what the posting would refuse later (currency, metadata size with a checker's name:
    # the longest a checker may give, operator_chars_max characters of 4 UTF-8 bytes each).
    batch_columns([Transfer(id=deposit_id, debit_account_id=source_account_id, credit_account_id=float_account_id,
                            amount_minor=amount_minor, currency=currency, kind=TransferKind.deposit,
                            metadata={**deposit_metadata, "external_ref": external_ref, "maker": maker,
                                      "checker": "\U00010000" * operator_chars_max})])
    async with conn.transaction():
        for _attempt in range(2):
            try:
                record = await conn.fetchrow(
                    sql.SQL_INSERT_DEPOSIT, deposit_id, float_account_id, source_account_id, amount_minor, currency,
                    external_ref, maker, _metadata_encoder.encode(deposit_metadata).decode(),
                    DepositStatus.pending_approval.value)
            except asyncpg.ForeignKeyViolationError:
                raise AccountNotFound(f"no ledger account {float_account_id} or {source_account_id}") from None
            if record is not None:
                break
            existing = await conn.fetchrow(sql.SQL_GET_DEPOSIT, deposit_id)
            if existing is not None:
                break
            taken = await conn.fetchrow(sql.SQL_DEPOSIT_BY_EXTERNAL_REF, source_account_id, external_ref)
            if taken is not None:
                raise DepositConflict(f"external reference {external_ref!r} already belongs to deposit {taken['id']}")
            # The deposit that held the reference was rejected since the INSERT met it: ask again.
        else:
            raise DepositConflict(f"external reference {external_ref!r} changed hands while this request ran: "
                                  "ask again")
        if record is None:
            deposit = _deposit(existing)
            # The maker as the operator they are: "Alice" asking again is alice's repeat.
            asked = (float_account_id, source_account_id, amount_minor, currency, external_ref,
                     operator_identity(maker), deposit_metadata)
            stored = (deposit.float_account_id, deposit.source_account_id, deposit.amount_minor, deposit.currency,
                      deposit.external_ref, operator_identity(deposit.maker), deposit.metadata)
            if asked != stored:
                raise DepositConflict(f"deposit {deposit_id} exists with other content")
            return await _with_stored_post(conn, deposit)
        deposit = _deposit(record)
        if amount_minor > approval_threshold_minor:
            return DepositResult(deposit=deposit)
        return await _post(conn, deposit, None)


async def approve_deposit(conn: Any, *, deposit_id: uuid.UUID, checker: str) -> DepositResult:
    """Post a pending deposit. Approving one already decided returns it as it stands."""
    _check_operator("checker", checker)
    async with conn.transaction():
        record = await conn.fetchrow(sql.SQL_LOCK_DEPOSIT, deposit_id)
        if record is None:
            raise DepositNotFound(f"no deposit {deposit_id}")
        deposit = _deposit(record)
        if deposit.status is not DepositStatus.pending_approval:
            return await _with_stored_post(conn, deposit)
        if _is_maker(checker, deposit):
            raise CheckerIsMaker(f"deposit {deposit_id} was requested by {checker}: another operator approves it")
        return await _post(conn, deposit, checker)


async def reject_deposit(conn: Any, *, deposit_id: uuid.UUID, checker: str, reason: str) -> DepositResult:
    """Refuse a pending deposit; nothing is posted. Rejecting one already decided returns it as it stands."""
    _check_operator("checker", checker)
    _check_text("reason", reason, reason_chars_max)
    async with conn.transaction():
        record = await conn.fetchrow(sql.SQL_LOCK_DEPOSIT, deposit_id)
        if record is None:
            raise DepositNotFound(f"no deposit {deposit_id}")
        deposit = _deposit(record)
        if deposit.status is not DepositStatus.pending_approval:
            return await _with_stored_post(conn, deposit)
        if _is_maker(checker, deposit):
            raise CheckerIsMaker(f"deposit {deposit_id} was requested by {checker}: another operator decides it")
        record = await conn.fetchrow(sql.SQL_DECIDE_DEPOSIT, deposit_id, DepositStatus.rejected.value, checker,
                                     reason)
        return DepositResult(deposit=_deposit(record))


async def get_deposit(conn: Any, deposit_id: uuid.UUID) -> Deposit:
    record = await conn.fetchrow(sql.SQL_GET_DEPOSIT, deposit_id)
    if record is None:
        raise DepositNotFound(f"no deposit {deposit_id}")
    return _deposit(record)


async def pending_count(conn: Any) -> int:
    """How many deposits await a checker (pending_deposits shows the oldest `limit` of them)."""
    return int(await conn.fetchval(sql.SQL_PENDING_COUNT))


async def pending_deposits(conn: Any, *, limit: int = 100) -> list[Deposit]:
    """Deposits awaiting a checker, oldest first."""
    if not 0 < limit <= pending_page_size_max:
        raise ValueError(f"limit {limit} not in 1..{pending_page_size_max}")
    return [_deposit(record) for record in await conn.fetch(sql.SQL_PENDING_DEPOSITS, limit)]
