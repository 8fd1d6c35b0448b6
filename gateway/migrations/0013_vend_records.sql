-- The payment path's records without foreign keys, and never deleted.
--
-- vend_commit_topups() (0012_vend_commit.sql) writes a payment's vend_transactions row, its
-- receipt and its token in one statement, from the terminal and meter rows the same statement
-- locks (receipt counter, meter state). The five foreign keys among those rows checked, for each
-- payment, what that statement had just written or locked: five more index probes per payment,
-- about a tenth of its database time. Instead:
-- - no row of terminals, meters, vend_transactions, receipts or tokens can be deleted or truncated
--   (a terminal is retired, a token voided, a payment reversed: the row stays), so nothing a
--   record names can disappear;
-- - `vendgate ledger check` verifies that every record names rows that exist
--   (vend_records_referenced, gateway/records_check.py).
ALTER TABLE vend_transactions DROP CONSTRAINT vend_transactions_terminal_id_fkey;
ALTER TABLE receipts DROP CONSTRAINT receipts_terminal_id_fkey, DROP CONSTRAINT receipts_client_txn_id_fkey;
ALTER TABLE tokens DROP CONSTRAINT tokens_client_txn_id_fkey, DROP CONSTRAINT tokens_meter_number_fkey;

CREATE FUNCTION vendgate_refuse_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are never deleted', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- <table>_undeletable and <table>_not_truncated on each (records_check.PROTECTING_TRIGGERS).
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['terminals', 'meters', 'vend_transactions', 'receipts', 'tokens'] LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE DELETE ON %I FOR EACH ROW EXECUTE FUNCTION vendgate_refuse_delete()',
                       t || '_undeletable', t);
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
                       'EXECUTE FUNCTION vendgate_refuse_delete()', t || '_not_truncated', t);
    END LOOP;
END;
$$;
