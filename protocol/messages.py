"""The message catalogue of wire protocol v1: typed msgspec Structs in request/reply pairs.

Rules every message follows:
- A Struct is frozen, keyword-only and refuses unknown fields; its `type` tag (snake_case) goes
  into the MessagePack or JSON map, and its one-byte `message_type` code goes into the frame
  header. Codes are odd from terminal to server and even from server to terminal; a request's
  reply has the request's code + 1.
- Messages are maps with field names, not positional arrays: a vendor who swaps two integer
  fields gets a decoding error instead of a silently wrong amount. Field order is the declared
  order, so an encoding is deterministic (the golden frames rely on it).
- Money is `amount_minor: int` (minor units) with an ISO 4217 `currency`; times are timezone-
  aware; text that reaches a printer or a screen holds no control characters.
- Field constraints (`msgspec.Meta`) are enforced when decoding. Cross-field rules live in
  `__post_init__`, so they hold for constructed and decoded messages alike.
- Any change to a field, tag, code or constraint is a new protocol version (docs/protocol.md,
  "Versioning"); the page lists every field of every message and a test holds it to this file.

The MessagePack encoder and one decoder per direction's union are built once here and reused
(`MSGPACK_ENCODER`, `TERMINAL_DECODER`, `SERVER_DECODER`); the JSON mapping for kiosks lives in
protocol.kiosk.
"""

from __future__ import annotations

import enum
import re
import string
from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any, ClassVar, Final

import msgspec

from protocol import limits
from protocol.codes import ResponseCode


def _length(chars_min: int, chars_max: int) -> msgspec.Meta:
    return msgspec.Meta(min_length=chars_min, max_length=chars_max)


# Lengths are msgspec constraints; character sets are checked in __post_init__ with str methods,
# which cost a tenth of a regular expression per field (the codec's budget is a few microseconds).
TerminalId = Annotated[str, _length(limits.terminal_id_chars, limits.terminal_id_chars)]  # 0-9 A-Z
MeterNumber = Annotated[str, _length(limits.meter_number_chars_min, limits.meter_number_chars_max)]  # 0-9
AccountNumber = Annotated[str, _length(1, limits.account_number_chars_max)]  # 0-9 A-Z a-z -
ReceiptNumber = Annotated[str, _length(1, limits.receipt_number_chars_max)]  # 0-9 A-Z a-z / -
Currency = Annotated[str, _length(3, 3)]  # A-Z
Token = Annotated[str, _length(limits.token_digits, limits.token_digits)]  # 0-9
AmountMinor = Annotated[int, msgspec.Meta(ge=0, le=limits.amount_minor_max)]
PositiveAmountMinor = Annotated[int, msgspec.Meta(ge=1, le=limits.amount_minor_max)]
UnitsWh = Annotated[int, msgspec.Meta(ge=0, le=limits.units_wh_max)]
Count = Annotated[int, msgspec.Meta(ge=0, le=limits.count_max)]
IntervalS = Annotated[int, msgspec.Meta(ge=1, le=limits.interval_s_max)]
TerminalSequence = Annotated[int, msgspec.Meta(ge=1, le=limits.terminal_sequence_max)]
KeyVersion = Annotated[int, msgspec.Meta(ge=1, le=limits.key_version_max)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=limits.nonce_bytes, max_length=limits.nonce_bytes)]
UtcDateTime = Annotated[datetime, msgspec.Meta(tz=True)]
# Printable text (str.isprintable: no control, format or separator characters but the space):
# it reaches receipt printers and terminal screens.
ReceiptLine = Annotated[str, _length(0, limits.receipt_line_chars_max)]
ReceiptLines = Annotated[list[ReceiptLine], msgspec.Meta(max_length=limits.receipt_lines_max)]
Tokens = Annotated[list[Token], msgspec.Meta(max_length=limits.tokens_per_result_max)]
CustomerName = Annotated[str, _length(1, limits.customer_name_chars_max)]
Address = Annotated[str, _length(0, limits.address_chars_max)]
Detail = Annotated[str, _length(0, limits.detail_chars_max)]
SoftwareVersion = Annotated[str, _length(1, limits.software_version_chars_max)]

