-- What an account is never changes, and a low-float event, once written, stays as written.
--
-- An account's balance, chain tip, flags and bounds move; its id, kind, currency, owner and time
-- of opening do not. Nothing refused an UPDATE of them: reassigning an agent's commission account
-- to another owner moved its commission into the other agent's reconciliation, and the check saw
-- nothing. The low-float events (ledger_events) could be rewritten or deleted the same way. Both
-- are refused now, in every session as 0024's triggers are (float_ledger.check's
-- IMMUTABILITY_TRIGGERS). The posting path never names these columns, so the trigger on
-- ledger_accounts does not fire for it.
CREATE TRIGGER ledger_accounts_identity_fixed
    BEFORE UPDATE OF id, kind, currency, owner_ref, created_at ON ledger_accounts
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id OR OLD.kind IS DISTINCT FROM NEW.kind
                       OR OLD.currency IS DISTINCT FROM NEW.currency OR OLD.owner_ref IS DISTINCT FROM NEW.owner_ref
                       OR OLD.created_at IS DISTINCT FROM NEW.created_at)
    EXECUTE FUNCTION vendgate_refuse_key_change();
CREATE TRIGGER ledger_events_immutable BEFORE UPDATE OR DELETE ON ledger_events
    FOR EACH ROW EXECUTE FUNCTION vendgate_refuse_change();
CREATE TRIGGER ledger_events_not_truncated BEFORE TRUNCATE ON ledger_events
    FOR EACH STATEMENT EXECUTE FUNCTION vendgate_refuse_change();

ALTER TABLE ledger_accounts ENABLE ALWAYS TRIGGER ledger_accounts_identity_fixed;
ALTER TABLE ledger_events ENABLE ALWAYS TRIGGER ledger_events_immutable;
ALTER TABLE ledger_events ENABLE ALWAYS TRIGGER ledger_events_not_truncated;
