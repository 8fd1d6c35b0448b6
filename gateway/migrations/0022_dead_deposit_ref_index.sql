-- Finding the deposits of a reference that credited nothing (rejected or refused), which every
-- deposit_id_for_ref() call counts, walked all of the source account's deposits and computed each
-- one's reference key (0020's partial index holds live deposits only). This index serves that
-- count by key; a source account takes one deposit per bank payment, so it grows without bound.
CREATE INDEX ledger_deposits_dead_ref_key ON ledger_deposits (source_account_id, ledger_deposit_ref_key(external_ref))
    WHERE status IN ('rejected', 'refused');
