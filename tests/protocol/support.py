"""Shared material for the protocol tests: one example of every message and logged-on session pairs."""

from __future__ import annotations

from datetime import UTC, date, datetime

from protocol import limits
from protocol.codes import ResponseCode
from protocol.messages import (
    Advice,
    AdviceBatchRequest,
    AdviceBatchResult,
    AdviceOutcome,
    AnyMessage,
    ClientTransactionId,
    Customer,
    EndOfDayRequest,
    EndOfDayResult,
    ErrorReply,
    FloatInquiryRequest,
    FloatInquiryResult,
    HeartbeatReply,
    HeartbeatRequest,
    LastPurchase,
    LogoffReply,
    LogoffRequest,
    LogonAccepted,
    LogonChallenge,
    LogonProof,
    LogonRequest,
    LookupRequest,
    LookupResult,
    ReprintRequest,
    ReprintResult,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    SupplyMode,
    SupplyState,
    TenderType,
    TopUpRequest,
    TopUpResult,
)
from protocol.session import LoggedOn, LogonRequested, MessageReceived, ServerSession, TerminalSession

TERMINAL_ID = "T0000001"
TERMINAL_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
TERMINAL_NONCE = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
SERVER_NONCE = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf")
BUSINESS_DATE = date(2025, 3, 1)
T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)

TXID = ClientTransactionId(terminal_id=TERMINAL_ID, terminal_sequence=42, business_date=BUSINESS_DATE)
TXID_2 = ClientTransactionId(terminal_id=TERMINAL_ID, terminal_sequence=43, business_date=BUSINESS_DATE)

LOGON_REQUEST = LogonRequest(terminal_nonce=TERMINAL_NONCE)
LOGON_PROOF = LogonProof(software_version="acme-pos 4.2.1", pending_advice_count=2)
LOGON_ACCEPTED = LogonAccepted(server_time=T0, business_date=BUSINESS_DATE, heartbeat_interval_s=60, idle_timeout_s=300)

TOP_UP_REQUEST = TopUpRequest(
    client_transaction_id=TXID,
    meter_number="04040404040",
    amount_minor=5_000,
    currency="ZAR",
    tender_type=TenderType.CASH,
)
TOP_UP_RESULT = TopUpResult(
    client_transaction_id=TXID,
    response_code=ResponseCode.APPROVED,
    currency="ZAR",
    amount_minor=5_000,
    receipt_number="R-00000042",
    receipt_lines=["VENDGATE PREPAID ELECTRICITY", "Meter 04040404040", "Amount ZAR 50.00"],
    tokens=["56647145610375693113"],
    units_wh=21_300,
    debt_recovery_minor=1_000,
    energy_minor=3_000,
    fees_minor=478,
    vat_minor=522,
    float_remaining_minor=995_000,
    issued_at=datetime(2025, 3, 1, 8, 1, 5, tzinfo=UTC),
)

# Every request with its reply, in the order of the message catalogue.
REQUEST_REPLY_PAIRS: list[tuple[AnyMessage, AnyMessage]] = [
    (HeartbeatRequest(), HeartbeatReply(server_time=T0)),
    (
        LookupRequest(meter_number="04040404040"),
        LookupResult(
            response_code=ResponseCode.APPROVED,
            customer=Customer(
                meter_number="04040404040",
                account_number="ACC-1001",
                masked_name="N*** M***",
                address="12 Church Street, Soweto",
                supply_mode=SupplyMode.TOKEN,
                supply_state=SupplyState.LIMITED,
                debt_minor=12_550,
                currency="ZAR",
                last_purchase=LastPurchase(
                    amount_minor=10_000, units_wh=41_000, purchased_at=datetime(2025, 2, 14, 17, 30, tzinfo=UTC)
                ),
            ),
        ),
    ),
    (TOP_UP_REQUEST, TOP_UP_RESULT),
    (
        ReversalRequest(
            original_transaction_id=TXID, amount_minor=5_000, currency="ZAR", reason=ReversalReason.NO_REPLY
        ),
        ReversalResult(
            original_transaction_id=TXID,
            response_code=ResponseCode.APPROVED,
            currency="ZAR",
            reversed_amount_minor=5_000,
            float_remaining_minor=1_000_000,
        ),
    ),
    (
        ReprintRequest(receipt_number="R-00000042"),
        ReprintResult(
            response_code=ResponseCode.APPROVED,
            client_transaction_id=TXID,
            receipt_number="R-00000042",
            receipt_lines=["** REPRINT **", "VENDGATE PREPAID ELECTRICITY"],
            tokens=["56647145610375693113"],
        ),
    ),
    (
        FloatInquiryRequest(),
        FloatInquiryResult(
            response_code=ResponseCode.APPROVED,
            currency="ZAR",
            float_remaining_minor=995_000,
            low_float_threshold_minor=100_000,
        ),
    ),
    (
        AdviceBatchRequest(
            advices=[
                Advice(
                    client_transaction_id=TXID_2,
                    meter_number="04040404040",
                    amount_minor=2_000,
                    currency="ZAR",
                    tender_type=TenderType.CASH,
                    taken_at=datetime(2025, 3, 1, 6, 12, tzinfo=UTC),
                )
            ]
        ),
        AdviceBatchResult(
            response_code=ResponseCode.APPROVED,
            outcomes=[
                AdviceOutcome(
                    client_transaction_id=TXID_2,
                    response_code=ResponseCode.APPROVED,
                    receipt_number="R-00000043",
                    tokens=["12345678901234567890"],
                )
            ],
        ),
    ),
    (
        EndOfDayRequest(
            business_date=BUSINESS_DATE,
            currency="ZAR",
            top_up_count=12,
            top_up_total_minor=84_000,
            reversal_count=1,
            reversal_total_minor=5_000,
            advice_count=1,
            advice_total_minor=2_000,
        ),
        EndOfDayResult(
            response_code=ResponseCode.APPROVED,
            business_date=BUSINESS_DATE,
            currency="ZAR",
            top_up_count=12,
            top_up_total_minor=84_000,
            reversal_count=1,
            reversal_total_minor=5_000,
            advice_count=1,
            advice_total_minor=2_000,
        ),
    ),
    (LogoffRequest(), LogoffReply()),
]

EXAMPLES: list[AnyMessage] = [
    LOGON_REQUEST,
    LogonChallenge(server_nonce=SERVER_NONCE),
    LOGON_PROOF,
    LOGON_ACCEPTED,
    *(message for pair in REQUEST_REPLY_PAIRS for message in pair),
    ErrorReply(response_code=ResponseCode.SYSTEM_BUSY, detail="busy, retry with the same id", connection_closing=False),
]


def logged_on_pair(
    terminal_id: str = TERMINAL_ID, terminal_key: bytes = TERMINAL_KEY
) -> tuple[TerminalSession, ServerSession]:
    """A terminal and a server session that completed the logon handshake."""
    terminal, server = TerminalSession(terminal_id, terminal_key), ServerSession()
    events = server.receive_data(terminal.send(LogonRequest(terminal_nonce=TERMINAL_NONCE)))
    assert isinstance(events[0], LogonRequested)
    terminal.receive_data(server.challenge(terminal_key, SERVER_NONCE))
    events = server.receive_data(terminal.send(LOGON_PROOF))
    assert isinstance(events[0], LoggedOn)
    [accepted] = terminal.receive_data(server.send(LOGON_ACCEPTED))
    assert isinstance(accepted, MessageReceived) and accepted.message == LOGON_ACCEPTED
    return terminal, server


def nonce(byte: int) -> bytes:
    return bytes([byte]) * limits.nonce_bytes
