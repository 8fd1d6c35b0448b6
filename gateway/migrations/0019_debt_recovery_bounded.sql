-- A payment's debt recovery never takes the customer's debt account above zero.
--
-- The gateway sizes each recovery from the debt it read before the commit. Another gateway (or
-- anything else that pays a debt down) may commit in between; the recovery would then exceed what
-- is still owed and the debt account would end above zero. vend_commit_topups() (0015) now checks
-- each debt recovery it posts and, should one leave its account above zero, raises
--   V0003 a debt the batch recovers was paid down since it was read. The caller reads again and
--         decides again (as for V0002), writing nothing.
-- Its arguments and everything else it does are unchanged.
CREATE OR REPLACE FUNCTION vend_commit_topups(
    -- the ledger groups, as for ledger_apply_transfers, but metadata per group
    p_ids uuid[], p_debit bigint[], p_credit bigint[], p_amount bigint[], p_currency text[],
    p_kind text[], p_group uuid[], p_group_metadata jsonb[], p_metadata_of integer[],
    -- vend_transactions rows: every id the batch records anew (locked)
    p_txn_id text[], p_txn_kind text[], p_txn_terminal text[], p_txn_agent bigint[], p_txn_sha256 bytea[],
    p_txn_code integer[], p_txn_meter text[], p_txn_amount bigint[], p_txn_currency text[], p_txn_group uuid[],
    p_txn_receipt bigint[], p_txn_date date[], p_txn_reply bytea[],
    -- of those, the ones the batch's read found a reversal for (declined: not checked again)
    p_reversed_ids text[],
    -- receipts (issued at p_now)
    p_rc_terminal text[], p_rc_number bigint[], p_rc_txn text[], p_rc_tariff text[], p_rc_tariff_from timestamptz[],
    -- tokens (issued at p_now)
    p_tk_txn text[], p_tk_meter text[], p_tk_tid bigint[], p_tk_class integer[], p_tk_subclass integer[],
    p_tk_units bigint[], p_tk_ciphertext bytea[], p_tk_last4 text[],
    -- outbox events
    p_ev_kind text[], p_ev_txn text[], p_ev_meter text[], p_ev_payload jsonb[],
    -- daily totals per terminal
    p_dt_terminal text[], p_dt_date date[], p_dt_count bigint[], p_dt_amount bigint[],
    -- meters touched: last purchase amount (NULL: none), last TID and its base year (NULL: none)
    p_mt_number text[], p_mt_amount bigint[], p_mt_tid bigint[], p_mt_base_year integer[],
    p_now timestamptz,
    -- receipts issued per terminal: its counter moves by that many
    p_ct_terminal text[], p_ct_count bigint[],
    OUT o_statuses text[], OUT o_debit_afters bigint[]
)
LANGUAGE plpgsql
-- Every row it touches is reached by key; a cached plan from when the tables were small must not
-- scan them once they are large.
SET enable_seqscan = off
AS $$
DECLARE
    refused text;  -- the transfers not posted, position:status
    leg_metadata jsonb[];  -- each transfer's, from its group's
    credit_afters bigint[];  -- each transfer's credit account balance after it
