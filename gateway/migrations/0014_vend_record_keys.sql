-- The keys that payment records name never change.
--
-- Without the foreign keys dropped in 0013_vend_records.sql, nothing would refuse an UPDATE that
-- renames a terminal or a meter some payment names, or points a receipt or token elsewhere. These
-- triggers refuse it, as the keys did (<table>_keys_fixed, records_check.PROTECTING_TRIGGERS).
-- They fire only for an UPDATE that names a key column: the payment path never does.
CREATE FUNCTION vendgate_refuse_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the keys of % rows never change', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

DO $$
DECLARE
    keys constant jsonb := '{"terminals": ["terminal_id"], "meters": ["meter_number"],
                             "vend_transactions": ["client_txn_id", "terminal_id"],
                             "receipts": ["terminal_id", "receipt_number", "client_txn_id"],
                             "tokens": ["client_txn_id", "meter_number"]}';
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
    END LOOP;
END;
$$;
