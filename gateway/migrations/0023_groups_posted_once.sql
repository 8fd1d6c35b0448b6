-- A linked group is posted once: a transfer cannot join a group that is already posted.
--
-- A group succeeds or fails as one and is reversed as one (reverse_group compensates every
-- transfer it holds). Until now a later batch could post new transfers under the group id of a
-- posted group: they joined it, so the group was no longer what had succeeded as one, and a
-- second reversal of it, a repeat that must move nothing, compensated the newcomers.
--
-- Now a transfer under the group id of posted transfers, whose own id is not one of theirs, is
-- refused `exists_with_different_content` (the group exists, with other content) and its group
-- in the batch fails as one; a replay of the group's own ids is `exists` as before. A first
-- attempt looks the batch's groups up in the group index and, when one is posted already,
-- hands over to the attempt that reads the stored transfers (p_lookup), as for a stored id.
--
-- Two transactions posting one new group under different transfers, with no account in common,
-- share no lock: each group's first transfer is marked (opens_group), and a unique index on the
-- marked transfers' group ids makes the later INSERT wait for the earlier transaction and then
-- meet its row, like the primary key for a transfer id, so it is evaluated again and refused.
-- The index holds one entry per group. Transfers posted before this migration are unmarked:
-- their groups are found by the lookup alone (they are committed, so no race is left on them).
-- A group split in a batch (its transfers not consecutive) would have two first transfers: the
-- function refuses it (invalid_parameter_value), as the Python API already does before any SQL.
-- Nothing else in ledger_apply_transfers_once() (0016_ledger_replay_by_key.sql) changes.
--
-- The new column's default is kept in the catalog (no table rewrite); building the index reads
-- the whole table once, and postings wait for it: on a large ledger, migrate in a quiet hour.
ALTER TABLE ledger_transfers ADD COLUMN opens_group boolean NOT NULL DEFAULT false;
CREATE UNIQUE INDEX ledger_transfers_group_opened ON ledger_transfers (group_id) WHERE opens_group;

CREATE OR REPLACE FUNCTION ledger_apply_transfers_once(
    p_ids uuid[], p_debit bigint[], p_credit bigint[], p_amount bigint[], p_currency text[],
    p_kind text[], p_group uuid[], p_metadata jsonb[], p_lookup boolean,
    OUT statuses text[], OUT seqs bigint[], OUT created_ats timestamptz[],
    OUT debit_afters bigint[], OUT credit_afters bigint[], OUT posted_at timestamptz
)
LANGUAGE plpgsql
-- Every table access here is by key. The session caches these plans, maybe while the tables were
-- still small; a plan that scans them must not survive into a large ledger. Generic plans: a
-- custom plan per call (PostgreSQL's choice for these array parameters) cost more to plan than a
-- small batch costs to run.
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
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
    known_ids uuid[] := '{}';  -- the stored ids read before the locks
    posted_groups uuid[] := '{}';  -- the batch's group ids that posted transfers hold already
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
    -- (Aliases unlike this function's variables: PL/pgSQL would read r.g as its record r.)
    IF EXISTS (SELECT 1
                 FROM (SELECT x.g, x.g IS DISTINCT FROM lag(x.g) OVER (ORDER BY x.ord) AS starts
                         FROM unnest(p_group) WITH ORDINALITY AS x(g, ord)) runs
                WHERE runs.g IS NOT NULL AND runs.starts
                GROUP BY runs.g
               HAVING count(*) > 1) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                              MESSAGE = 'a linked group''s transfers must be consecutive in the batch';
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
    -- Stored transfers with the batch's ids, read before the locks and only when asked: a first
    -- attempt takes every id to be new (a replay is rare), and when its INSERT meets a stored id,
    -- ledger_apply_transfers() calls again with p_lookup. A post of one of these ids that commits
    -- after this read makes the INSERT fail the same way.
    IF p_lookup THEN
        FOR r IN SELECT u.ord::integer AS ord, t AS stored
                   FROM unnest(p_ids) WITH ORDINALITY AS u(id, ord)
                   -- = ANY: reached by primary key in any plan (never a walk of the whole index)
                   JOIN ledger_transfers t ON t.id = u.id AND t.id = ANY (p_ids)
        LOOP
            ex[r.ord] := r.stored;
            known_ids := known_ids || (r.stored).id;
            any_stored := true;
        END LOOP;
        SELECT coalesce(array_agg(DISTINCT t.group_id), '{}') INTO posted_groups
          FROM ledger_transfers t
         WHERE t.group_id = ANY (p_group);
        IF cardinality(posted_groups) > 0 THEN
            any_stored := true;
        END IF;
    ELSIF EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.group_id = ANY (p_group)) THEN
        -- A group of the batch is posted already: a replay of it, or transfers that may not join
        -- it. Either way the attempt that reads what is stored decides.
        RAISE EXCEPTION USING ERRCODE = 'unique_violation',
                              MESSAGE = 'a group of the batch is posted: evaluate the batch as a replay';
    END IF;

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
            IF p_group[i] = ANY (posted_groups) THEN
                -- A new id under a posted group's id: the group exists, with other content.
                statuses[i] := 'exists_with_different_content';
                group_failed := true;
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

    -- A refusal may hide a replay: a stored transfer whose group is refused now (the float ran low
    -- since, say) must report exists. So an attempt that refused anything looks for stored ids it
    -- did not read (all of them on a first attempt; on a later one, those committed since its read).
    IF EXISTS (SELECT 1 FROM unnest(statuses) AS s(status) WHERE s.status NOT IN ('ok', 'exists'))
       AND EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.id = ANY (p_ids) AND t.id <> ALL (known_ids)) THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation',
                              MESSAGE = 'a refused transfer''s id is stored: evaluate the batch as a replay';
    END IF;

    -- A group's first transfer opens it (groups are consecutive; one that posts, posts its first).
    INSERT INTO ledger_transfers (id, seq, debit_account_id, credit_account_id, amount_minor, currency, kind,
                                  group_id, metadata, debit_balance_after_minor, credit_balance_after_minor,
                                  created_at, hash, opens_group)
    SELECT u.id, u.seq, u.debit, u.credit, u.amount, u.currency, u.kind, u.group_id, u.metadata,
           u.debit_after, u.credit_after, posted_at, u.hash,
           u.group_id IS NOT NULL AND u.group_id IS DISTINCT FROM p_group[u.ord::integer - 1]
      FROM unnest(p_ids, seqs, p_debit, p_credit, p_amount, p_currency, p_kind, p_group, p_metadata,
                  debit_afters, credit_afters, statuses, hashes) WITH ORDINALITY
           AS u(id, seq, debit, credit, amount, currency, kind, group_id, metadata, debit_after, credit_after,
                status, hash, ord)
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
