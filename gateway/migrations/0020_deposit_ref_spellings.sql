-- A float deposit's external reference is one reference however it is spelled.
--
-- 0018 took a reference byte for byte: "BANK-2026-0042", "bank-2026-0042", "BANK-2026-0042 " and
-- the same in full-width letters were four references, and one bank payment typed four ways
-- credited a float four times. A reference is now taken by its key: compatibility-normalised
-- (NFKC: full-width letters and digits, non-breaking and ideographic spaces are the plain ones),
-- white space trimmed and each run made one space, then upper case. The live deposits of a
-- source account hold distinct keys; the reference itself is stored as the operator typed it.
-- Creating the index fails if live deposits already share a key: those are the double credits
-- this rule prevents, for an operator to look into (reverse one) before migrating.
CREATE FUNCTION ledger_deposit_ref_key(ref text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN upper(regexp_replace(regexp_replace(normalize(ref, NFKC), '^\s+|\s+$', '', 'g'), '\s+', ' ', 'g'));

DROP INDEX ledger_deposits_live_external_ref;
CREATE UNIQUE INDEX ledger_deposits_live_ref_key ON ledger_deposits (source_account_id, ledger_deposit_ref_key(external_ref))
    WHERE status IN ('pending_approval', 'posted');
