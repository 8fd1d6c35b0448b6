-- A reversal's record is final, as the payment records are (0013_vend_records.sql,
-- 0014_vend_record_keys.sql, 0024_protections_in_every_session.sql); and a payment's record is
-- final but for its reprint count.
--
-- A reversals row is the tombstone that bars a payment for ever (a late original, a second
-- reversal): nothing refused deleting or changing one. With the row of an approved reversal
-- deleted, the payment was reversed a second time under another id: no money moved again (the
-- compensating group was posted), but a second payment_reversed event went to the engine under a
-- new event_id. No reversals row is deleted or truncated, and none of its columns that say what
-- was reversed, by which request and terminal, and whether the payment was found, ever changes
-- (reversals_undeletable, reversals_not_truncated, reversals_keys_fixed; records_check.PROTECTING_TRIGGERS).
-- `vendgate ledger check` also ties each approved reversal's record to its reversals row
-- (vend_records_consistent), which finds a row removed with the triggers disabled.
CREATE TRIGGER reversals_undeletable BEFORE DELETE ON reversals
    FOR EACH ROW EXECUTE FUNCTION vendgate_refuse_delete();
CREATE TRIGGER reversals_not_truncated BEFORE TRUNCATE ON reversals
    FOR EACH STATEMENT EXECUTE FUNCTION vendgate_refuse_delete();

-- A payment's record (vend_transactions) is what a repeat of its request is answered from, and
-- what end of day, limits, reversals and `vendgate ledger check` read. Only its id and terminal
-- were fixed (0014): a plain UPDATE could restate its outcome, amount, group or day. Now nothing
-- but its reprint count changes (the payment path never updates any other column).
DROP TRIGGER vend_transactions_keys_fixed ON vend_transactions;

-- <table>_keys_fixed, made as 0014_vend_record_keys.sql makes them (records_check.RECORD_KEYS).
DO $$
DECLARE
    keys constant jsonb := '{"reversals": ["original_txn_id", "reversal_txn_id", "terminal_id", "original_found"],
                             "vend_transactions": ["client_txn_id", "terminal_id", "kind", "agent_id",
                                                   "request_sha256", "response_code", "meter_number",
                                                   "amount_minor", "currency", "group_id", "receipt_number",
                                                   "business_date", "reply", "created_at"]}';
    t text;
BEGIN
    FOR t IN SELECT jsonb_object_keys(keys) LOOP
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE UPDATE OF %s ON %I FOR EACH ROW WHEN (%s) '
            'EXECUTE FUNCTION vendgate_refuse_key_change()',
            t || '_keys_fixed',
            (SELECT string_agg(quote_ident(c), ', ') FROM jsonb_array_elements_text(keys -> t) AS c),
            t,
            (SELECT string_agg(format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', c), ' OR ')
               FROM jsonb_array_elements_text(keys -> t) AS c));
        EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER %I', t, t || '_keys_fixed');
    END LOOP;
END;
$$;
ALTER TABLE reversals ENABLE ALWAYS TRIGGER reversals_undeletable;
ALTER TABLE reversals ENABLE ALWAYS TRIGGER reversals_not_truncated;
