"""Hypothesis strategies for every message, derived from the Structs' own constraints.

Lengths and ranges come from msgspec.inspect, character sets from the field names (the same
rules the Structs check in __post_init__), and a few repairs make cross-field rules hold (an
approved top-up's split adds up, a declined one has no token, ...). A new message or field is
covered without touching this file.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

from protocol.codes import ResponseCode
from protocol.messages import (
    AdviceBatchRequest,
    AdviceOutcome,
    AnyMessage,
    ErrorReply,
    LookupRequest,
    LookupResult,
    ReprintRequest,
    ReprintResult,
    TopUpResult,
)

_ALPHABETS = {
    "terminal_id": string.ascii_uppercase + string.digits,
    "meter_number": string.digits,
    "account_number": string.ascii_letters + string.digits + "-",
    "receipt_number": string.ascii_letters + string.digits + "/-",
    "currency": string.ascii_uppercase,
    "tokens": string.digits,
}
# Printable text, including letters beyond ASCII: receipts in any language.
_printable = st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S"]) | st.just(" ")
_timezones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))])


def _for_type(info: mi.Type, field: str, terminal_id: str | None) -> st.SearchStrategy[Any]:
    match info:
        case mi.StrType() if field == "terminal_id" and terminal_id is not None:
            return st.just(terminal_id)
        case mi.StrType(min_length=low, max_length=high):
            alphabet = _ALPHABETS.get(field)
            chars = st.sampled_from(alphabet) if alphabet else _printable
            return st.text(chars, min_size=low or 0, max_size=high if high is not None else 50)
        case mi.IntType(ge=ge, le=le):
            return st.integers(min_value=ge, max_value=le)
        case mi.BoolType():
            return st.booleans()
        case mi.BytesType(min_length=low, max_length=high):
            return st.binary(min_size=low or 0, max_size=high if high is not None else 64)
        case mi.DateType():
            return st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31))
        case mi.DateTimeType():
            return st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=_timezones)
        case mi.EnumType(cls=cls):
            return st.sampled_from(list(cls))
        case mi.ListType(item_type=item, min_length=low, max_length=high):
            return st.lists(_for_type(item, field, terminal_id), min_size=low or 0, max_size=min(high or 8, 8))
        case mi.UnionType(types=types):
            return st.one_of([_for_type(member, field, terminal_id) for member in types])
        case mi.NoneType():
            return st.none()
        case mi.StructType(cls=cls):
            return structs(cls, terminal_id)
    raise NotImplementedError(f"no strategy for {info!r} at {field}")


def _repair_top_up_result(values: dict[str, Any]) -> dict[str, Any]:
    if values["response_code"] is ResponseCode.APPROVED:
        values["receipt_number"] = values["receipt_number"] or "R-1"
        parts = ("debt_recovery_minor", "energy_minor", "fees_minor", "vat_minor")
        for part in parts:
            values[part] = values[part] % 10**9
        values["amount_minor"] = sum(values[part] for part in parts)
    else:
        values["tokens"] = []
    return values


def _repair_lookup_result(values: dict[str, Any]) -> dict[str, Any]:
    if values["customer"] is None:
        values["response_code"] = (
            ResponseCode.UNKNOWN_METER if values["response_code"] is ResponseCode.APPROVED else values["response_code"]
        )
    else:
        values["response_code"] = ResponseCode.APPROVED
    return values


def _repair_one_of(first: str, second: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def repair(values: dict[str, Any]) -> dict[str, Any]:
        if values[first] is not None and values[second] is not None:
            values[second] = None
        elif values[first] is None and values[second] is None:
            values[second] = "R-1" if second == "receipt_number" else "ACC-1"
        return values

    return repair


def _repair_approved_receipt(values: dict[str, Any]) -> dict[str, Any]:
    if values["response_code"] is ResponseCode.APPROVED and values["receipt_number"] is None:
        values["receipt_number"] = "R-1"
    return values


def _repair_tokens_only_if_approved(values: dict[str, Any]) -> dict[str, Any]:
    if values["response_code"] is not ResponseCode.APPROVED:
        values["tokens"] = []
    return values


def _repair_distinct_advices(values: dict[str, Any]) -> dict[str, Any]:
    seen: dict[Any, Any] = {}
    for advice in values["advices"]:
        seen.setdefault(advice.client_transaction_id, advice)
    values["advices"] = list(seen.values())
    return values


def _repair_error(values: dict[str, Any]) -> dict[str, Any]:
    if values["response_code"] is ResponseCode.APPROVED:
        values["response_code"] = ResponseCode.SYSTEM_ERROR
    return values


_REPAIRS: dict[type[msgspec.Struct], Callable[[dict[str, Any]], dict[str, Any]]] = {
    TopUpResult: _repair_top_up_result,
    LookupResult: _repair_lookup_result,
    LookupRequest: _repair_one_of("meter_number", "account_number"),
    ReprintRequest: _repair_one_of("client_transaction_id", "receipt_number"),
    ReprintResult: _repair_approved_receipt,
    AdviceOutcome: _repair_tokens_only_if_approved,
    AdviceBatchRequest: _repair_distinct_advices,
    ErrorReply: _repair_error,
}
_cache: dict[tuple[type[msgspec.Struct], str | None], st.SearchStrategy[Any]] = {}


def structs(cls: type[msgspec.Struct], terminal_id: str | None = None) -> st.SearchStrategy[Any]:
    """Valid instances of any message or record Struct; every terminal id is `terminal_id` if given."""
    key = (cls, terminal_id)
    if key not in _cache:
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        fields = {field.name: _for_type(field.type, field.name, terminal_id) for field in info.fields}
        repair = _REPAIRS.get(cls, lambda values: values)
        _cache[key] = st.fixed_dictionaries(fields).map(repair).map(lambda values: cls(**values))
    return _cache[key]


def messages(cls: type[AnyMessage], terminal_id: str | None = None) -> st.SearchStrategy[AnyMessage]:
    return structs(cls, terminal_id)
