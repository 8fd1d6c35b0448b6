"""Demo and benchmark data: agents with funded floats, terminals, customers, meters, a tariff.

Deterministic for a given count (terminal ids T0000001.., meters 10000000001..), so simulators
and benchmarks can address what was seeded; terminal keys are derived from a seed secret that
stays in the data folder (demo) or is passed in (benchmarks), never printed.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec

from float_ledger.ledger import apply_transfers
from float_ledger.model import AccountKind, Transfer
from gateway import registry
from gateway.keystore import KeyStore
from protocol import sts

DEMO_CURRENCY = "EUR"
DEMO_TARIFF = "RES1"
DEMO_SUPPLY_GROUP = "123456"
DEMO_VENDING_KEY = bytes.fromhex("0123456789ABCDEF")  # demo only; production keys come from the KMC


class SeedSummary(msgspec.Struct, frozen=True, kw_only=True):
    agents: int
    terminals: int
    meters: int
    float_each_minor: int
    currency: str
    first_terminal: int = 1  # the n of terminal_id(n) and meter_number(n) of the first one made
    first_meter: int = 1
    sts_every: int = 3

    def ranges(self) -> list[str]:
        """What a tester types into a terminal: the ids and numbers made, first to last."""
        last_terminal, last_meter = self.first_terminal + self.terminals - 1, self.first_meter + self.meters - 1
        sts = [n for n in range(self.first_meter, last_meter + 1) if n % self.sts_every == 0]
        return [
            f"terminals {terminal_id(self.first_terminal)}..{terminal_id(last_terminal)}",
            f"meters {meter_number(self.first_meter)}..{meter_number(last_meter)} (a Luhn check digit "
            f"ends each), accounts AC{self.first_meter:08d}..AC{last_meter:08d}",
            f"STS token meters: one in {self.sts_every}"
            + (f", the first {meter_number(sts[0])}" if sts else ", none among these"),
            "terminal keys: derived from the seed secret, never printed (`vendgate terminal add` makes a "
            "terminal and prints its key once)",
        ]


# terminal_id() has 7 digits and meter_number() 10 before its check digit.
agents_max = 100_000
terminals_max = 1_000_000
meters_max = 1_000_000


def terminal_id(n: int) -> str:
    return f"T{n:07d}"


def meter_number(n: int) -> str:
    """An 11-digit meter number whose last digit is its Luhn check digit (as STS meters carry)."""
    base = f"{1_000_000_000 + n}"
    return base + str(sts.luhn_check_digit(base))


def derive_terminal_key(seed_secret: bytes, tid: str) -> bytes:
    return hmac.new(seed_secret, f"terminal-key:{tid}".encode(), hashlib.sha256).digest()[:16]


async def seed(conn: asyncpg.Connection, keystore: KeyStore, *, agents: int, terminals: int, meters: int,
               seed_secret: bytes, float_each_minor: int = 10_000_000, sts_every: int = 3) -> SeedSummary:
    """Create the data set; terminals are spread round-robin over agents; every sts_every-th meter is STS."""
    assert 1 <= agents <= agents_max and 1 <= terminals <= terminals_max and 1 <= meters <= meters_max
    async with conn.transaction():  # a seed that fails half-way leaves nothing behind
        system = await registry.ensure_system_accounts(conn, DEMO_CURRENCY)
        if await conn.fetchval("SELECT count(*) FROM tariffs WHERE tariff_code = $1", DEMO_TARIFF) == 0:
            await registry.add_tariff(conn, tariff_code=DEMO_TARIFF, valid_from=datetime(2020, 1, 1, tzinfo=UTC),
                                      currency=DEMO_CURRENCY, energy_price_minor_per_mwh=25_000,
                                      energy_vat_rate_bp=2_000, fee_per_purchase_minor=10, fee_vat_rate_bp=2_000)
        await registry.set_vending_key(conn, keystore, supply_group_code=DEMO_SUPPLY_GROUP, key_revision=1,
                                       key_type=2, vending_key=DEMO_VENDING_KEY)
        agent_rows = []
        kinds = ("shop", "property_manager", "village", "mobile_hall", "staff")
        for n in range(1, agents + 1):
            agent = await registry.add_agent(conn, kind=kinds[n % len(kinds)], name=f"Agent {n}",  # type: ignore[arg-type]
                                             currency=DEMO_CURRENCY, commission_rate_bp=100,
                                             low_float_threshold_minor=float_each_minor // 10)
            agent_rows.append(agent)
        deposits = [
            Transfer(id=uuid.uuid5(uuid.NAMESPACE_URL, f"vendgate-seed-deposit/{a.agent_id}"),
                     debit_account_id=system[AccountKind.float_deposits], credit_account_id=a.float_account_id,
                     amount_minor=float_each_minor, currency=DEMO_CURRENCY, kind="deposit",
                     metadata={"agent_id": a.agent_id, "reference": "seed"})
            for a in agent_rows
        ]
        for start in range(0, len(deposits), 500):
            await apply_transfers(conn, deposits[start:start + 500])
        first_terminal = int(await conn.fetchval("SELECT count(*) FROM terminals")) + 1
        for n in range(first_terminal, first_terminal + terminals):
            tid = terminal_id(n)
            sealed = keystore.seal(derive_terminal_key(seed_secret, tid), registry.terminal_key_record(tid, 1))
            await conn.execute(
                "INSERT INTO terminals (terminal_id, serial, model, kind, agent_id, location, key_ciphertext)"
                " VALUES ($1, $2, 'SIM-1', 'pos', $3, 'simulated', $4)",
                tid, f"SN{n:09d}", agent_rows[(n - 1) % len(agent_rows)].agent_id, sealed)
        first_meter = int(await conn.fetchval("SELECT count(*) FROM meters")) + 1
        for n in range(first_meter, first_meter + meters):
            number = meter_number(n)
            customer_id = await registry.add_customer(conn, account_number=f"AC{n:08d}", name=f"Customer {n}",
                                                      currency=DEMO_CURRENCY, address=f"{n} Grid Street",
                                                      debt_recovery_share_bp=2_500 if n % 4 == 0 else 0)
            sts_meter = n % sts_every == 0
            await registry.add_meter(conn, meter_number=number, customer_id=customer_id,
                                     supply_mode="sts" if sts_meter else "smart", tariff_code=DEMO_TARIFF,
                                     sts_supply_group_code=DEMO_SUPPLY_GROUP if sts_meter else None,
                                     sts_tariff_index="01" if sts_meter else None,
                                     sts_key_revision=1 if sts_meter else None,
                                     sts_base_year=2014 if sts_meter else None)
        return SeedSummary(agents=agents, terminals=terminals, meters=meters, float_each_minor=float_each_minor,
                           currency=DEMO_CURRENCY, first_terminal=first_terminal, first_meter=first_meter,
                           sts_every=sts_every)
