"""No secret reaches the gateway's log: terminal and master keys, the database password, full tokens."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import msgspec
import pytest

from gateway.jsonlog import JsonFormatter
from gateway.seeding import meter_number, terminal_id
from protocol.codes import ResponseCode
from terminal_sim.client import PosTerminal, TerminalRefused
from tests.gateway.conftest import Running


@pytest.fixture
def gateway_log() -> Iterator[io.StringIO]:
    """Every line the gateway logs while the test runs, at every level, as the server writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("vendgate")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def spellings(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), repr(secret)[2:-1]]


async def test_a_day_of_payments_logs_no_secret(running: Running, gateway_log: io.StringIO) -> None:
    assert running.gateway.pos_port is not None
    key = running.key(3)
    pos = PosTerminal(terminal_id(3), key, "127.0.0.1", running.gateway.pos_port)
    await pos.logon()
    paid = await pos.top_up(meter_number(3), 5_000, "EUR")  # an STS meter: the reply holds a token
    assert paid.response_code is ResponseCode.APPROVED and len(paid.tokens) == 1
    token = paid.tokens[0]
    again = await pos.top_up(meter_number(3), 5_000, "EUR", txn=paid.client_transaction_id)
    assert again.tokens == [token]
    reprinted = await pos.reprint(paid.client_transaction_id)
    assert reprinted.tokens == [token]
    undone = await pos.top_up(meter_number(6), 2_000, "EUR")  # another STS payment, then its reversal
    reversed_ = await pos.reverse(undone.client_transaction_id, 2_000, "EUR")
    assert reversed_.response_code is ResponseCode.APPROVED
    await pos.logoff()
    impostor = PosTerminal(terminal_id(3), bytes(16), "127.0.0.1", running.gateway.pos_port)
    with pytest.raises(TerminalRefused):
        await impostor.logon()
    await impostor.close()

    lines = [msgspec.json.decode(line) for line in gateway_log.getvalue().splitlines()]
    events = {line["event"] for line in lines}
    # The capture saw the traffic: otherwise the search below would prove nothing.
    assert {"top_up", "reprint", "reversal"} <= events, events
    top_ups = [line for line in lines if line["event"] == "top_up"]
    shown = {"*" * 16 + t[-4:] for t in (token, undone.tokens[0])}  # the last 4 digits, for support
    assert len(top_ups) == 3 and all(line["token"] in shown for line in top_ups)
    assert [line["token"] for line in lines if line["event"] == "reprint"] == ["*" * 16 + token[-4:]]
    text = gateway_log.getvalue()
    password = unquote(urlsplit(running.db_url).password or "")
    secrets = {"terminal key": spellings(key), "master key": spellings(running.master_key),
               "token": [token, token[:16], undone.tokens[0], undone.tokens[0][:16]]}
    if password:
        secrets["database password"] = [password]
    for name, forms in secrets.items():
        for form in forms:
            assert form not in text, f"the {name} appears in the log"
