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
CREATE TRIGGER reversals_keys_fixed
    BEFORE UPDATE OF original_txn_id, reversal_txn_id, terminal_id, original_found ON reversals
    FOR EACH ROW WHEN (OLD.original_txn_id IS DISTINCT FROM NEW.original_txn_id
                       OR OLD.reversal_txn_id IS DISTINCT FROM NEW.reversal_txn_id
                       OR OLD.terminal_id IS DISTINCT FROM NEW.terminal_id
                       OR OLD.original_found IS DISTINCT FROM NEW.original_found)
    EXECUTE FUNCTION vendgate_refuse_key_change();
ALTER TABLE reversals ENABLE ALWAYS TRIGGER reversals_undeletable;
ALTER TABLE reversals ENABLE ALWAYS TRIGGER reversals_not_truncated;
ALTER TABLE reversals ENABLE ALWAYS TRIGGER reversals_keys_fixed;

-- A payment's record (vend_transactions) is what a repeat of its request is answered from, and
-- what end of day, limits, reversals and `vendgate ledger check` read. Only its id and terminal
-- were fixed (0014): a plain UPDATE could restate its outcome, amount, group or day. Now nothing
-- but its reprint count changes (the payment path never updates any other column).
DROP TRIGGER vend_transactions_keys_fixed ON vend_transactions;
CREATE TRIGGER vend_transactions_keys_fixed
    BEFORE UPDATE OF client_txn_id, terminal_id, kind, agent_id, request_sha256, response_code, meter_number,
                     amount_minor, currency, group_id, receipt_number, business_date, reply, created_at
    ON vend_transactions
    FOR EACH ROW WHEN (OLD.client_txn_id IS DISTINCT FROM NEW.client_txn_id
                       OR OLD.terminal_id IS DISTINCT FROM NEW.terminal_id
                       OR OLD.kind IS DISTINCT FROM NEW.kind
                       OR OLD.agent_id IS DISTINCT FROM NEW.agent_id
                       OR OLD.request_sha256 IS DISTINCT FROM NEW.request_sha256
                       OR OLD.response_code IS DISTINCT FROM NEW.response_code
                       OR OLD.meter_number IS DISTINCT FROM NEW.meter_number
                       OR OLD.amount_minor IS DISTINCT FROM NEW.amount_minor
                       OR OLD.currency IS DISTINCT FROM NEW.currency
                       OR OLD.group_id IS DISTINCT FROM NEW.group_id
                       OR OLD.receipt_number IS DISTINCT FROM NEW.receipt_number
                       OR OLD.business_date IS DISTINCT FROM NEW.business_date
                       OR OLD.reply IS DISTINCT FROM NEW.reply
                       OR OLD.created_at IS DISTINCT FROM NEW.created_at)
    EXECUTE FUNCTION vendgate_refuse_key_change();
ALTER TABLE vend_transactions ENABLE ALWAYS TRIGGER vend_transactions_keys_fixed;