_DIGITS: Final = string.digits
_UPPER_DIGITS: Final = string.ascii_uppercase + string.digits
_UPPER: Final = string.ascii_uppercase
_ACCOUNT_CHARS: Final = string.ascii_letters + string.digits + "-"
_RECEIPT_CHARS: Final = string.ascii_letters + string.digits + "/-"


def _only(value: str, chars: str, field: str) -> None:
    # str.strip removes every leading and trailing character in `chars`: anything left is foreign.
    if value.strip(chars):
        raise ValueError(f"{field} has a character outside its set")


def _printable(value: str, field: str) -> None:
    if not value.isprintable():
        raise ValueError(f"{field} must be printable text")


def _printable_lines(lines: list[str], field: str) -> None:
    if not "".join(lines).isprintable():
        raise ValueError(f"{field} must be printable text")


def _tokens(tokens: list[str]) -> None:
    if tokens and "".join(tokens).strip(_DIGITS):
        raise ValueError("tokens are 20 decimal digits")


def is_terminal_id(value: str) -> bool:
    """True when `value` is a well-formed terminal id: 8 characters, digits and A-Z."""
    return len(value) == limits.terminal_id_chars and not value.strip(_UPPER_DIGITS)


class TenderType(enum.StrEnum):
    CASH = "cash"
    CARD = "card"
    MOBILE_MONEY = "mobile_money"


class ReversalReason(enum.StrEnum):
    NO_REPLY = "no_reply"  # the terminal never learned the outcome
    PRINT_FAILURE = "print_failure"  # approved, but the receipt (and token) could not be printed
    AGENT_CANCELLED = "agent_cancelled"  # keyed in error and cancelled before the customer left


class SupplyMode(enum.StrEnum):
    SMART = "smart"  # the prepayment engine drives the meter remotely
    TOKEN = "token"  # noqa: S105 - STS meter: credit arrives as a 20-digit token typed on the keypad


class SupplyState(enum.StrEnum):
    CONNECTED = "connected"
    LIMITED = "limited"  # limited to 10 A after credit and emergency credit ran out
    DISCONNECTED = "disconnected"
    UNKNOWN = "unknown"


class _Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A nested, untagged part of a message."""


class ClientTransactionId(_Record, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The idempotency key of a payment, made by the terminal: who, which day, which number.

    `terminal_sequence` counts the terminal's transactions within its local business date,
    from 1; it is not the frame sequence number. `as_key()` is the canonical text form,
    e.g. "T0000001-20250301-000042".
    """

    terminal_id: TerminalId
    terminal_sequence: TerminalSequence
    business_date: date

    def __post_init__(self) -> None:
        if self.terminal_id.strip(_UPPER_DIGITS):
            raise ValueError("terminal_id has a character outside 0-9 A-Z")

    def as_key(self) -> str:
        day = self.business_date  # formatted field by field: strftime costs several times as much
        return f"{self.terminal_id}-{day.year:04d}{day.month:02d}{day.day:02d}-{self.terminal_sequence:06d}"

    @classmethod
    def from_key(cls, key: str) -> ClientTransactionId:
        """Parse `as_key()` text; raises ValueError (or msgspec.ValidationError) when malformed."""
        match = re.fullmatch(r"([0-9A-Z]{8})-([0-9]{8})-([0-9]{6})", key)
        if match is None:
            raise ValueError(f"not a client transaction id: {key!r}")
        terminal_id, day, sequence = match.groups()
        business_date = date(int(day[:4]), int(day[4:6]), int(day[6:]))
        return msgspec.convert(
            {"terminal_id": terminal_id, "terminal_sequence": int(sequence), "business_date": business_date},
            cls,
        )


