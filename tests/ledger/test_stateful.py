"""A hypothesis state machine drives the ledger and an in-memory model side by side.

Rules: deposits, batches of linked top-ups, reversals, replays of earlier batches (same and other
content), blocking. After every step each status the ledger returned equals the model's and every
balance equals the model's. The model is written from the rules, not from the implementation.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from float_ledger.deposits import request_deposit
from float_ledger.ledger import apply_transfers, create_account, post_transfers, reverse_group, set_account_blocked
from float_ledger.model import (
    AccountKind,
    PostStatus,
    TopUpAccounts,
    Transfer,
    TransferKind,
    derived_id,
    reversal_group_id_for,
    top_up_transfers,
)

S = PostStatus
T = TypeVar("T")
CURRENCY = "KES"
AGENTS = 2
CUSTOMERS = 3


@dataclass
class Model:
    balances: dict[int, int] = field(default_factory=dict)
    bounds: dict[int, int | None] = field(default_factory=dict)
    blocked: set[int] = field(default_factory=set)
    posted: dict[uuid.UUID, Transfer] = field(default_factory=dict)

    def apply(self, batch: Sequence[Transfer]) -> list[PostStatus]:
        statuses: list[PostStatus] = []
        index = 0
        while index < len(batch):
            end = index + 1
            group = batch[index].group_id
            while group is not None and end < len(batch) and batch[end].group_id == group:
                end += 1
            statuses.extend(self._apply_linked(batch[index:end]))
            index = end
        return statuses

    def _apply_linked(self, linked: Sequence[Transfer]) -> list[PostStatus]:
        saved = dict(self.balances)
        new_ids: list[uuid.UUID] = []
        statuses: list[PostStatus] = []
        # A group posted before this call takes no new transfer: the group exists, with other content.
        posted_groups = {t.group_id for t in self.posted.values() if t.group_id is not None}
        for t in linked:
            if statuses and statuses[-1] not in (S.ok, S.exists):
                statuses.append(S.linked_failed)
                continue
            if t.id in self.posted:
                statuses.append(S.exists if self.posted[t.id] == t else S.exists_with_different_content)
            elif t.group_id in posted_groups:
                statuses.append(S.exists_with_different_content)
            elif t.debit_account_id not in self.balances or t.credit_account_id not in self.balances:
                statuses.append(S.account_missing)
            elif t.kind != TransferKind.reversal and {t.debit_account_id, t.credit_account_id} & self.blocked:
                statuses.append(S.account_blocked)
            elif (bound := self.bounds[t.debit_account_id]) is not None and \
                    self.balances[t.debit_account_id] - t.amount_minor < bound:
                statuses.append(S.insufficient_balance)
            else:
                self.balances[t.debit_account_id] -= t.amount_minor
                self.balances[t.credit_account_id] += t.amount_minor
                self.posted[t.id] = t
                new_ids.append(t.id)
                statuses.append(S.ok)
        if any(s not in (S.ok, S.exists) for s in statuses):
            self.balances = saved
            for transfer_id in new_ids:
                del self.posted[transfer_id]
            # Posted here and now undone, including in-group replays of them.
            return [S.linked_failed if s in (S.ok, S.exists) and t.id in new_ids else s
                    for s, t in zip(statuses, linked, strict=True)]
        return statuses


async def test_the_ledger_matches_an_in_memory_model(db_pool: Any) -> None:
    loop = asyncio.get_running_loop()

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    async def acquire() -> Any:
        return await db_pool.acquire()

    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model = Model()
            self.conn = run(acquire())
            self.source = self._account(AccountKind.float_deposits, None)
            collections = self._account(AccountKind.utility_collections, None)
            expense = self._account(AccountKind.commission_expense, None)
            self.floats = [self._account(AccountKind.agent_float, 0) for _ in range(AGENTS)]
            payables = [self._account(AccountKind.commission_payable, 0) for _ in range(AGENTS)]
            customers = [(self._account(AccountKind.customer_credit, 0), self._account(AccountKind.customer_debt, None))
                         for _ in range(CUSTOMERS)]
            self.routes = [[TopUpAccounts(float_account_id=self.floats[a], customer_credit_account_id=credit,
                                          customer_debt_account_id=debt, collections_account_id=collections,
                                          commission_expense_account_id=expense,
                                          commission_payable_account_id=payables[a])
                            for credit, debt in customers] for a in range(AGENTS)]
            self.batches: list[list[Transfer]] = []
            self.groups: list[uuid.UUID] = []
            # Funded floats let the first top-ups post, so later rules find posted groups.
            self.post([Transfer(id=uuid.uuid4(), debit_account_id=self.source, credit_account_id=float_id,
                                amount_minor=5_000, currency=CURRENCY, kind=TransferKind.deposit)
                       for float_id in self.floats])

        def _account(self, kind: AccountKind, bound: int | None) -> int:
            account_id = run(create_account(self.conn, kind=kind, currency=CURRENCY, owner_ref=f"{kind}-{uuid.uuid4()}",
                                            lower_bound_minor=bound))
            self.model.balances[account_id] = 0
            self.model.bounds[account_id] = bound
            return account_id

        def teardown(self) -> None:
            run(db_pool.release(self.conn))

        def post(self, batch: list[Transfer], *, in_callers_transaction: bool = False) -> None:
            expected = self.model.apply(batch)
            if in_callers_transaction:
                async def inside() -> list[Any]:
                    async with self.conn.transaction():
                        return await apply_transfers(self.conn, batch)
                results = run(inside())
            else:
                results = run(post_transfers(self.conn, batch))
            assert [r.status for r in results] == expected, (batch, results)
            for transfer, result in zip(batch, results, strict=True):
                assert result.id == transfer.id
                assert (result.transfer is not None) == result.status.posted
            self.batches.append(batch)

        @rule(agent=st.integers(0, AGENTS - 1), amount=st.integers(1, 5_000), via_deposit=st.booleans())
        def deposit(self, agent: int, amount: int, via_deposit: bool) -> None:
            if via_deposit:
                expected = self.model.apply([Transfer(
                    id=(deposit_id := uuid.uuid4()), debit_account_id=self.source,
                    credit_account_id=self.floats[agent], amount_minor=amount, currency=CURRENCY,
                    kind=TransferKind.deposit, metadata={"external_ref": str(deposit_id), "maker": "alice"})])
                result = run(request_deposit(
                    self.conn, deposit_id=deposit_id, float_account_id=self.floats[agent],
                    source_account_id=self.source, amount_minor=amount, currency=CURRENCY,
                    external_ref=str(deposit_id), maker="alice", approval_threshold_minor=10**9))
                assert result.post is not None and [result.post.status] == expected
            else:
                self.post([Transfer(id=uuid.uuid4(), debit_account_id=self.source,
                                    credit_account_id=self.floats[agent], amount_minor=amount, currency=CURRENCY,
                                    kind=TransferKind.deposit)])

        @rule(top_ups=st.lists(st.tuples(st.integers(0, AGENTS - 1), st.integers(0, CUSTOMERS - 1),
                                         st.integers(1, 3_000), st.integers(0, 100), st.integers(0, 50_000)),
                               min_size=1, max_size=5),
              in_callers_transaction=st.booleans())
        def top_up(self, top_ups: list[tuple[int, int, int, int, int]], in_callers_transaction: bool) -> None:
            batch: list[Transfer] = []
            for agent, customer, amount, debt_percent, rate_ppm in top_ups:
                group = uuid.uuid4()
                self.groups.append(group)
                batch.extend(top_up_transfers(
                    top_up_id=group, accounts=self.routes[agent][customer], amount_minor=amount,
                    debt_recovery_minor=amount * debt_percent // 100, commission_rate_ppm=rate_ppm,
                    currency=CURRENCY, metadata={"agent_id": agent, "terminal_id": f"T-{customer}"}))
            self.post(batch, in_callers_transaction=in_callers_transaction)

        @precondition(lambda self: self.groups)
        @rule(data=st.data(), reason=st.sampled_from(["no reply", "disputed"]))
        def reverse(self, data: st.DataObject, reason: str) -> None:
            group = data.draw(st.sampled_from(self.groups))
            # The model keeps posted transfers in posting order.
            originals = [t for t in self.model.posted.values() if t.group_id == group]
            compensations = [
                Transfer(id=derived_id(t.id, "reversal"), debit_account_id=t.credit_account_id,
                         credit_account_id=t.debit_account_id, amount_minor=t.amount_minor, currency=t.currency,
                         kind=TransferKind.reversal, group_id=reversal_group_id_for(group),
                         metadata={**t.metadata, "reverses": str(t.id), "reversed_kind": t.kind, "reason": reason})
                for t in reversed(originals)]
            expected = self.model.apply(compensations)

            async def inside() -> list[Any]:
                async with self.conn.transaction():
                    return await reverse_group(self.conn, group, reason=reason)
            results = run(inside())
            assert [r.status for r in results] == expected
            assert [r.id for r in results] == [t.id for t in compensations]

        @precondition(lambda self: self.batches)
        @rule(data=st.data())
        def replay(self, data: st.DataObject) -> None:
            self.post(data.draw(st.sampled_from(self.batches)))

        @precondition(lambda self: self.model.posted)
        @rule(data=st.data(), extra=st.integers(1, 10))
        def replay_with_other_content(self, data: st.DataObject, extra: int) -> None:
            original = data.draw(st.sampled_from(sorted(self.model.posted.values(), key=lambda t: str(t.id))))
            changed = msgspec.structs.replace(original, amount_minor=original.amount_minor + extra)
            self.post([changed])

        @precondition(lambda self: self.groups)
        @rule(data=st.data(), agent=st.integers(0, AGENTS - 1), amount=st.integers(1, 500))
        def join_a_posted_group(self, data: st.DataObject, agent: int, amount: int) -> None:
            # A new transfer under a top-up's group id (posted, refused or reversed by now).
            group = data.draw(st.sampled_from(self.groups))
            self.post([Transfer(id=uuid.uuid4(), debit_account_id=self.source, credit_account_id=self.floats[agent],
                                amount_minor=amount, currency=CURRENCY, kind=TransferKind.deposit, group_id=group)])

        @rule(agent=st.integers(0, AGENTS - 1), blocked=st.booleans())
        def block(self, agent: int, blocked: bool) -> None:
            run(set_account_blocked(self.conn, self.floats[agent], blocked=blocked))
            if blocked:
                self.model.blocked.add(self.floats[agent])
            else:
                self.model.blocked.discard(self.floats[agent])

        @invariant()
        def balances_match(self) -> None:
            ids = list(self.model.balances)
            rows = run(self.conn.fetch("SELECT id, balance_minor FROM ledger_accounts WHERE id = ANY($1::bigint[])",
                                       ids))
            assert {r["id"]: r["balance_minor"] for r in rows} == self.model.balances
            assert sum(self.model.balances.values()) == 0

    await asyncio.to_thread(
        run_state_machine_as_test, LedgerMachine,
        settings=settings(max_examples=60, stateful_step_count=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]))
    async with db_pool.acquire() as conn:
        assert await conn.fetchval("SELECT sum(balance_minor) FROM ledger_accounts") == 0
