-- The triggers that protect the ledger and the payment records fire in every session, and a
-- decided float deposit is final.
--
-- A trigger enabled the default way (pg_trigger.tgenabled 'O') does not fire in a session whose
-- session_replication_role is replica, and `ALTER DATABASE ... SET session_replication_role =
-- replica` (or the same on a role) makes that every new session's. An UPDATE of a posted transfer
-- then succeeded while `vendgate ledger check` still reported the trigger enabled. ENABLE ALWAYS
-- ('A') fires whatever that setting; the check now requires it (float_ledger.check.trigger_problems).
--
-- ledger_deposits had no protection: a posted deposit set to 'rejected' with a plain UPDATE freed
-- its external reference (0020's index holds live deposits only), and the same bank payment then
-- credited the float a second time. A deposit now changes once, from pending_approval to its
-- decision (status, checker, reason, decided_at). Every other column keeps what the request
-- wrote, and no deposit is deleted or truncated. `vendgate ledger check` compares each deposit with
-- the ledger (deposits_match_transfers), which finds a change made with the trigger disabled.
CREATE FUNCTION ledger_deposit_decided_once() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'float deposits are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status <> 'pending_approval' THEN
        RAISE EXCEPTION 'float deposit % is decided (%): its record is final', OLD.id, OLD.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.id, NEW.float_account_id, NEW.source_account_id, NEW.amount_minor, NEW.currency, NEW.external_ref,
        NEW.maker, NEW.metadata, NEW.requested_at)
       IS DISTINCT FROM (OLD.id, OLD.float_account_id, OLD.source_account_id, OLD.amount_minor, OLD.currency,
                         OLD.external_ref, OLD.maker, OLD.metadata, OLD.requested_at) THEN
        RAISE EXCEPTION 'float deposit %: only its decision may be recorded', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER ledger_deposits_decided_once BEFORE UPDATE OR DELETE ON ledger_deposits
    FOR EACH ROW EXECUTE FUNCTION ledger_deposit_decided_once();
CREATE TRIGGER ledger_deposits_not_truncated BEFORE TRUNCATE ON ledger_deposits
    FOR EACH STATEMENT EXECUTE FUNCTION vendgate_refuse_change();

ALTER TABLE ledger_transfers ENABLE ALWAYS TRIGGER ledger_transfers_immutable;
ALTER TABLE ledger_transfers ENABLE ALWAYS TRIGGER ledger_transfers_not_truncated;
ALTER TABLE ledger_accounts ENABLE ALWAYS TRIGGER ledger_accounts_undeletable;
ALTER TABLE ledger_accounts ENABLE ALWAYS TRIGGER ledger_accounts_not_truncated;
ALTER TABLE ledger_deposits ENABLE ALWAYS TRIGGER ledger_deposits_decided_once;
ALTER TABLE ledger_deposits ENABLE ALWAYS TRIGGER ledger_deposits_not_truncated;

-- The payment records' triggers (0013_vend_records.sql, 0014_vend_record_keys.sql).
DO $$
DECLARE
    t text;
    suffix text;
BEGIN
    FOREACH t IN ARRAY ARRAY['terminals', 'meters', 'vend_transactions', 'receipts', 'tokens'] LOOP
        FOREACH suffix IN ARRAY ARRAY['_undeletable', '_not_truncated', '_keys_fixed'] LOOP
            EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER %I', t, t || suffix);
        END LOOP;
    END LOOP;
END;
$$;
