"""A simulated STS prepayment meter: the keypad end of a token, for tests and load runs.

It holds what a real meter holds: its decoder key, a credit register for the one service it
meters, a maximum power limit, a tamper flag, and the memory of token identifiers (TIDs) it has
accepted. `enter(token)` does what the meter does when a customer finishes typing 20 digits, in
the standard's order, and answers with a typed MeterResponse that says why a token was refused:

1. FORMAT      not 20 digits, or a number no 66-bit token can be;
2. CLASS       class 1 (test) and class 3 (reserved) tokens are not credit or management tokens;
3. CRC         the block does not decrypt to a valid CRC under this meter's key: a token for
               another meter, or a digit typed wrong (caught but for the CRC-16 chance 1 in 65536);
4. CLASS       a credit token for another service (a water token on an electricity meter), or a
               management function this meter does not offer;
5. KEY_EXPIRED the TID is past the key expiry number (KEN bounds the top 8 bits of the TID);
6. USED        the TID is in memory: the token was already entered;
7. OLD         the memory is full and the TID is older than every TID in it, so it may have been
               used and forgotten. While memory is not full it still holds every TID ever
               accepted, so an unseen TID is provably new and is accepted even if older.

The STS Association's TID-rollover notes confirm that meters store accepted TIDs and refuse a
lower TID as "old"; how many TIDs a meter must keep is set in IEC 62055-41, which is not public:
TID_MEMORY_SIZE below is our choice, and a parameter.

Depends on protocol/ only, as a meter vendor's firmware team would.
"""

from __future__ import annotations

import bisect
from enum import StrEnum
from typing import Final

import msgspec

from protocol import sts

TID_MEMORY_SIZE: Final = 50  # TIDs kept; the oldest is forgotten when a new one arrives
KEY_EXPIRY_NUMBER_MAX: Final = 255  # KEN 255: the key never expires within a base date
_KEN_SHIFT_BITS: Final = 16  # KEN is compared with TID bits 23..16


class Refusal(StrEnum):
    FORMAT = "format"
    CLASS = "class"
    CRC = "crc"
    KEY_EXPIRED = "key_expired"
    USED = "used"
    OLD = "old"


class MeterResponse(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the meter's display says after a token: accepted, or refused and why."""

    accepted: bool
    refusal: Refusal | None = None
    token_class: int | None = None
    subclass: int | None = None
    token_id: int | None = None
    units_credited: int = 0  # tenths of kWh (or m3), as credited; 0 unless a credit token was accepted


_MANAGEMENT_FUNCTIONS: Final = frozenset({
    sts.ManagementSubclass.SET_MAXIMUM_POWER_LIMIT,
    sts.ManagementSubclass.CLEAR_CREDIT,
    sts.ManagementSubclass.CLEAR_TAMPER_CONDITION,
})


class Meter:
    """One meter. Not thread-safe; a simulation drives it from one task."""

    def __init__(self, decoder_key: bytes, *, service: sts.CreditSubclass = sts.CreditSubclass.ELECTRICITY,
                 key_expiry_number: int = KEY_EXPIRY_NUMBER_MAX, tid_memory_size: int = TID_MEMORY_SIZE) -> None:
        if len(decoder_key) != 8:
            raise ValueError("a decoder key has 8 bytes")
        if not 0 <= key_expiry_number <= KEY_EXPIRY_NUMBER_MAX:
            raise ValueError(f"key expiry number is 0..{KEY_EXPIRY_NUMBER_MAX}")
        if tid_memory_size < 1:
            raise ValueError("the TID memory holds at least one TID")
        self._decoder_key = decoder_key
        self.service = sts.CreditSubclass(service)
        self.key_expiry_number = key_expiry_number
        self.tid_memory_size = tid_memory_size
        self.credit_units = 0  # tenths of the service unit
        self.maximum_power_limit_w: int | None = None
        self.tampered = False
        self._tids: list[int] = []  # sorted ascending

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The TIDs in memory, oldest first."""
        return tuple(self._tids)

    def consume(self, units: int) -> int:
        """Use energy (or water, gas): take up to `units` from the credit register; returns what was taken."""
        taken = min(max(units, 0), self.credit_units)
        self.credit_units -= taken
        return taken

    def enter(self, token: str) -> MeterResponse:
        try:
            token_class = sts.token_class_of(token)
        except sts.StsError:
            return MeterResponse(accepted=False, refusal=Refusal.FORMAT)
        if token_class not in (sts.TokenClass.CREDIT, sts.TokenClass.MANAGEMENT):
            return MeterResponse(accepted=False, refusal=Refusal.CLASS, token_class=int(token_class))
        decoded = sts.decode_token(self._decoder_key, token)
        if not decoded.crc_ok:
            # The fields of a block that fails its CRC are noise: report none of them.
            return MeterResponse(accepted=False, refusal=Refusal.CRC)
        if not self._fits(decoded):
            return _seen(decoded, Refusal.CLASS)
        tid = decoded.token_id
        if tid >> _KEN_SHIFT_BITS > self.key_expiry_number:
            return _seen(decoded, Refusal.KEY_EXPIRED)
        position = bisect.bisect_left(self._tids, tid)
        if position < len(self._tids) and self._tids[position] == tid:
            return _seen(decoded, Refusal.USED)
        if len(self._tids) >= self.tid_memory_size and position == 0:
            return _seen(decoded, Refusal.OLD)
        self._tids.insert(position, tid)
        if len(self._tids) > self.tid_memory_size:
            del self._tids[0]
        return _seen(decoded, None, units_credited=self._apply(decoded))

    def _fits(self, decoded: sts.DecodedToken) -> bool:
        if decoded.token_class == sts.TokenClass.CREDIT:
            return decoded.subclass == self.service
        if decoded.subclass not in _MANAGEMENT_FUNCTIONS:
            return False
        if decoded.subclass == sts.ManagementSubclass.CLEAR_CREDIT:
            return decoded.register in (self.service, sts.REGISTER_ALL)
        return True

    def _apply(self, decoded: sts.DecodedToken) -> int:
        if decoded.token_class == sts.TokenClass.CREDIT:
            assert decoded.units is not None
            self.credit_units += decoded.units
            return decoded.units
        if decoded.subclass == sts.ManagementSubclass.SET_MAXIMUM_POWER_LIMIT:
            self.maximum_power_limit_w = decoded.maximum_power_limit_w
        elif decoded.subclass == sts.ManagementSubclass.CLEAR_CREDIT:
            self.credit_units = 0
        else:
            assert decoded.subclass == sts.ManagementSubclass.CLEAR_TAMPER_CONDITION
            self.tampered = False
        return 0


def _seen(decoded: sts.DecodedToken, refusal: Refusal | None, *, units_credited: int = 0) -> MeterResponse:
    return MeterResponse(accepted=refusal is None, refusal=refusal, token_class=decoded.token_class,
                         subclass=decoded.subclass, token_id=decoded.token_id, units_credited=units_credited)