class LastPurchase(_Record, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount_minor: AmountMinor
    units_wh: UnitsWh = 0
    purchased_at: UtcDateTime


class Customer(_Record, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the agent sees before taking money. `masked_name` is masked by the server."""

    meter_number: MeterNumber
    account_number: AccountNumber
    masked_name: CustomerName
    address: Address
    supply_mode: SupplyMode
    supply_state: SupplyState = SupplyState.UNKNOWN
    debt_minor: AmountMinor
    currency: Currency
    last_purchase: LastPurchase | None = None

    def __post_init__(self) -> None:
        _only(self.meter_number, _DIGITS, "meter_number")
        _only(self.account_number, _ACCOUNT_CHARS, "account_number")
        _printable(self.masked_name, "masked_name")
        _printable(self.address, "address")
        _only(self.currency, _UPPER, "currency")


class Advice(_Record, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A payment the terminal took while offline, forwarded later; same rules as a top-up."""

    client_transaction_id: ClientTransactionId
    meter_number: MeterNumber
    amount_minor: PositiveAmountMinor
    currency: Currency
    tender_type: TenderType
    taken_at: UtcDateTime

    def __post_init__(self) -> None:
        _only(self.meter_number, _DIGITS, "meter_number")
        _only(self.currency, _UPPER, "currency")


class AdviceOutcome(_Record, frozen=True, kw_only=True, forbid_unknown_fields=True):
    client_transaction_id: ClientTransactionId
    response_code: ResponseCode
    receipt_number: ReceiptNumber | None = None
    tokens: Tokens = []

    def __post_init__(self) -> None:
        if self.receipt_number is not None:
            _only(self.receipt_number, _RECEIPT_CHARS, "receipt_number")
        _tokens(self.tokens)
        if self.tokens and self.response_code is not ResponseCode.APPROVED:
            raise ValueError("a declined advice carries no token")


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """Base of every message; `message_type` is the frame header's type byte."""

    message_type: ClassVar[int]


# ---- logon ---------------------------------------------------------------------------------------


class LogonRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="logon_request"):
    """Sent unauthenticated (zero MAC): the terminal id is in the frame header."""

    message_type: ClassVar[int] = 0x01
    terminal_nonce: Nonce
    key_version: KeyVersion = 1


class LogonChallenge(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="logon_challenge"):
    """Sent unauthenticated (zero MAC); both ends now derive the session keys."""

    message_type: ClassVar[int] = 0x02
    server_nonce: Nonce


class LogonProof(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="logon_proof"):
    """Its frame MAC, under the new terminal-to-server key, is the proof of the terminal key."""

    message_type: ClassVar[int] = 0x03
    software_version: SoftwareVersion
    pending_advice_count: Count = 0

    def __post_init__(self) -> None:
        _printable(self.software_version, "software_version")


class LogonAccepted(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="logon_accepted"):
    """Its frame MAC, under the new server-to-terminal key, proves the server to the terminal."""

    message_type: ClassVar[int] = 0x04
    server_time: UtcDateTime
    business_date: date
    heartbeat_interval_s: IntervalS
    idle_timeout_s: IntervalS


# ---- heartbeat -----------------------------------------------------------------------------------


class HeartbeatRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="heartbeat_request"):
    message_type: ClassVar[int] = 0x05


class HeartbeatReply(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="heartbeat_reply"):
    message_type: ClassVar[int] = 0x06
    server_time: UtcDateTime


# ---- customer lookup -----------------------------------------------------------------------------


class LookupRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="lookup_request"):
    """Exactly one of meter_number and account_number."""

    message_type: ClassVar[int] = 0x07
    meter_number: MeterNumber | None = None
    account_number: AccountNumber | None = None

    def __post_init__(self) -> None:
        if (self.meter_number is None) == (self.account_number is None):
            raise ValueError("give exactly one of meter_number and account_number")
        if self.meter_number is not None:
            _only(self.meter_number, _DIGITS, "meter_number")
        if self.account_number is not None:
            _only(self.account_number, _ACCOUNT_CHARS, "account_number")


class LookupResult(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="lookup_result"):
    """`customer` is present exactly when the code is APPROVED."""

    message_type: ClassVar[int] = 0x08
    response_code: ResponseCode
    customer: Customer | None = None

    def __post_init__(self) -> None:
        if (self.customer is not None) != (self.response_code is ResponseCode.APPROVED):
            raise ValueError("customer is present exactly when the lookup is approved")


# ---- top-up --------------------------------------------------------------------------------------


class TopUpRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="top_up_request"):
    message_type: ClassVar[int] = 0x09
    client_transaction_id: ClientTransactionId
    meter_number: MeterNumber
    amount_minor: PositiveAmountMinor
    currency: Currency
    tender_type: TenderType

    def __post_init__(self) -> None:
        # Inline rather than helper calls: every top-up pays for these checks.
        if self.meter_number.strip(_DIGITS) or self.currency.strip(_UPPER):
            raise ValueError("meter_number must be digits 0-9 and currency letters A-Z")


class TopUpResult(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="top_up_result"):
    """Approved: receipt number set and the split adds up to amount_minor. Declined: no token."""

    message_type: ClassVar[int] = 0x0A
    client_transaction_id: ClientTransactionId
    response_code: ResponseCode
    currency: Currency
    amount_minor: AmountMinor = 0
    receipt_number: ReceiptNumber | None = None
    receipt_lines: ReceiptLines = []
    tokens: Tokens = []
    units_wh: UnitsWh = 0
    debt_recovery_minor: AmountMinor = 0
    energy_minor: AmountMinor = 0
    fees_minor: AmountMinor = 0
    vat_minor: AmountMinor = 0
    float_remaining_minor: AmountMinor = 0
    issued_at: UtcDateTime | None = None

    def __post_init__(self) -> None:
        # Inline rather than helper calls: every top-up pays for these checks.
        if (
            self.currency.strip(_UPPER)
            or (self.receipt_number is not None and self.receipt_number.strip(_RECEIPT_CHARS))
            or not "".join(self.receipt_lines).isprintable()
            or "".join(self.tokens).strip(_DIGITS)
        ):
            raise ValueError("currency, receipt_number, receipt_lines or tokens has a character outside its set")
        if self.response_code is ResponseCode.APPROVED:
            if self.receipt_number is None:
                raise ValueError("an approved top-up has a receipt number")
            split = self.debt_recovery_minor + self.energy_minor + self.fees_minor + self.vat_minor
            if split != self.amount_minor:
                raise ValueError("debt recovery + energy + fees + VAT must equal amount_minor")
        elif self.tokens:
            raise ValueError("a declined top-up carries no token")


# ---- reversal ------------------------------------------------------------------------------------


class ReversalRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="reversal_request"):
    """Idempotent: reversing the same original twice returns the first outcome or ALREADY_REVERSED."""

    message_type: ClassVar[int] = 0x0B
    original_transaction_id: ClientTransactionId
    amount_minor: PositiveAmountMinor
    currency: Currency
    reason: ReversalReason

    def __post_init__(self) -> None:
        _only(self.currency, _UPPER, "currency")


class ReversalResult(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="reversal_result"):
    message_type: ClassVar[int] = 0x0C
    original_transaction_id: ClientTransactionId
    response_code: ResponseCode
    currency: Currency
    reversed_amount_minor: AmountMinor = 0
    float_remaining_minor: AmountMinor = 0

    def __post_init__(self) -> None:
        _only(self.currency, _UPPER, "currency")


# ---- reprint -------------------------------------------------------------------------------------


class ReprintRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="reprint_request"):
    """Exactly one of client_transaction_id and receipt_number."""

    message_type: ClassVar[int] = 0x0D
    client_transaction_id: ClientTransactionId | None = None
    receipt_number: ReceiptNumber | None = None

    def __post_init__(self) -> None:
        if (self.client_transaction_id is None) == (self.receipt_number is None):
            raise ValueError("give exactly one of client_transaction_id and receipt_number")
        if self.receipt_number is not None:
            _only(self.receipt_number, _RECEIPT_CHARS, "receipt_number")


class ReprintResult(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="reprint_result"):
    message_type: ClassVar[int] = 0x0E
    response_code: ResponseCode
    client_transaction_id: ClientTransactionId | None = None
    receipt_number: ReceiptNumber | None = None
    receipt_lines: ReceiptLines = []
    tokens: Tokens = []

    def __post_init__(self) -> None:
        if self.receipt_number is not None:
            _only(self.receipt_number, _RECEIPT_CHARS, "receipt_number")
        _printable_lines(self.receipt_lines, "receipt_lines")
        _tokens(self.tokens)
        if self.response_code is ResponseCode.APPROVED and self.receipt_number is None:
            raise ValueError("an approved reprint has a receipt number")


