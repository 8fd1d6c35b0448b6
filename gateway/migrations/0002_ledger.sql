-- vendgate float ledger: accounts, immutable transfers, low-float events, deposits awaiting approval.
--
-- A transfer moves amount_minor FROM debit_account_id (balance goes down) TO credit_account_id
-- (balance goes up), so the balances of one currency always sum to zero. Balances are kept in step
-- by ledger_apply_transfers() in the transaction that inserts the transfers. Every transfer carries
-- both accounts' balances after it and a SHA-256 chained over each account's previous transfer, so
-- `vendgate ledger check` can prove that no posted transfer was changed, dropped or reordered.

CREATE TABLE ledger_accounts (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind                text NOT NULL CHECK (kind IN (
                            'agent_float', 'customer_credit', 'customer_debt', 'utility_collections',
                            'float_deposits', 'commission_expense', 'commission_payable', 'vat_payable',
                            'suspense')),
    currency            text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    owner_ref           text NOT NULL CHECK (length(owner_ref) BETWEEN 1 AND 200),
    balance_minor       bigint NOT NULL DEFAULT 0,
    -- NULL: unbounded (float_deposits, customer_debt go negative); 0 for an agent float.
    lower_bound_minor   bigint,
    low_threshold_minor bigint,
    blocked             boolean NOT NULL DEFAULT false,
    -- Hash of the account's latest transfer; NULL until its first (ledger_genesis_hash stands in).
    chain_hash          bytea,
    -- created_at of the account's latest transfer: later transfers never get an earlier time.
    last_transfer_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_accounts_balance_within_bound
        CHECK (lower_bound_minor IS NULL OR balance_minor >= lower_bound_minor)
) WITH (fillfactor = 70);  -- room on the page for HOT updates of balances

CREATE INDEX ledger_accounts_owner_idx ON ledger_accounts (owner_ref, kind);

CREATE SEQUENCE ledger_transfer_seq AS bigint;

CREATE TABLE ledger_transfers (
    id                         uuid PRIMARY KEY,
    -- Posting order; per account it follows the order in which the account's lock was held.
    seq                        bigint NOT NULL UNIQUE,
    -- No foreign keys (they cost a fifth of a posting): ledger_apply_transfers() refuses an unknown
    -- account while holding the locks, accounts cannot be deleted, and `ledger check` verifies it.
    debit_account_id           bigint NOT NULL,
    credit_account_id          bigint NOT NULL,
    amount_minor               bigint NOT NULL CHECK (amount_minor > 0),
    currency                   text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    kind                       text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_]{0,39}$'),
    group_id                   uuid,
    metadata                   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    debit_balance_after_minor  bigint NOT NULL,
    credit_balance_after_minor bigint NOT NULL,
    created_at                 timestamptz NOT NULL,
    hash                       bytea NOT NULL,
    CHECK (debit_account_id <> credit_account_id)
);

-- Statement, balance as of a time and reconciliation walk one account's legs in (created_at, seq).
CREATE INDEX ledger_transfers_debit_idx ON ledger_transfers (debit_account_id, created_at, seq);
CREATE INDEX ledger_transfers_credit_idx ON ledger_transfers (credit_account_id, created_at, seq);
CREATE INDEX ledger_transfers_group_idx ON ledger_transfers (group_id) WHERE group_id IS NOT NULL;

CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OR DELETE ON ledger_transfers
    FOR EACH ROW EXECUTE FUNCTION vendgate_refuse_change();
CREATE TRIGGER ledger_transfers_not_truncated BEFORE TRUNCATE ON ledger_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION vendgate_refuse_change();
-- An account with history must not vanish; balances and flags change, the row stays.
CREATE TRIGGER ledger_accounts_undeletable BEFORE DELETE ON ledger_accounts
    FOR EACH ROW EXECUTE FUNCTION vendgate_refuse_change();
CREATE TRIGGER ledger_accounts_not_truncated BEFORE TRUNCATE ON ledger_accounts
    FOR EACH STATEMENT EXECUTE FUNCTION vendgate_refuse_change();

