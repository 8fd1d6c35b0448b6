-- 1. A float deposit's external reference is taken only by a deposit that is pending approval or
--    posted. One that was rejected (a keying error, say) or refused (its float was blocked)
--    credited nothing, so the same bank reference can be requested again, correctly keyed or once
--    the float is unblocked; it still credits a float at most once.
ALTER TABLE ledger_deposits DROP CONSTRAINT ledger_deposits_source_account_id_external_ref_key;
CREATE UNIQUE INDEX ledger_deposits_live_external_ref ON ledger_deposits (source_account_id, external_ref)
    WHERE status IN ('pending_approval', 'posted');

-- 2. Each low-float event records the transaction that wrote it. An event's id is taken when its
--    posting runs, not when it commits, so a reader that kept the last id it read could pass over
--    an event whose transaction committed after one with a higher id. Readers now page by
--    (txid, id) and see only events of transactions older than every one still running
--    (pg_snapshot_xmin): no event can appear later behind their cursor.
ALTER TABLE ledger_events ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX ledger_events_txid_idx ON ledger_events (txid, id);