# ---- float ---------------------------------------------------------------------------------------


class FloatInquiryRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="float_inquiry_request"):
    message_type: ClassVar[int] = 0x0F


class FloatInquiryResult(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="float_inquiry_result"):
    message_type: ClassVar[int] = 0x10
    response_code: ResponseCode
    currency: Currency
    float_remaining_minor: AmountMinor = 0
    low_float_threshold_minor: AmountMinor = 0

    def __post_init__(self) -> None:
        _only(self.currency, _UPPER, "currency")


# ---- offline advices -----------------------------------------------------------------------------


class AdviceBatchRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="advice_batch_request"):
    """Payments taken offline, oldest first; each is idempotent on its client transaction id."""

    message_type: ClassVar[int] = 0x11
    advices: Annotated[list[Advice], msgspec.Meta(min_length=1, max_length=limits.advices_per_batch_max)]

    def __post_init__(self) -> None:
        if len({advice.client_transaction_id for advice in self.advices}) != len(self.advices):
            raise ValueError("client transaction ids in one advice batch must be distinct")


class AdviceBatchResult(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="advice_batch_result"):
    """One outcome per advice, in request order."""

    message_type: ClassVar[int] = 0x12
    response_code: ResponseCode
    outcomes: Annotated[list[AdviceOutcome], msgspec.Meta(max_length=limits.advices_per_batch_max)] = []


# ---- end of day ----------------------------------------------------------------------------------


class EndOfDayRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="end_of_day_request"):
    """The terminal's totals for one business date (approved top-ups, reversals, advices)."""

    message_type: ClassVar[int] = 0x13
    business_date: date
    currency: Currency
    top_up_count: Count
    top_up_total_minor: AmountMinor
    reversal_count: Count
    reversal_total_minor: AmountMinor
    advice_count: Count
    advice_total_minor: AmountMinor

    def __post_init__(self) -> None:
        _only(self.currency, _UPPER, "currency")


class EndOfDayResult(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="end_of_day_result"):
    """The server's totals for the same date; TOTALS_MISMATCH when they differ from the terminal's."""

    message_type: ClassVar[int] = 0x14
    response_code: ResponseCode
    business_date: date
    currency: Currency
    top_up_count: Count = 0
    top_up_total_minor: AmountMinor = 0
    reversal_count: Count = 0
    reversal_total_minor: AmountMinor = 0
    advice_count: Count = 0
    advice_total_minor: AmountMinor = 0

    def __post_init__(self) -> None:
        _only(self.currency, _UPPER, "currency")


# ---- logoff and errors ---------------------------------------------------------------------------


class LogoffRequest(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="logoff_request"):
    message_type: ClassVar[int] = 0x15


class LogoffReply(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="logoff_reply"):
    """The server closes the connection after sending it."""

    message_type: ClassVar[int] = 0x16


class ErrorReply(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="error"):
    """A frame the server could not accept, or a refused logon.

    With `connection_closing` the server hangs up after this frame; otherwise it answers the
    terminal's outstanding request and the session carries on.
    """

    message_type: ClassVar[int] = 0x7E
    response_code: ResponseCode
    detail: Detail = ""
    connection_closing: bool = True

    def __post_init__(self) -> None:
        if self.response_code is ResponseCode.APPROVED:
            raise ValueError("an error frame never says APPROVED")
        _printable(self.detail, "detail")


TerminalMessage = (
    LogonRequest
    | LogonProof
    | HeartbeatRequest
    | LookupRequest
    | TopUpRequest
    | ReversalRequest
    | ReprintRequest
    | FloatInquiryRequest
    | AdviceBatchRequest
    | EndOfDayRequest
    | LogoffRequest
)
ServerMessage = (
    LogonChallenge
    | LogonAccepted
    | HeartbeatReply
    | LookupResult
    | TopUpResult
    | ReversalResult
    | ReprintResult
    | FloatInquiryResult
    | AdviceBatchResult
    | EndOfDayResult
    | LogoffReply
    | ErrorReply
)
AnyMessage = TerminalMessage | ServerMessage

