"""Every SQL statement of the registry and vending aggregates, named and parameterised.

A test prepares each constant against the live schema, so a renamed column fails there first.
Ledger statements live in float_ledger/.
"""

import re

# -- registry ------------------------------------------------------------------------------

SYSTEM_ACCOUNT_GET = "SELECT account_id FROM system_accounts WHERE kind = $1 AND currency = $2"
SYSTEM_ACCOUNT_INSERT = """
INSERT INTO system_accounts (kind, currency, account_id) VALUES ($1, $2, $3)
ON CONFLICT (kind, currency) DO NOTHING"""

# The agent's id is taken first: its ledger accounts are owned by it (agent_owner_ref), and two
# agents may share a name.
AGENT_NEXT_ID = "SELECT nextval(pg_get_serial_sequence('agents', 'agent_id'))"
AGENT_INSERT = """
INSERT INTO agents (agent_id, kind, name, contact, currency, float_account_id, commission_account_id,
                    commission_rate_bp, low_float_threshold_minor, time_zone)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"""
AGENT_GET = "SELECT * FROM agents WHERE agent_id = $1"

TERMINAL_INSERT = """
INSERT INTO terminals (terminal_id, serial, model, kind, agent_id, location, key_ciphertext,
                       txn_min_minor, txn_max_minor, daily_limit_minor)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"""
TERMINAL_GET = """
SELECT t.*, a.currency, a.float_account_id, a.commission_account_id, a.commission_rate_bp,
       a.low_float_threshold_minor, a.time_zone
FROM terminals t JOIN agents a USING (agent_id)
WHERE t.terminal_id = $1"""
TERMINAL_STATUS_FOR_UPDATE = "SELECT status FROM terminals WHERE terminal_id = $1 FOR UPDATE"
TERMINAL_SET_STATUS = "UPDATE terminals SET status = $2 WHERE terminal_id = $1"
TERMINAL_STATUSES = "SELECT terminal_id, status, allowed_operations FROM terminals WHERE terminal_id = ANY($1::text[])"

TARIFF_INSERT = """
INSERT INTO tariffs (tariff_code, valid_from, currency, energy_price_minor_per_mwh, energy_vat_rate_bp,
                     fee_per_purchase_minor, fee_vat_rate_bp)
VALUES ($1, $2, $3, $4, $5, $6, $7)"""

VENDING_KEY_UPSERT = """
INSERT INTO vending_keys (supply_group_code, key_revision, key_type, key_ciphertext) VALUES ($1, $2, $3, $4)
ON CONFLICT (supply_group_code, key_revision) DO UPDATE SET key_type = EXCLUDED.key_type,
    key_ciphertext = EXCLUDED.key_ciphertext"""
VENDING_KEY_GET = "SELECT * FROM vending_keys WHERE supply_group_code = $1 AND key_revision = $2"

CUSTOMER_INSERT = """
INSERT INTO customers (account_number, name, address, phone, credit_account_id, debt_account_id,
                       debt_recovery_share_bp)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING customer_id"""
# The currencies a tariff code has been priced in (NULL: no such tariff), and the customer's
# accounts' (NULL: no such customer).
TARIFF_CURRENCIES = "SELECT array_agg(DISTINCT currency ORDER BY currency) FROM tariffs WHERE tariff_code = $1"
CUSTOMER_CURRENCY = """
SELECT a.currency FROM customers c JOIN ledger_accounts a ON a.id = c.credit_account_id WHERE c.customer_id = $1"""
METER_INSERT = """
INSERT INTO meters (meter_number, customer_id, supply_mode, tariff_code, sts_supply_group_code,
                    sts_tariff_index, sts_key_revision, sts_base_year)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"""

STS_METER_BY_PAN = """
SELECT meter_number FROM meters
WHERE supply_mode = 'sts' AND vendgate_sts_pan(meter_number) = vendgate_sts_pan($1)"""

