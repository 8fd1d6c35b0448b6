-- A reversal's record is final, as the payment records are (0013_vend_records.sql,
-- 0014_vend_record_keys.sql, 0024_protections_in_every_session.sql).
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