TERMINAL_MESSAGE_TYPES: Final[tuple[type[TerminalMessage], ...]] = (
    LogonRequest,
    LogonProof,
    HeartbeatRequest,
    LookupRequest,
    TopUpRequest,
    ReversalRequest,
    ReprintRequest,
    FloatInquiryRequest,
    AdviceBatchRequest,
    EndOfDayRequest,
    LogoffRequest,
)
SERVER_MESSAGE_TYPES: Final[tuple[type[ServerMessage], ...]] = (
    LogonChallenge,
    LogonAccepted,
    HeartbeatReply,
    LookupResult,
    TopUpResult,
    ReversalResult,
    ReprintResult,
    FloatInquiryResult,
    AdviceBatchResult,
    EndOfDayResult,
    LogoffReply,
    ErrorReply,
)
# Requests a logged-on terminal may send, each with the one reply type that answers it
# (an ErrorReply may answer any of them).
REPLY_TYPE: Final[dict[type[TerminalMessage], type[ServerMessage]]] = {
    HeartbeatRequest: HeartbeatReply,
    LookupRequest: LookupResult,
    TopUpRequest: TopUpResult,
    ReversalRequest: ReversalResult,
    ReprintRequest: ReprintResult,
    FloatInquiryRequest: FloatInquiryResult,
    AdviceBatchRequest: AdviceBatchResult,
    EndOfDayRequest: EndOfDayResult,
    LogoffRequest: LogoffReply,
}
REQUEST_TYPES: Final = frozenset(REPLY_TYPE)
TERMINAL_TYPE_BY_CODE: Final[dict[int, type[TerminalMessage]]] = {
    cls.message_type: cls for cls in TERMINAL_MESSAGE_TYPES
}
SERVER_TYPE_BY_CODE: Final[dict[int, type[ServerMessage]]] = {cls.message_type: cls for cls in SERVER_MESSAGE_TYPES}

assert len(TERMINAL_TYPE_BY_CODE) == len(TERMINAL_MESSAGE_TYPES)
assert len(SERVER_TYPE_BY_CODE) == len(SERVER_MESSAGE_TYPES)
assert all(code % 2 == 1 for code in TERMINAL_TYPE_BY_CODE) and all(code % 2 == 0 for code in SERVER_TYPE_BY_CODE)
assert all(reply.message_type == request.message_type + 1 for request, reply in REPLY_TYPE.items())

# The one MessagePack encoder, and one decoder per direction's union; reused for every frame.
MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
TERMINAL_DECODER: Final[msgspec.msgpack.Decoder[TerminalMessage]] = msgspec.msgpack.Decoder(TerminalMessage)
SERVER_DECODER: Final[msgspec.msgpack.Decoder[ServerMessage]] = msgspec.msgpack.Decoder(ServerMessage)


# Where each request names client transaction ids: each must carry the sender's terminal id.
TRANSACTION_IDS_OF: Final[dict[type[AnyMessage], Callable[[Any], tuple[ClientTransactionId, ...]]]] = {
    TopUpRequest: lambda message: (message.client_transaction_id,),
    ReversalRequest: lambda message: (message.original_transaction_id,),
    ReprintRequest: lambda message: () if message.client_transaction_id is None else (message.client_transaction_id,),
    AdviceBatchRequest: lambda message: tuple(advice.client_transaction_id for advice in message.advices),
}


def transaction_ids(message: AnyMessage) -> tuple[ClientTransactionId, ...]:
    """Every client transaction id a terminal message names (to check it is the terminal's own)."""
    getter = TRANSACTION_IDS_OF.get(type(message))
    return () if getter is None else getter(message)


def foreign_transaction_id(message: AnyMessage, terminal_id: str) -> ClientTransactionId | None:
    """The first transaction id in `message` that belongs to another terminal, if any."""
    getter = TRANSACTION_IDS_OF.get(type(message))
    if getter is not None:
        for txid in getter(message):
            if txid.terminal_id != terminal_id:
                return txid
    return None