# Meter context for vending: customer, accounts and the tariff in force at $2.
# Each lookup is a LATERAL subquery with LIMIT 1 (every one is by a unique key, so the LIMIT
# changes no result): the planner cannot pull such a subquery up into a join, so it runs as an
# index lookup per meter in every plan, custom or generic, whatever the tables' statistics said
# when the plan was made (see VEND_BATCH_READ).
METERS_FOR_VEND = """
SELECT m.meter_number, m.supply_mode, m.tariff_code, m.supply_state, m.sts_supply_group_code,
       m.sts_tariff_index, m.sts_key_revision, m.sts_base_year, m.last_token_id, m.last_token_base_year,
       m.last_purchase_at, m.last_purchase_minor,
       c.customer_id, c.account_number, c.name, c.address, c.credit_account_id, c.debt_account_id,
       c.debt_recovery_share_bp,
       t.valid_from AS tariff_valid_from, t.currency AS tariff_currency, t.energy_price_minor_per_mwh,
       t.energy_vat_rate_bp, t.fee_per_purchase_minor, t.fee_vat_rate_bp,
       v.key_type AS vending_key_type, v.key_ciphertext AS vending_key_ciphertext,
       debt.balance_minor AS debt_balance_minor
FROM meters m
CROSS JOIN LATERAL (SELECT * FROM customers c WHERE c.customer_id = m.customer_id LIMIT 1) c
CROSS JOIN LATERAL (SELECT d.balance_minor FROM ledger_accounts d WHERE d.id = c.debt_account_id LIMIT 1) debt
LEFT JOIN LATERAL (
    SELECT v.key_type, v.key_ciphertext FROM vending_keys v
    WHERE v.supply_group_code = m.sts_supply_group_code AND v.key_revision = m.sts_key_revision LIMIT 1
) v ON true
LEFT JOIN LATERAL (
    SELECT * FROM tariffs t WHERE t.tariff_code = m.tariff_code AND t.valid_from <= $2
    ORDER BY t.valid_from DESC LIMIT 1
) t ON true
WHERE m.meter_number = ANY($1::text[])"""
METER_BY_ACCOUNT = "SELECT meter_number FROM meters m JOIN customers c USING (customer_id) WHERE c.account_number = $1"

# -- vending -------------------------------------------------------------------------------

# A stored payment's float remaining, for its replay: the balance after its collection transfer
# (immutable, on the float's hash chain); NULL for a record without one (its seal holds what it said).
_FLOAT_REMAINING = """(SELECT lt.debit_balance_after_minor FROM ledger_transfers lt
        WHERE lt.group_id = v.group_id AND lt.kind = 'collection') AS float_remaining_minor"""

# What a batch must know of its ids, in one round trip: the stored record of each known id, and
# whether a reversal (or a reversal's tombstone) names it. One row per id that has either.
TXNS_AND_REVERSALS_GET_MANY = f"""
SELECT k.id AS client_txn_id, v.client_txn_id IS NOT NULL AS stored, v.request_sha256, v.response_code, v.reply,
       {_FLOAT_REMAINING},
       r.original_txn_id IS NOT NULL AS reversed
FROM (SELECT DISTINCT id FROM unnest($1::text[]) AS id) AS k
LEFT JOIN LATERAL (SELECT * FROM vend_transactions v WHERE v.client_txn_id = k.id LIMIT 1) v ON true
LEFT JOIN LATERAL (SELECT r.original_txn_id FROM reversals r WHERE r.original_txn_id = k.id LIMIT 1) r ON true
WHERE v.client_txn_id IS NOT NULL OR r.original_txn_id IS NOT NULL"""
TXN_INSERT_MANY = """
INSERT INTO vend_transactions (client_txn_id, kind, terminal_id, agent_id, request_sha256, response_code,
                               meter_number, amount_minor, currency, group_id, receipt_number,
                               business_date, reply)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bytea[], $6::int[], $7::text[],
                     $8::bigint[], $9::text[], $10::uuid[], $11::bigint[], $12::date[], $13::bytea[])"""
