"""A self-service kiosk client: HTTPS with its client certificate, JSON messages (protocol.kiosk)."""

from __future__ import annotations

import ssl
from datetime import date

import aiohttp

from protocol.kiosk import CONTENT_TYPE, KIOSK_PATH, decode_kiosk_reply, encode_kiosk_message
from protocol.messages import (
    ClientTransactionId,
    ServerMessage,
    TenderType,
    TerminalMessage,
    TopUpRequest,
)

request_timeout_s = 30.0


def client_ssl_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class Kiosk:
    def __init__(self, kiosk_id: str, base_url: str, ssl_context: ssl.SSLContext | None, business_date: date,
                 last_sequence: int = 0) -> None:
        self.kiosk_id = kiosk_id
        self.base_url = base_url.rstrip("/")
        self.ssl_context = ssl_context
        self.business_date = business_date
        self._sequence = last_sequence

    def next_transaction_id(self) -> ClientTransactionId:
        self._sequence += 1
        return ClientTransactionId(terminal_id=self.kiosk_id, terminal_sequence=self._sequence,
                                   business_date=self.business_date)

    async def send(self, message: TerminalMessage) -> tuple[int, ServerMessage]:
        timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context is not None else False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session, session.post(
                self.base_url + KIOSK_PATH, data=encode_kiosk_message(message),
                headers={"Content-Type": CONTENT_TYPE}) as response:
            return response.status, decode_kiosk_reply(await response.read())

    async def top_up(self, meter_number: str, amount_minor: int, currency: str,
                     txn: ClientTransactionId | None = None) -> tuple[int, ServerMessage]:
        return await self.send(TopUpRequest(client_transaction_id=txn or self.next_transaction_id(),
                                            meter_number=meter_number, amount_minor=amount_minor,
                                            currency=currency, tender_type=TenderType.CASH))