-- Written in the posting transaction when a balance crosses its low threshold (either way).
CREATE TABLE ledger_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('float_below_threshold', 'float_restored')),
    account_id      bigint NOT NULL REFERENCES ledger_accounts (id),
    transfer_id     uuid NOT NULL,
    balance_minor   bigint NOT NULL,
    threshold_minor bigint NOT NULL,
    created_at      timestamptz NOT NULL
);

CREATE INDEX ledger_events_account_idx ON ledger_events (account_id, id);

-- Float deposits with an external (bank, cash office) reference; above the approval threshold a
-- second operator approves before the transfer is posted (maker/checker).
CREATE TABLE ledger_deposits (
    id                uuid PRIMARY KEY,
    float_account_id  bigint NOT NULL REFERENCES ledger_accounts (id),
    source_account_id bigint NOT NULL REFERENCES ledger_accounts (id),
    amount_minor      bigint NOT NULL CHECK (amount_minor > 0),
    currency          text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    external_ref      text NOT NULL CHECK (length(external_ref) BETWEEN 1 AND 200),
    maker             text NOT NULL CHECK (length(maker) BETWEEN 1 AND 200),
    checker           text CHECK (checker IS NULL OR checker <> maker),
    -- Copied into the posted transfer's metadata (agent_id...).
    metadata          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    status            text NOT NULL CHECK (status IN ('pending_approval', 'posted', 'rejected', 'refused')),
    -- Why the deposit was rejected (checker's reason) or refused (the posting status).
    reason            text,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    decided_at        timestamptz,
    -- One bank or cash-office reference credits a float once.
    UNIQUE (source_account_id, external_ref)
);

CREATE INDEX ledger_deposits_pending_idx ON ledger_deposits (requested_at) WHERE status = 'pending_approval';

-- The chain's starting point for an account without transfers.
CREATE FUNCTION ledger_genesis_hash(account_id bigint) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(convert_to('vendgate ledger account ' || account_id, 'UTF8'))
$$;

-- SHA-256 of what the poster sent. kind and currency cannot hold '|' and the rest are numbers,
-- uuids or jsonb text, so the joined text is unambiguous. Computed before the accounts are locked.
CREATE FUNCTION ledger_transfer_content_hash(
    id uuid, debit_account_id bigint, credit_account_id bigint, amount_minor bigint, currency text, kind text,
    group_id uuid, metadata jsonb
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(convert_to(concat_ws('|', id, debit_account_id, credit_account_id, amount_minor, currency, kind,
                                       coalesce(group_id::text, '-'), metadata::text), 'UTF8'))
$$;

-- A transfer's hash: its content hash, where and when it was posted and the balances after it,
-- chained to the previous hash of both its accounts (fixed-width fields: unambiguous).
CREATE FUNCTION ledger_transfer_hash(
    prev_debit_hash bytea, prev_credit_hash bytea, content_hash bytea, seq bigint,
    debit_balance_after_minor bigint, credit_balance_after_minor bigint, created_at timestamptz
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(prev_debit_hash || prev_credit_hash || content_hash || int8send(seq)
                  || int8send(debit_balance_after_minor) || int8send(credit_balance_after_minor)
                  || timestamptz_send(created_at))
$$;

-- Apply a batch in the caller's transaction. Returns one status per transfer, in order:
--   ok | exists | exists_with_different_content | insufficient_balance | account_blocked |
--   account_missing | currency_mismatch | linked_failed
-- and, for ok and exists, the stored seq and balances after; created_at is posted_at for ok,
-- the stored one for exists. Transfers are applied in
-- the given order against running balances held in arrays; consecutive transfers sharing a
-- group_id succeed or fail as one. Every account of the batch is locked first, in id order, so
-- two batches never deadlock and a replay of an id waits for its original and then sees it.
-- Refusals are statuses, never errors; an error here is a bug (or a lost race, see below).
CREATE FUNCTION ledger_apply_transfers_once(
    p_ids uuid[], p_debit bigint[], p_credit bigint[], p_amount bigint[], p_currency text[],
    p_kind text[], p_group uuid[], p_metadata jsonb[],
    OUT statuses text[], OUT seqs bigint[], OUT created_ats timestamptz[],
    OUT debit_afters bigint[], OUT credit_afters bigint[], OUT posted_at timestamptz
)
LANGUAGE plpgsql
-- Every table access here is by key. The session caches these plans, maybe while the tables were
-- still small; a plan that scans them must not survive into a large ledger.
SET enable_seqscan = off
AS $$
DECLARE
    n integer := coalesce(cardinality(p_ids), 0);
    acc_ids bigint[];         -- every account of the batch, in id order
    found_ids bigint[];
    acc_balance bigint[];
    acc_bound bigint[];
    acc_threshold bigint[];
    acc_blocked boolean[];
    acc_currency text[];
    acc_hash bytea[];
    any_threshold boolean;
    last_at timestamptz;
    debit_pos integer[];
    credit_pos integer[];
    has_duplicates boolean;   -- an id occurs twice in the batch
    first_pos integer[];      -- first position in the batch holding the same id
    posted_pos integer[];     -- indexed by first_pos: the position that posted that id in this batch
    dup_src integer[];        -- for an in-batch replay: the position it replays
    content_hashes bytea[];
    hashes bytea[];
    any_stored boolean := false;
    ex ledger_transfers[];    -- stored transfers with the batch's ids, by position
    exr ledger_transfers;
    r record;
    i integer;
    j integer;
    k integer;
    src integer;
    dp integer;
    cp integer;
    amount bigint;
    new_seq bigint;
    h bytea;
    group_start integer := 1;
    group_failed boolean := false;
    undo_count integer := 0;
    undo_pos integer[] := '{}';
    undo_balance bigint[] := '{}';
    undo_hash bytea[] := '{}';
    ev_kind text[] := '{}';
    ev_account bigint[] := '{}';
    ev_transfer uuid[] := '{}';
    ev_balance bigint[] := '{}';
    ev_threshold bigint[] := '{}';
    ev_group_start integer := 0;
BEGIN
    statuses := array_fill(NULL::text, ARRAY[n]);
    seqs := array_fill(NULL::bigint, ARRAY[n]);
    created_ats := array_fill(NULL::timestamptz, ARRAY[n]);
    debit_afters := array_fill(NULL::bigint, ARRAY[n]);
    credit_afters := array_fill(NULL::bigint, ARRAY[n]);
    hashes := array_fill(NULL::bytea, ARRAY[n]);
    IF n = 0 THEN
        RETURN;
    END IF;

    -- Work that needs no lock comes first, so the locks are held for the loop and the writes only.
    SELECT array_agg(DISTINCT x.id ORDER BY x.id) INTO acc_ids FROM unnest(p_debit || p_credit) AS x(id);
    SELECT array_agg(d.pos::integer ORDER BY t.ord), array_agg(c.pos::integer ORDER BY t.ord)
      INTO debit_pos, credit_pos
      FROM unnest(p_debit, p_credit) WITH ORDINALITY AS t(debit_id, credit_id, ord)
      JOIN unnest(acc_ids) WITH ORDINALITY AS d(id, pos) ON d.id = t.debit_id
      JOIN unnest(acc_ids) WITH ORDINALITY AS c(id, pos) ON c.id = t.credit_id;
    SELECT array_agg(ledger_transfer_content_hash(u.id, u.debit, u.credit, u.amount, u.currency, u.kind, u.group_id,
                                                  u.metadata) ORDER BY u.ord)
      INTO content_hashes
      FROM unnest(p_ids, p_debit, p_credit, p_amount, p_currency, p_kind, p_group, p_metadata) WITH ORDINALITY
           AS u(id, debit, credit, amount, currency, kind, group_id, metadata, ord);
    SELECT count(DISTINCT u.id) <> n INTO has_duplicates FROM unnest(p_ids) AS u(id);
    IF has_duplicates THEN
        SELECT array_agg(s.first::integer ORDER BY s.ord) INTO first_pos
          FROM (SELECT u.ord, min(u.ord) OVER (PARTITION BY u.id) AS first
                  FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)) s;
    END IF;
    -- Read before the locks: should a post of one of these ids commit meanwhile, the INSERT below
    -- fails and ledger_apply_transfers() evaluates the batch again, now seeing it as a replay.
    FOR r IN SELECT u.ord::integer AS ord, t AS stored
               FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)
               JOIN ledger_transfers t ON t.id = u.id
    LOOP
        ex[r.ord] := r.stored;
        any_stored := true;
    END LOOP;

    SELECT array_agg(a.id ORDER BY a.id), array_agg(a.balance_minor ORDER BY a.id),
           array_agg(a.lower_bound_minor ORDER BY a.id), array_agg(a.low_threshold_minor ORDER BY a.id),
           array_agg(a.blocked ORDER BY a.id), array_agg(a.currency ORDER BY a.id),
           array_agg(a.chain_hash ORDER BY a.id), max(a.last_transfer_at), bool_or(a.low_threshold_minor IS NOT NULL)
      INTO found_ids, acc_balance, acc_bound, acc_threshold, acc_blocked, acc_currency, acc_hash, last_at,
           any_threshold
      FROM (SELECT la.id, la.balance_minor, la.lower_bound_minor, la.low_threshold_minor, la.blocked,
                   la.currency, coalesce(la.chain_hash, ledger_genesis_hash(la.id)) AS chain_hash,
                   la.last_transfer_at
              FROM ledger_accounts la
             WHERE la.id = ANY (acc_ids)
             ORDER BY la.id
               FOR NO KEY UPDATE) a;
    IF coalesce(cardinality(found_ids), 0) <> cardinality(acc_ids) THEN
        -- Some account does not exist: align what was found with acc_ids, NULL (missing) elsewhere.
        SELECT array_agg(f.balance ORDER BY w.pos), array_agg(f.bound ORDER BY w.pos),
               array_agg(f.threshold ORDER BY w.pos), array_agg(f.blocked ORDER BY w.pos),
               array_agg(f.currency ORDER BY w.pos), array_agg(f.hash ORDER BY w.pos)
          INTO acc_balance, acc_bound, acc_threshold, acc_blocked, acc_currency, acc_hash
          FROM unnest(acc_ids) WITH ORDINALITY AS w(id, pos)
          LEFT JOIN unnest(found_ids, acc_balance, acc_bound, acc_threshold, acc_blocked, acc_currency, acc_hash)
                    AS f(id, balance, bound, threshold, blocked, currency, hash) ON f.id = w.id;
    END IF;
    -- Taken after the locks: per account, created_at never goes back as seq goes up.
    posted_at := greatest(clock_timestamp(), last_at);

    -- Per transfer, in order: the checks of what is stored, then of the accounts, then apply to the
    -- running balances. Statements are few on purpose: this loop runs while the locks are held.
    FOR i IN 1 .. n + 1 LOOP
        -- A group ends where the next transfer has no group or another one.
        IF i > 1 AND (i > n OR p_group[i] IS NULL OR p_group[i] IS DISTINCT FROM p_group[i - 1]) THEN
            IF group_failed THEN
                FOR k IN REVERSE undo_count .. 1 LOOP
                    acc_balance[undo_pos[k]] := undo_balance[k];
                    acc_hash[undo_pos[k]] := undo_hash[k];
                END LOOP;
                ev_kind := ev_kind[1:ev_group_start];
                ev_account := ev_account[1:ev_group_start];
                ev_transfer := ev_transfer[1:ev_group_start];
                ev_balance := ev_balance[1:ev_group_start];
                ev_threshold := ev_threshold[1:ev_group_start];
                FOR j IN group_start .. i - 1 LOOP
                    IF statuses[j] = 'ok' OR (statuses[j] = 'exists' AND dup_src[j] >= group_start) THEN
                        IF has_duplicates AND statuses[j] = 'ok' THEN
                            posted_pos[first_pos[j]] := NULL;
                        END IF;
                        statuses[j] := 'linked_failed';
                        seqs[j] := NULL;
                        created_ats[j] := NULL;
                        debit_afters[j] := NULL;
                        credit_afters[j] := NULL;
                    END IF;
                END LOOP;
            END IF;
            group_start := i;
            group_failed := false;
            undo_count := 0;
            ev_group_start := cardinality(ev_kind);
        END IF;
        EXIT WHEN i > n;

        IF group_failed THEN
            statuses[i] := 'linked_failed';
            CONTINUE;
        END IF;

        IF any_stored THEN
            exr := ex[i];
            IF exr.id IS NOT NULL THEN
                IF exr.debit_account_id = p_debit[i] AND exr.credit_account_id = p_credit[i]
                   AND exr.amount_minor = p_amount[i] AND exr.currency = p_currency[i] AND exr.kind = p_kind[i]
                   AND exr.group_id IS NOT DISTINCT FROM p_group[i] AND exr.metadata = p_metadata[i] THEN
                    statuses[i] := 'exists';
                    seqs[i] := exr.seq;
                    created_ats[i] := exr.created_at;
                    debit_afters[i] := exr.debit_balance_after_minor;
                    credit_afters[i] := exr.credit_balance_after_minor;
                ELSE
                    statuses[i] := 'exists_with_different_content';
                    group_failed := true;
                END IF;
                CONTINUE;
            END IF;
        END IF;

        IF has_duplicates THEN
            src := posted_pos[first_pos[i]];
            IF src IS NOT NULL THEN
                dup_src[i] := src;
                IF p_debit[src] = p_debit[i] AND p_credit[src] = p_credit[i] AND p_amount[src] = p_amount[i]
                   AND p_currency[src] = p_currency[i] AND p_kind[src] = p_kind[i]
                   AND p_group[src] IS NOT DISTINCT FROM p_group[i] AND p_metadata[src] = p_metadata[i] THEN
                    statuses[i] := 'exists';
                    seqs[i] := seqs[src];
                    created_ats[i] := posted_at;
                    debit_afters[i] := debit_afters[src];
                    credit_afters[i] := credit_afters[src];
                ELSE
                    statuses[i] := 'exists_with_different_content';
                    group_failed := true;
                END IF;
                CONTINUE;
            END IF;
        END IF;

        dp := debit_pos[i];
        cp := credit_pos[i];
        amount := p_amount[i];
        IF acc_currency[dp] IS NULL OR acc_currency[cp] IS NULL THEN
            statuses[i] := 'account_missing';
            group_failed := true;
        ELSIF acc_currency[dp] <> p_currency[i] OR acc_currency[cp] <> p_currency[i] THEN
            statuses[i] := 'currency_mismatch';
            group_failed := true;
        ELSIF (acc_blocked[dp] OR acc_blocked[cp]) AND p_kind[i] <> 'reversal' THEN
            -- A reversal restores an earlier state, so a blocked account still takes it.
            statuses[i] := 'account_blocked';
            group_failed := true;
        ELSIF acc_balance[dp] - amount < acc_bound[dp] THEN  -- false when unbounded (NULL)
            statuses[i] := 'insufficient_balance';
            group_failed := true;
        ELSE
            undo_pos[undo_count + 1] := dp;
            undo_balance[undo_count + 1] := acc_balance[dp];
            undo_hash[undo_count + 1] := acc_hash[dp];
            undo_pos[undo_count + 2] := cp;
            undo_balance[undo_count + 2] := acc_balance[cp];
            undo_hash[undo_count + 2] := acc_hash[cp];
            undo_count := undo_count + 2;
            new_seq := nextval('ledger_transfer_seq');
            acc_balance[dp] := acc_balance[dp] - amount;
            acc_balance[cp] := acc_balance[cp] + amount;
            h := ledger_transfer_hash(acc_hash[dp], acc_hash[cp], content_hashes[i], new_seq, acc_balance[dp],
                                      acc_balance[cp], posted_at);
            acc_hash[dp] := h;
            acc_hash[cp] := h;
            IF any_threshold THEN
                IF acc_balance[dp] < acc_threshold[dp] AND acc_balance[dp] + amount >= acc_threshold[dp] THEN
                    k := cardinality(ev_kind) + 1;
                    ev_kind[k] := 'float_below_threshold';
                    ev_account[k] := acc_ids[dp];
                    ev_transfer[k] := p_ids[i];
                    ev_balance[k] := acc_balance[dp];
                    ev_threshold[k] := acc_threshold[dp];
                END IF;
                IF acc_balance[cp] >= acc_threshold[cp] AND acc_balance[cp] - amount < acc_threshold[cp] THEN
                    k := cardinality(ev_kind) + 1;
                    ev_kind[k] := 'float_restored';
                    ev_account[k] := acc_ids[cp];
                    ev_transfer[k] := p_ids[i];
                    ev_balance[k] := acc_balance[cp];
                    ev_threshold[k] := acc_threshold[cp];
                END IF;
            END IF;
            statuses[i] := 'ok';
            seqs[i] := new_seq;
            debit_afters[i] := acc_balance[dp];
            credit_afters[i] := acc_balance[cp];
            hashes[i] := h;
            IF has_duplicates THEN
                posted_pos[first_pos[i]] := i;
            END IF;
        END IF;
    END LOOP;

    INSERT INTO ledger_transfers (id, seq, debit_account_id, credit_account_id, amount_minor, currency, kind,
                                  group_id, metadata, debit_balance_after_minor, credit_balance_after_minor,
                                  created_at, hash)
    SELECT u.id, u.seq, u.debit, u.credit, u.amount, u.currency, u.kind, u.group_id, u.metadata,
           u.debit_after, u.credit_after, posted_at, u.hash
      FROM unnest(p_ids, seqs, p_debit, p_credit, p_amount, p_currency, p_kind, p_group, p_metadata,
                  debit_afters, credit_afters, statuses, hashes)
           AS u(id, seq, debit, credit, amount, currency, kind, group_id, metadata, debit_after, credit_after,
                status, hash)
     WHERE u.status = 'ok';

    -- Accounts whose chain moved; a group undone leaves its accounts as they were.
    UPDATE ledger_accounts a
       SET balance_minor = u.balance, chain_hash = u.hash, last_transfer_at = posted_at
      FROM unnest(acc_ids, acc_balance, acc_hash) AS u(id, balance, hash)
     -- a.id = ANY lets the planner reach the rows by primary key rather than scan every account.
     WHERE a.id = u.id AND a.id = ANY (acc_ids)
       AND u.hash IS DISTINCT FROM coalesce(a.chain_hash, ledger_genesis_hash(a.id));

    IF cardinality(ev_kind) > 0 THEN
        INSERT INTO ledger_events (kind, account_id, transfer_id, balance_minor, threshold_minor, created_at)
        SELECT e.kind, e.account_id, e.transfer_id, e.balance, e.threshold, posted_at
          FROM unnest(ev_kind, ev_account, ev_transfer, ev_balance, ev_threshold)
               AS e(kind, account_id, transfer_id, balance, threshold);
    END IF;
END;
$$;

-- The entry point. Two transactions posting one id with different accounts do not share a lock,
-- so the later insert can meet the earlier one's committed row: the batch is then rolled back to
-- a savepoint and evaluated again, and now reports that id as a replay.
CREATE FUNCTION ledger_apply_transfers(
    p_ids uuid[], p_debit bigint[], p_credit bigint[], p_amount bigint[], p_currency text[],
    p_kind text[], p_group uuid[], p_metadata jsonb[],
    OUT statuses text[], OUT seqs bigint[], OUT created_ats timestamptz[],
    OUT debit_afters bigint[], OUT credit_afters bigint[], OUT posted_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    attempts_max constant integer := 3;
    attempt integer := 0;
BEGIN
    LOOP
        attempt := attempt + 1;
        BEGIN
            SELECT o.statuses, o.seqs, o.created_ats, o.debit_afters, o.credit_afters, o.posted_at
              INTO statuses, seqs, created_ats, debit_afters, credit_afters, posted_at
              FROM ledger_apply_transfers_once(p_ids, p_debit, p_credit, p_amount, p_currency, p_kind, p_group,
                                               p_metadata) o;
            RETURN;
        EXCEPTION WHEN unique_violation THEN
            IF attempt >= attempts_max THEN
                RAISE;
            END IF;
        END;
    END LOOP;
END;
$$;