TXN_GET_BY_RECEIPT = f"""
SELECT v.client_txn_id, v.terminal_id, v.receipt_number, v.reply,
       {_FLOAT_REMAINING}
FROM receipts r JOIN vend_transactions v USING (client_txn_id)
WHERE r.terminal_id = $1 AND r.receipt_number = $2"""
TOKEN_VOID = "UPDATE tokens SET status = 'voided' WHERE client_txn_id = $1"
REVERSALS_GET_MANY = "SELECT * FROM reversals WHERE original_txn_id = ANY($1::text[])"
REVERSAL_INSERT = """
INSERT INTO reversals (original_txn_id, reversal_txn_id, terminal_id, reason, original_found)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (original_txn_id) DO NOTHING
RETURNING reversal_txn_id"""
OUTBOX_INSERT_MANY = """
INSERT INTO outbox (kind, client_txn_id, meter_number, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])"""
# Up to $1 waiting events that are due and not parked ($2 attempts), that no other relay holds:
# never turned down first, oldest first, then those due longest ago; a reversal's only once its
# payment's event is delivered, so it never overtakes it (refused, parked or being sent by another
# relay). Each one returned is held by this session's advisory lock until the round ends
# (OUTBOX_RELEASE): no transaction stays open while the engine is called. outbox_take (0031)
# walks the events in that order and tries each lock in its loop, so only the events it walks are
# tried, whatever the plan, and the events another relay holds are passed over. Only a reversal
# looks back, over the undelivered events before it (outbox_pending): the payment path writes no
# index for it. Sent oldest first.
OUTBOX_PENDING = """
SELECT event_id, kind, client_txn_id, meter_number, payload FROM outbox_take($1, $2)
ORDER BY event_id"""
OUTBOX_RELEASE = "SELECT pg_advisory_unlock_all()"
OUTBOX_MARK_DELIVERED = "UPDATE outbox SET delivered_at = now() WHERE event_id = ANY($1::bigint[])"
OUTBOX_MARK_ATTEMPT = "UPDATE outbox SET attempts = attempts + 1 WHERE event_id = ANY($1::bigint[])"
# Events the engine turned down (refused or failed, counted or not) wait before they are taken
# again: $2 seconds after the first turn-down, twice as long after each next one, $3 at most.
OUTBOX_MARK_TURNED_DOWN = """
UPDATE outbox SET turned_down_at = now(), turned_down_count = turned_down_count + 1,
       retry_at = now() + interval '1 second'
                          * least($3::float8, $2::float8 * power(2::float8, least(turned_down_count, 16)))
WHERE event_id = ANY($1::bigint[])"""

# (Run on the committer's connections too, for reversals: keyed lookups, as in METERS_FOR_VEND.)
TERMINALS_FOR_VEND = """
SELECT t.terminal_id, t.status, t.allowed_operations, t.txn_min_minor, t.txn_max_minor, t.daily_limit_minor,
       t.agent_id, a.currency, a.float_account_id, a.commission_account_id, a.commission_rate_bp, a.time_zone
FROM terminals t
CROSS JOIN LATERAL (SELECT * FROM agents a WHERE a.agent_id = t.agent_id LIMIT 1) a
WHERE t.terminal_id = ANY($1::text[])"""
# The same, with each terminal's last receipt number (the batch numbers its receipts from there;
# vend_commit_topups moves the counter) and what it approved on the days around $2: its agent's
# business day at $2 is one of the UTC date's day before, day or day after (offsets lie within
# -12 and +14 hours). Which one is worked out in Python (vending.business_date), the one source of
# business days: PostgreSQL's time zone data may be another version than Python's, and it reads
# some names (CET, EET, MET, WET) as fixed abbreviations.
TERMINALS_FOR_VEND_WITH_TOTALS = """
SELECT t.terminal_id, t.status, t.allowed_operations, t.txn_min_minor, t.txn_max_minor, t.daily_limit_minor,
       t.agent_id, a.currency, a.float_account_id, a.commission_account_id, a.commission_rate_bp, a.time_zone,
       t.receipt_seq, ($2::timestamptz AT TIME ZONE 'UTC')::date AS utc_date,
       d.approved_day_before_minor, d.approved_utc_day_minor, d.approved_day_after_minor
FROM terminals t
CROSS JOIN LATERAL (SELECT * FROM agents a WHERE a.agent_id = t.agent_id LIMIT 1) a
CROSS JOIN LATERAL (
    SELECT coalesce(max(d.approved_minor) FILTER (WHERE d.business_date < u.day), 0) AS approved_day_before_minor,
           coalesce(max(d.approved_minor) FILTER (WHERE d.business_date = u.day), 0) AS approved_utc_day_minor,
           coalesce(max(d.approved_minor) FILTER (WHERE d.business_date > u.day), 0) AS approved_day_after_minor
    FROM (SELECT ($2::timestamptz AT TIME ZONE 'UTC')::date AS day) u
    JOIN terminal_daily_totals d
      ON d.terminal_id = t.terminal_id AND d.business_date BETWEEN u.day - 1 AND u.day + 1
) d
WHERE t.terminal_id = ANY($1::text[])"""

