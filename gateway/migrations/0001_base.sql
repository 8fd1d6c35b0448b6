-- vendgate base: helpers shared by every later migration.

-- Posted rows that must never change call this from a BEFORE UPDATE OR DELETE trigger.
CREATE OR REPLACE FUNCTION vendgate_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are immutable', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