BEGIN
    -- Serialises each id against a reversal of it in another transaction (tombstone race). Each
    -- statement below takes a fresh snapshot, so it sees what such a reversal committed.
    PERFORM pg_advisory_xact_lock(k.h)
       FROM (SELECT DISTINCT hashtextextended(id, 7) AS h FROM unnest(p_txn_id) AS id ORDER BY 1) AS k;
    IF EXISTS (SELECT 1 FROM reversals r
                WHERE r.original_txn_id = ANY (p_txn_id) AND r.original_txn_id <> ALL (p_reversed_ids)) THEN
        RAISE EXCEPTION USING ERRCODE = 'V0002',
              MESSAGE = 'a reversal names a payment of the batch: read and decide the batch again';
    END IF;

    IF coalesce(cardinality(p_ids), 0) > 0 THEN
        -- Each transfer's metadata, copied from its group's (parsed once per group, not per leg).
        SELECT array_agg(p_group_metadata[m.of] ORDER BY m.pos) INTO leg_metadata
          FROM unnest(p_metadata_of) WITH ORDINALITY AS m(of, pos);
        SELECT o.statuses, o.debit_afters, o.credit_afters INTO o_statuses, o_debit_afters, credit_afters
          FROM ledger_apply_transfers(p_ids, p_debit, p_credit, p_amount, p_currency, p_kind, p_group,
                                      leg_metadata) AS o;
        SELECT string_agg(s.i || ':' || coalesce(s.status, 'null'), ',' ORDER BY s.i) INTO refused
          FROM unnest(o_statuses) WITH ORDINALITY AS s(status, i)
         WHERE s.status IS DISTINCT FROM 'ok' AND s.status IS DISTINCT FROM 'exists';
        IF refused IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'V0001', MESSAGE = 'the ledger refused payments of the batch',
                  DETAIL = refused;
        END IF;
        -- A recovery sized from a debt read before another transaction paid it down would take
        -- the debt account above zero: the customer would pay a debt they no longer owe.
        IF EXISTS (SELECT 1 FROM unnest(p_kind, o_statuses, credit_afters) AS t(kind, status, credit_after)
                    WHERE t.kind = 'debt_recovery' AND t.status = 'ok' AND t.credit_after > 0) THEN
            RAISE EXCEPTION USING ERRCODE = 'V0003',
                  MESSAGE = 'a debt the batch recovers was paid down since it was read: read and decide the batch again';
        END IF;
    END IF;

    -- Receipt numbers were taken from the counter as the batch read it: should another
    -- transaction have moved it since, the same numbers exist already and receipts' primary key
    -- refuses the batch, which the caller decides again (numbers stay gap-free either way). A
    -- meter keeps the highest TID issued to it on its base date: a batch that read the meter
    -- before another transaction issued a later TID must not move the meter's last TID back.
    WITH counters AS (
        UPDATE terminals t SET receipt_seq = t.receipt_seq + k.n
          FROM unnest(p_ct_terminal, p_ct_count) AS k(terminal_id, n)
         -- = ANY: reached by primary key whatever plan is cached (never a walk of every terminal)
         WHERE t.terminal_id = k.terminal_id AND t.terminal_id = ANY (p_ct_terminal)
    ), txns AS (
        INSERT INTO vend_transactions (client_txn_id, kind, terminal_id, agent_id, request_sha256, response_code,
                                       meter_number, amount_minor, currency, group_id, receipt_number,
                                       business_date, reply)
        SELECT * FROM unnest(p_txn_id, p_txn_kind, p_txn_terminal, p_txn_agent, p_txn_sha256, p_txn_code,
                             p_txn_meter, p_txn_amount, p_txn_currency, p_txn_group, p_txn_receipt, p_txn_date,
                             p_txn_reply)
    ), receipts_added AS (
        INSERT INTO receipts (terminal_id, receipt_number, client_txn_id, issued_at, tariff_code, tariff_valid_from)
        SELECT r.terminal_id, r.receipt_number, r.client_txn_id, p_now, r.tariff_code, r.tariff_valid_from
          FROM unnest(p_rc_terminal, p_rc_number, p_rc_txn, p_rc_tariff, p_rc_tariff_from)
               AS r(terminal_id, receipt_number, client_txn_id, tariff_code, tariff_valid_from)
    ), tokens_added AS (
        INSERT INTO tokens (client_txn_id, meter_number, token_id, token_class, token_subclass, units_deci_kwh,
                            token_ciphertext, token_last4, issued_at)
        SELECT k.*, p_now FROM unnest(p_tk_txn, p_tk_meter, p_tk_tid, p_tk_class, p_tk_subclass, p_tk_units,
                                      p_tk_ciphertext, p_tk_last4) AS k
    ), events AS (
        INSERT INTO outbox (kind, client_txn_id, meter_number, payload)
        SELECT * FROM unnest(p_ev_kind, p_ev_txn, p_ev_meter, p_ev_payload)
    ), totals AS (
        INSERT INTO terminal_daily_totals (terminal_id, business_date, approved_count, approved_minor)
        SELECT * FROM unnest(p_dt_terminal, p_dt_date, p_dt_count, p_dt_amount)
        ON CONFLICT (terminal_id, business_date) DO UPDATE
        SET approved_count = terminal_daily_totals.approved_count + EXCLUDED.approved_count,
            approved_minor = terminal_daily_totals.approved_minor + EXCLUDED.approved_minor
    )
    UPDATE meters m
       SET last_purchase_at = CASE WHEN k.amount IS NULL THEN m.last_purchase_at ELSE p_now END,
           last_purchase_minor = coalesce(k.amount, m.last_purchase_minor),
           last_token_id = CASE WHEN k.tid IS NULL THEN m.last_token_id
                                WHEN m.last_token_id IS NULL OR m.last_token_base_year IS DISTINCT FROM k.base_year
                                     OR k.tid > m.last_token_id THEN k.tid
                                ELSE m.last_token_id END,
           last_token_base_year = CASE WHEN k.tid IS NULL THEN m.last_token_base_year
                                       WHEN m.last_token_id IS NULL
                                            OR m.last_token_base_year IS DISTINCT FROM k.base_year
                                            OR k.tid > m.last_token_id THEN k.base_year
                                       ELSE m.last_token_base_year END
      FROM unnest(p_mt_number, p_mt_amount, p_mt_tid, p_mt_base_year) AS k(meter_number, amount, tid, base_year)
     WHERE m.meter_number = k.meter_number AND m.meter_number = ANY (p_mt_number);
END;
$$;
