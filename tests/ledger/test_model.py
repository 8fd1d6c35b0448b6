"""Pure money rules of the float ledger: no database."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from float_ledger.errors import InvalidAccount, InvalidTransfer, UnknownTimeZone
from float_ledger.model import (
    PostedTransfer,
    PostStatus,
    TopUpAccounts,
    Transfer,
    TransferKind,
    amount_minor_max,
    batch_columns,
    batch_transfers_max,
    business_day_bounds,
    check_account,
    commission_minor,
    commission_transfer,
    debt_recovery_minor,
    derived_id,
    rate_ppm_max,
    reversal_transfers,
    top_up_transfers,
)

ACCOUNTS = TopUpAccounts(float_account_id=1, customer_credit_account_id=2, customer_debt_account_id=3,
                         collections_account_id=4, commission_expense_account_id=5, commission_payable_account_id=6)


def t(amount: int = 5, *, group: uuid.UUID | None = None, **fields: Any) -> Transfer:
    values: dict[str, Any] = {"id": uuid.uuid4(), "debit_account_id": 1, "credit_account_id": 2,
                              "amount_minor": amount, "currency": "KES", "kind": "collection", "group_id": group}
    return Transfer(**(values | fields))


@pytest.mark.parametrize(("amount", "rate_ppm", "expected"), [
    (199, 10_000, 1),  # 1 % of 199 = 1.99: rounded down
    (200, 10_000, 2),
    (99, 10_000, 0),
    (1_000_000, 15_000, 15_000),
    (0, 500_000, 0),
    (7, 1_000_000, 7),
    (7, 0, 0),
])
def test_commission_is_rounded_down(amount: int, rate_ppm: int, expected: int) -> None:
    assert commission_minor(amount, rate_ppm) == expected


@given(st.integers(0, amount_minor_max), st.integers(0, rate_ppm_max))
def test_commission_never_exceeds_the_rate(amount: int, rate_ppm: int) -> None:
    commission = commission_minor(amount, rate_ppm)
    assert 0 <= commission <= amount
    assert commission * rate_ppm_max <= amount * rate_ppm < (commission + 1) * rate_ppm_max


@pytest.mark.parametrize(("amount", "rate_ppm"), [(-1, 10), (10, -1), (10, rate_ppm_max + 1)])
def test_commission_refuses_impossible_inputs(amount: int, rate_ppm: int) -> None:
    with pytest.raises(ValueError):
        commission_minor(amount, rate_ppm)


@pytest.mark.parametrize(("payment", "debt", "rate_ppm", "expected"), [
    (1000, 10_000, 250_000, 250), (1000, 100, 250_000, 100), (999, 10_000, 250_000, 249), (1000, 0, 250_000, 0),
])
def test_debt_recovery_is_a_rounded_down_share_capped_by_the_debt(payment: int, debt: int, rate_ppm: int,
                                                                  expected: int) -> None:
    assert debt_recovery_minor(payment, debt, rate_ppm) == expected


def test_debt_recovery_refuses_negative_amounts() -> None:
    with pytest.raises(ValueError):
        debt_recovery_minor(-1, 5, 10)
    with pytest.raises(ValueError):
        debt_recovery_minor(5, 5, rate_ppm_max + 1)


def test_batch_columns_are_parallel_and_encode_metadata() -> None:
    group = uuid.uuid4()
    batch = [t(5, group=group, metadata={"terminal_id": "T-1", "receipt_number": 12}), t(7, group=group), t(9)]
    columns = batch_columns(batch)
    assert columns.ids == [x.id for x in batch]
    assert columns.amounts_minor == [5, 7, 9]
    assert columns.group_ids == [group, group, None]
    assert columns.metadata_json == ['{"terminal_id":"T-1","receipt_number":12}', "{}", "{}"]


@pytest.mark.parametrize(("transfer", "message"), [
    (t(0), "amount_minor"), (t(-1), "amount_minor"), (t(amount_minor_max + 1), "amount_minor"),
    (t(True), "amount_minor"), (t(credit_account_id=1), "debit and credit"), (t(currency="KESH"), "currency"),
    (t(currency="kes"), "currency"), (t(kind=""), "kind"), (t(kind="a|b"), "kind"), (t(kind="x" * 41), "kind"),
    (t(metadata={"": "x"}), "metadata key"), (t(metadata={"k" * 65: "x"}), "metadata key"),
    (t(metadata={"ok": 1.5}), "neither text nor an integer"), (t(metadata={"ok": False}), "neither"),
    (t(metadata={"blob": "x" * 2100}), "bytes"),
])
def test_batch_columns_refuse_malformed_transfers(transfer: Transfer, message: str) -> None:
    with pytest.raises(InvalidTransfer, match=message):
        batch_columns([t(), transfer])


def test_a_group_must_be_consecutive() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    batch_columns([t(group=a), t(group=a), t(group=b), t(), t(group=a.__class__(int=a.int + 1))])
    with pytest.raises(InvalidTransfer, match="not consecutive"):
        batch_columns([t(group=a), t(group=b), t(group=a)])
    with pytest.raises(InvalidTransfer, match="not consecutive"):
        batch_columns([t(group=a), t(), t(group=a)])


def test_a_batch_has_a_maximum_length() -> None:
    batch_columns([t()] * batch_transfers_max)
    with pytest.raises(InvalidTransfer, match="over"):
        batch_columns([t()] * (batch_transfers_max + 1))


def test_a_top_up_is_one_linked_group_with_stable_ids() -> None:
    top_up = uuid.uuid4()
    group = top_up_transfers(top_up_id=top_up, accounts=ACCOUNTS, amount_minor=10_000, debt_recovery_minor=2_500,
                             commission_rate_ppm=15_000, currency="KES", metadata={"terminal_id": "T-1"})
    assert [(x.kind, x.debit_account_id, x.credit_account_id, x.amount_minor) for x in group] == [
        (TransferKind.collection, 1, 2, 10_000), (TransferKind.debt_recovery, 2, 3, 2_500),
        (TransferKind.energy_sale, 2, 4, 7_500), (TransferKind.commission, 5, 6, 150)]
    assert {x.group_id for x in group} == {top_up} and all(x.metadata == {"terminal_id": "T-1"} for x in group)
    again = top_up_transfers(top_up_id=top_up, accounts=ACCOUNTS, amount_minor=10_000, debt_recovery_minor=2_500,
                             commission_rate_ppm=15_000, currency="KES", metadata={"terminal_id": "T-1"})
    assert again == group
    batch_columns(group)


def test_a_top_up_omits_zero_legs_and_refuses_bad_amounts() -> None:
    group = top_up_transfers(top_up_id=uuid.uuid4(), accounts=ACCOUNTS, amount_minor=50, debt_recovery_minor=50,
                             commission_rate_ppm=10_000, currency="KES", metadata={})
    assert [x.kind for x in group] == [TransferKind.collection, TransferKind.debt_recovery]
    for amount, debt in ((0, 0), (10, 11), (10, -1)):
        with pytest.raises(InvalidTransfer):
            top_up_transfers(top_up_id=uuid.uuid4(), accounts=ACCOUNTS, amount_minor=amount, debt_recovery_minor=debt,
                             commission_rate_ppm=0, currency="KES", metadata={})


def test_commission_transfer_is_none_when_it_rounds_to_zero() -> None:
    kwargs: dict[str, Any] = {"transfer_id": uuid.uuid4(), "expense_account_id": 5, "payable_account_id": 6,
                              "currency": "KES", "metadata": {"agent_id": "A-1"}}
    assert commission_transfer(collected_minor=99, rate_ppm=10_000, **kwargs) is None
    accrued = commission_transfer(collected_minor=1000, rate_ppm=10_000, **kwargs)
    assert accrued is not None and (accrued.amount_minor, accrued.kind) == (10, TransferKind.commission)


def posted(transfer: Transfer, seq: int) -> PostedTransfer:
    return PostedTransfer(**{name: getattr(transfer, name) for name in transfer.__struct_fields__}, seq=seq,
                          created_at=datetime(2025, 1, 1, tzinfo=UTC), debit_balance_after_minor=0,
                          credit_balance_after_minor=0)


def test_a_reversal_compensates_in_reverse_posting_order() -> None:
    top_up = uuid.uuid4()
    group = top_up_transfers(top_up_id=top_up, accounts=ACCOUNTS, amount_minor=1000, debt_recovery_minor=100,
                             commission_rate_ppm=10_000, currency="KES", metadata={"agent_id": "A-1"})
    originals = [posted(x, seq) for seq, x in enumerate(group, start=10)]
    reversal_group = uuid.uuid4()
    compensations = reversal_transfers(originals[::-1], reversal_group_id=reversal_group, reason="no reply")
    assert [x.id for x in compensations] == [derived_id(o.id, "reversal") for o in originals[::-1]]
    for compensation, original in zip(compensations, originals[::-1], strict=True):
        assert (compensation.debit_account_id, compensation.credit_account_id) == (original.credit_account_id,
                                                                                   original.debit_account_id)
        assert compensation.amount_minor == original.amount_minor and compensation.kind == TransferKind.reversal
        assert compensation.group_id == reversal_group
        assert compensation.metadata == {"agent_id": "A-1", "reverses": str(original.id),
                                         "reversed_kind": original.kind, "reason": "no reply"}
    with pytest.raises(InvalidTransfer, match="reason"):
        reversal_transfers(originals, reversal_group_id=reversal_group, reason="")


def test_business_day_bounds_follow_the_time_zone() -> None:
    start, end = business_day_bounds(date(2025, 3, 10), "Africa/Nairobi")
    assert (start, end) == (datetime(2025, 3, 9, 21, tzinfo=UTC), datetime(2025, 3, 10, 21, tzinfo=UTC))
    start, end = business_day_bounds(date(2024, 3, 31), "Europe/Berlin")  # spring forward: 23 h
    assert end - start == timedelta(hours=23) and start == datetime(2024, 3, 30, 23, tzinfo=UTC)
    start, end = business_day_bounds(date(2024, 10, 27), "Europe/Berlin")  # fall back: 25 h
    assert end - start == timedelta(hours=25)
    for bad in ("Mars/Olympus", "../etc/passwd", ""):
        with pytest.raises(UnknownTimeZone):
            business_day_bounds(date(2025, 1, 1), bad)


@pytest.mark.parametrize(("fields", "message"), [
    ({"currency": "ke"}, "currency"), ({"owner_ref": ""}, "owner_ref"), ({"lower_bound_minor": 1}, "lower_bound"),
    ({"low_threshold_minor": amount_minor_max + 1}, "low_threshold"),
])
def test_an_account_cannot_start_outside_its_bound(fields: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"currency": "KES", "owner_ref": "A-1", "lower_bound_minor": 0,
                              "low_threshold_minor": None} | fields
    with pytest.raises(InvalidAccount, match=message):
        check_account(**values)


def test_posted_statuses() -> None:
    assert {s for s in PostStatus if s.posted} == {PostStatus.ok, PostStatus.exists}


@pytest.mark.parametrize(("debit", "credit"), [(2**63, 1), (1, -(2**63) - 1), (True, 2), (1, 2.0)])
def test_an_account_id_outside_bigint_is_refused_before_any_sql(debit: Any, credit: Any) -> None:
    with pytest.raises(InvalidTransfer, match="integers of PostgreSQL's bigint"):
        batch_columns([Transfer(id=uuid.uuid4(), debit_account_id=debit, credit_account_id=credit, amount_minor=1,
                                currency="KES", kind="collection")])


@pytest.mark.parametrize("metadata", [{"external_ref": "BANK\x00-1"}, {"ref\x00": "x"}])
def test_metadata_holding_a_nul_is_refused_before_any_sql(metadata: dict[str, str]) -> None:
    # jsonb cannot store U+0000: PostgreSQL would refuse the whole batch with an error of its own.
    with pytest.raises(InvalidTransfer, match="NUL"):
        batch_columns([Transfer(id=uuid.uuid4(), debit_account_id=1, credit_account_id=2, amount_minor=1,
                                currency="KES", kind="collection", metadata=metadata)])