ACCOUNT_BALANCES = "SELECT id AS account_id, balance_minor FROM ledger_accounts WHERE id = ANY($1::bigint[])"
TXN_GET = f"""
SELECT client_txn_id, kind, terminal_id, request_sha256, response_code, group_id, receipt_number, reply,
       {_FLOAT_REMAINING},
       meter_number, amount_minor, currency, created_at, reprints
FROM vend_transactions v WHERE client_txn_id = $1"""
TXN_COUNT_REPRINT = "UPDATE vend_transactions SET reprints = reprints + 1 WHERE client_txn_id = $1"
TXN_IS_REVERSED = "SELECT original_found FROM reversals WHERE original_txn_id = $1"

# Transaction-scoped advisory locks on client transaction ids, taken in one sorted order.
LOCK_TXN_IDS = """
SELECT pg_advisory_xact_lock(h) FROM (
    SELECT DISTINCT hashtextextended(id, 7) AS h FROM unnest($1::text[]) AS id ORDER BY 1) AS keys"""

def _renumber(statement: str, numbers: dict[int, int]) -> str:
    return re.sub(r"\$(\d+)", lambda m: f"${numbers[int(m.group(1))]}", statement)


# Everything a batch of top-ups reads, in one round trip: the stored records and reversals of its
# ids ($1), its terminals ($2) and its meters ($3) at $4, as three arrays of anonymous records.
# Each record holds the columns of the statement it wraps, in that statement's order.
# The committer runs it with one generic plan per connection (planning it cost three times what
# running it did for a small batch), so every table it reads is reached by key in any plan: each
# table is driven by = ANY of the batch's keys or looked up in a LATERAL ... LIMIT 1 subquery.
VEND_BATCH_READ = f"""
SELECT ARRAY(SELECT ROW(q.*) FROM ({TXNS_AND_REVERSALS_GET_MANY}) AS q) AS known,
       ARRAY(SELECT ROW(q.*) FROM ({_renumber(TERMINALS_FOR_VEND_WITH_TOTALS, {1: 2, 2: 4})}) AS q) AS terminals,
       ARRAY(SELECT ROW(q.*) FROM ({_renumber(METERS_FOR_VEND, {1: 3, 2: 4})}) AS q) AS meters"""

# A batch of top-ups, committed in one statement (gateway/migrations/0015_vend_commit_lean.sql,
# 0019_debt_recovery_bounded.sql): the batch's locks, the reversal check, the ledger groups and
# every row the batch records. Outside a transaction block it is a transaction of its own. Raises,
# writing nothing, V0001 (ledger refusal; DETAIL: each transfer not posted, position:status),
# V0002 (a reversal arrived since the batch's reads) or V0003 (a debt it recovers was paid down
# since the batch's reads).
VEND_COMMIT_TOPUPS = (
    "SELECT o_statuses, o_debit_afters FROM vend_commit_topups("
    + ", ".join(f"${n}" for n in range(1, 52)) + ")")
STATE_LEDGER_REFUSED = "V0001"
STATE_REVERSAL_ARRIVED = "V0002"
STATE_DEBT_PAID_DOWN = "V0003"
