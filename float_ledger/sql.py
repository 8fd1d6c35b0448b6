"""Every SQL statement of the float ledger: named, parameterised constants (a test prepares each).

Schema: gateway/migrations/0002_ledger.sql, with posting as 0011_posting_speed.sql redefines it.
Posting is one call of ledger_apply_transfers(), a PL/pgSQL function over parallel arrays, so a
batch costs one round trip.
"""

from __future__ import annotations

# -- accounts ---------------------------------------------------------------------------------------

SQL_CREATE_ACCOUNT = """
INSERT INTO ledger_accounts (kind, currency, owner_ref, lower_bound_minor, low_threshold_minor)
VALUES ($1, $2, $3, $4, $5)
RETURNING id"""

SQL_GET_ACCOUNT = """
SELECT id, kind, currency, owner_ref, balance_minor, lower_bound_minor, low_threshold_minor, blocked, created_at
  FROM ledger_accounts
 WHERE id = $1"""

SQL_FIND_ACCOUNTS = """
SELECT id, kind, currency, owner_ref, balance_minor, lower_bound_minor, low_threshold_minor, blocked, created_at
  FROM ledger_accounts
 WHERE owner_ref = $1 AND ($2::text IS NULL OR kind = $2)
 ORDER BY id"""

SQL_BALANCE = "SELECT balance_minor FROM ledger_accounts WHERE id = $1"

SQL_SET_BLOCKED = "UPDATE ledger_accounts SET blocked = $2 WHERE id = $1 RETURNING id"

# The account's new threshold ($2, NULL: none) and the event the change causes: below it now and
# not below the old one (or none), float_below_threshold; below the old one and not the new one,
# float_restored. The row lock orders it with postings, so the balance it compares is current.
# Returns no row when the account is missing.
SQL_SET_LOW_THRESHOLD = """
WITH old AS (
    SELECT id, low_threshold_minor AS threshold FROM ledger_accounts WHERE id = $1 FOR NO KEY UPDATE
), changed AS (
    UPDATE ledger_accounts a SET low_threshold_minor = $2::bigint
      FROM old
     WHERE a.id = old.id
    RETURNING a.id, a.balance_minor,
              old.threshold IS NOT NULL AND a.balance_minor < old.threshold AS was_below,
              $2::bigint IS NOT NULL AND a.balance_minor < $2::bigint AS is_below, old.threshold AS old_threshold
), event AS (
    INSERT INTO ledger_events (kind, account_id, transfer_id, balance_minor, threshold_minor, created_at)
    SELECT CASE WHEN c.is_below THEN 'float_below_threshold' ELSE 'float_restored' END, c.id, NULL,
           c.balance_minor, coalesce($2::bigint, c.old_threshold), clock_timestamp()
      FROM changed c
     WHERE c.is_below <> c.was_below
)
SELECT id FROM changed"""

# Returns no row when the account is missing; ok = false when the balance is below the new bound.
SQL_SET_LOWER_BOUND = """
WITH target AS (SELECT id, kind, balance_minor FROM ledger_accounts WHERE id = $1 FOR NO KEY UPDATE),
     changed AS (
         UPDATE ledger_accounts a SET lower_bound_minor = $2::bigint
           FROM target
          WHERE a.id = target.id AND ($2::bigint IS NULL OR target.balance_minor >= $2::bigint)
            AND (target.kind <> 'agent_float' OR $2::bigint = 0)
         RETURNING a.id)
SELECT target.kind, target.balance_minor, EXISTS (SELECT 1 FROM changed) AS ok FROM target"""

# -- posting ----------------------------------------------------------------------------------------

SQL_APPLY_TRANSFERS = """
SELECT statuses, seqs, created_ats, debit_afters, credit_afters, posted_at
  FROM ledger_apply_transfers($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[],
                              $7::uuid[], $8::jsonb[])"""

_TRANSFER_COLUMNS = """id, debit_account_id, credit_account_id, amount_minor, currency, kind, group_id, metadata,
       seq, created_at, debit_balance_after_minor, credit_balance_after_minor"""

SQL_GET_TRANSFER = f"SELECT {_TRANSFER_COLUMNS} FROM ledger_transfers WHERE id = $1"

SQL_GROUP_TRANSFERS = f"SELECT {_TRANSFER_COLUMNS} FROM ledger_transfers WHERE group_id = $1 ORDER BY seq"

# -- balances and statements ------------------------------------------------------------------------

# The balance after the account's last transfer at or before $2; 0 before its first. No row: no account.
SQL_BALANCE_AS_OF = """
SELECT coalesce((
    SELECT legs.balance_after
      FROM ((SELECT debit_balance_after_minor AS balance_after, created_at, seq FROM ledger_transfers
              WHERE debit_account_id = $1 AND created_at <= $2 ORDER BY created_at DESC, seq DESC LIMIT 1)
            UNION ALL
            (SELECT credit_balance_after_minor, created_at, seq FROM ledger_transfers
              WHERE credit_account_id = $1 AND created_at <= $2 ORDER BY created_at DESC, seq DESC LIMIT 1)) legs
     ORDER BY legs.created_at DESC, legs.seq DESC
     LIMIT 1), 0) AS balance_minor
  FROM ledger_accounts WHERE id = $1"""

# The transactions still open that may yet commit transfers dated at or before $1: every one
# holding a transaction id (each holds the lock on its own id while it runs, and a posting has one
# once it holds its account locks, before it dates its transfers), but this session's, those of
# other databases of the server (they cannot post here) and those that began after $1 (their
# transfers are dated later). pg_locks shows every role's backends; a backend whose start this
# role cannot see in pg_stat_activity (other roles' xact_start is hidden) is kept. A prepared
# transaction (two-phase commit) has no backend (pid NULL): this database's are all kept, their
# start unknown.
SQL_OPEN_BEFORE = """
SELECT coalesce(array_agg(l.transactionid::text), '{}') AS xids
  FROM pg_locks l
 WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
   AND l.pid IS DISTINCT FROM pg_backend_pid()
   AND CASE WHEN l.pid IS NULL
            THEN EXISTS (SELECT 1 FROM pg_prepared_xacts p
                          WHERE p.transaction = l.transactionid AND p.database = current_database())
            ELSE NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                              WHERE a.pid = l.pid
                                AND (a.xact_start > $1
                                     OR a.datid IS DISTINCT FROM (SELECT d.oid FROM pg_database d
                                                                   WHERE d.datname = current_database())))
       END"""
# Of those, the ones still open: a backend's pid, or a prepared transaction's name.
SQL_STILL_OPEN = """
SELECT l.transactionid::text AS xid,
       coalesce('backend pid ' || l.pid,
                'prepared transaction ' || quote_literal((SELECT p.gid FROM pg_prepared_xacts p
                                                           WHERE p.transaction = l.transactionid))) AS holder
  FROM pg_locks l
 WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
   AND l.transactionid::text = ANY ($1::text[])"""

SQL_ISOLATION = "SELECT current_setting('transaction_isolation')"

# As above, strictly before $2: the opening balance of a period starting at $2.
SQL_BALANCE_BEFORE = """
SELECT coalesce((
    SELECT legs.balance_after
      FROM ((SELECT debit_balance_after_minor AS balance_after, created_at, seq FROM ledger_transfers
              WHERE debit_account_id = $1 AND created_at < $2 ORDER BY created_at DESC, seq DESC LIMIT 1)
            UNION ALL
            (SELECT credit_balance_after_minor, created_at, seq FROM ledger_transfers
              WHERE credit_account_id = $1 AND created_at < $2 ORDER BY created_at DESC, seq DESC LIMIT 1)) legs
     ORDER BY legs.created_at DESC, legs.seq DESC
     LIMIT 1), 0) AS balance_minor
  FROM ledger_accounts WHERE id = $1"""

# Keyset paging on (created_at, seq), which per account is posting order.
SQL_STATEMENT = """
SELECT legs.* FROM (
    (SELECT id, seq, created_at, kind, -amount_minor AS amount_minor, debit_balance_after_minor AS balance_after_minor,
            credit_account_id AS counterparty_account_id, group_id, metadata
       FROM ledger_transfers
      WHERE debit_account_id = $1 AND (created_at, seq) > ($2, $3)
      ORDER BY created_at, seq LIMIT $4)
    UNION ALL
    (SELECT id, seq, created_at, kind, amount_minor, credit_balance_after_minor,
            debit_account_id, group_id, metadata
       FROM ledger_transfers
      WHERE credit_account_id = $1 AND (created_at, seq) > ($2, $3)
      ORDER BY created_at, seq LIMIT $4)) legs
 ORDER BY legs.created_at, legs.seq
 LIMIT $4"""

# -- events -----------------------------------------------------------------------------------------

# Events after the cursor (txid, id), of transactions that ended before any still running began:
# every event written later has a higher txid, so none can appear behind the cursor.
SQL_EVENTS_AFTER = """
SELECT id, kind, account_id, transfer_id, balance_minor, threshold_minor, created_at, txid::text AS txid
  FROM ledger_events
 WHERE (txid, id) > ($1::text::xid8, $2)
   AND txid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY txid, id
 LIMIT $3"""

# -- deposits ---------------------------------------------------------------------------------------

_DEPOSIT_COLUMNS = """id, float_account_id, source_account_id, amount_minor, currency, external_ref, maker, checker,
       metadata, status, reason, requested_at, decided_at"""

# No row returned: the id or the (source account, external reference) is already taken.
SQL_INSERT_DEPOSIT = f"""
INSERT INTO ledger_deposits (id, float_account_id, source_account_id, amount_minor, currency, external_ref, maker,
                             metadata, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)
ON CONFLICT DO NOTHING
RETURNING {_DEPOSIT_COLUMNS}"""

SQL_GET_DEPOSIT = f"SELECT {_DEPOSIT_COLUMNS} FROM ledger_deposits WHERE id = $1"

SQL_LOCK_DEPOSIT = f"SELECT {_DEPOSIT_COLUMNS} FROM ledger_deposits WHERE id = $1 FOR UPDATE"

# The deposit holding the reference: pending approval or posted (a rejected or refused one frees it).
# A reference is compared by its key, ledger_deposit_ref_key (0020_deposit_ref_spellings.sql): one
# reference however it is spelled (case, full-width letters, spaces).
SQL_DEPOSIT_BY_EXTERNAL_REF = f"""
SELECT {_DEPOSIT_COLUMNS} FROM ledger_deposits
 WHERE source_account_id = $1 AND ledger_deposit_ref_key(external_ref) = ledger_deposit_ref_key($2)
   AND status IN ('pending_approval', 'posted')"""

# Deposits of one reference that credited nothing (rejected or refused): each frees the reference.
SQL_DEAD_DEPOSITS_OF_REF = """
SELECT count(*) FROM ledger_deposits
 WHERE source_account_id = $1 AND ledger_deposit_ref_key(external_ref) = ledger_deposit_ref_key($2)
   AND status IN ('rejected', 'refused')"""

SQL_DECIDE_DEPOSIT = f"""
UPDATE ledger_deposits SET status = $2, checker = $3, reason = $4, decided_at = now()
 WHERE id = $1
RETURNING {_DEPOSIT_COLUMNS}"""

SQL_PENDING_DEPOSITS = f"""
SELECT {_DEPOSIT_COLUMNS} FROM ledger_deposits
 WHERE status = 'pending_approval'
 ORDER BY requested_at, id
 LIMIT $1"""

SQL_PENDING_COUNT = "SELECT count(*) FROM ledger_deposits WHERE status = 'pending_approval'"

# -- reconciliation ---------------------------------------------------------------------------------

SQL_FLOAT_ACCOUNT = "SELECT owner_ref, currency, kind FROM ledger_accounts WHERE id = $1"

# The float's movements in [$2, $3), by kind, direction and terminal.
SQL_RECONCILE_FLOAT = """
SELECT kind, metadata ->> 'reversed_kind' AS reversed_kind, metadata ->> 'terminal_id' AS terminal_id,
       credit_account_id = $1 AS credited, count(*) AS transfers, sum(amount_minor) AS amount_minor
  FROM ledger_transfers
 WHERE (debit_account_id = $1 OR credit_account_id = $1) AND created_at >= $2 AND created_at < $3
 GROUP BY 1, 2, 3, 4"""

# Commission credited in [$2, $3) to the commission_payable accounts in currency $4 owned by $1 (the
# float's owner and currency: an agent paid in two currencies has a float and a payable in each),
# less reversals of it, by terminal; amounts are signed.
SQL_RECONCILE_COMMISSION = """
SELECT legs.terminal_id, count(*) AS transfers, sum(legs.signed_minor) AS amount_minor
  FROM ledger_accounts p
 CROSS JOIN LATERAL (
       SELECT t.metadata ->> 'terminal_id' AS terminal_id, t.amount_minor AS signed_minor
         FROM ledger_transfers t
        WHERE t.credit_account_id = p.id AND t.created_at >= $2 AND t.created_at < $3 AND t.kind = 'commission'
       UNION ALL
       SELECT t.metadata ->> 'terminal_id', -t.amount_minor
         FROM ledger_transfers t
        WHERE t.debit_account_id = p.id AND t.created_at >= $2 AND t.created_at < $3 AND t.kind = 'reversal'
          AND t.metadata ->> 'reversed_kind' = 'commission') legs
 WHERE p.owner_ref = $1 AND p.kind = 'commission_payable' AND p.currency = $4
 GROUP BY legs.terminal_id"""

# -- ledger check -----------------------------------------------------------------------------------

SQL_CHECK_COUNTS = """
SELECT (SELECT count(*) FROM ledger_transfers) AS transfers,
       (SELECT count(*) FROM ledger_accounts) AS accounts,
       (SELECT count(DISTINCT currency) FROM ledger_accounts) AS currencies"""

# Each transfer: a positive amount from one account to another, both of the transfer's currency.
SQL_CHECK_UNBALANCED = """
SELECT t.id, t.amount_minor, t.debit_account_id, t.credit_account_id, t.currency,
       d.currency AS debit_currency, c.currency AS credit_currency
  FROM ledger_transfers t
  LEFT JOIN ledger_accounts d ON d.id = t.debit_account_id
  LEFT JOIN ledger_accounts c ON c.id = t.credit_account_id
 WHERE t.amount_minor <= 0 OR t.debit_account_id = t.credit_account_id
    OR d.id IS NULL OR c.id IS NULL OR d.currency <> t.currency OR c.currency <> t.currency
 ORDER BY t.seq
 LIMIT $1"""

SQL_CHECK_CURRENCY_SUMS = """
SELECT currency, sum(balance_minor)::numeric AS total_minor
  FROM ledger_accounts GROUP BY currency HAVING sum(balance_minor) <> 0 ORDER BY currency"""

# Stored balance against credits minus debits.
SQL_CHECK_BALANCE_SUMS = """
SELECT a.id, a.balance_minor, coalesce(s.total_minor, 0) AS transfers_minor
  FROM ledger_accounts a
  LEFT JOIN (SELECT account_id, sum(delta)::numeric AS total_minor
               FROM (SELECT debit_account_id AS account_id, -amount_minor AS delta FROM ledger_transfers
                     UNION ALL
                     SELECT credit_account_id, amount_minor FROM ledger_transfers) legs
              GROUP BY account_id) s ON s.account_id = a.id
 WHERE a.balance_minor <> coalesce(s.total_minor, 0)
 ORDER BY a.id
 LIMIT $1"""

# seq orders every account's legs: each transfer holds its own (no index enforces it; the
# sequence hands each out once).
SQL_CHECK_DUPLICATE_SEQS = """
SELECT seq, count(*) AS transfers
  FROM ledger_transfers
 GROUP BY seq
HAVING count(*) > 1
 ORDER BY seq
 LIMIT $1"""

# Each leg's balance after = the previous leg's (in seq order) + its signed amount; and the
# account's created_at never goes back as seq goes up.
SQL_CHECK_RUNNING_BALANCES = """
SELECT x.account_id, x.id, x.balance_after, x.expected, x.created_at, x.previous_created_at
  FROM (SELECT legs.*,
               -- numeric: a corrupted balance near bigint's limit is reported, not an overflow
               coalesce(lag(balance_after) OVER w, 0)::numeric + delta AS expected,
               lag(created_at) OVER w AS previous_created_at
          FROM (SELECT id, seq, created_at, debit_account_id AS account_id, -amount_minor AS delta,
                       debit_balance_after_minor AS balance_after
                  FROM ledger_transfers
                UNION ALL
                SELECT id, seq, created_at, credit_account_id, amount_minor, credit_balance_after_minor
                  FROM ledger_transfers) legs
        WINDOW w AS (PARTITION BY account_id ORDER BY seq)) x
 WHERE x.balance_after <> x.expected OR x.created_at < x.previous_created_at
 ORDER BY x.account_id, x.seq
 LIMIT $1"""

# Each linked group was posted by one call, all at once: its transfers share one posting time; and
# the transfer marked as opening it (0023_groups_posted_once.sql; groups posted before are
# unmarked) is one, its first.
SQL_CHECK_GROUPS = """
SELECT group_id, count(*) AS transfers, min(created_at) AS first_at, max(created_at) AS last_at,
       count(*) FILTER (WHERE opens_group) AS openers, min(seq) AS first_seq,
       min(seq) FILTER (WHERE opens_group) AS opener_seq
  FROM ledger_transfers
 WHERE group_id IS NOT NULL
 GROUP BY group_id
HAVING min(created_at) <> max(created_at) OR count(*) FILTER (WHERE opens_group) > 1
    OR min(seq) FILTER (WHERE opens_group) <> min(seq)
 ORDER BY min(seq)
 LIMIT $1"""

# Every balance at or above its bound; and an agent's float never below 0 whatever its bound says
# (the bound is a column like any other: set to NULL or below 0, it would let the float go under).
SQL_CHECK_BOUNDS = """
SELECT id, kind, balance_minor, lower_bound_minor FROM ledger_accounts
 WHERE (lower_bound_minor IS NOT NULL AND balance_minor < lower_bound_minor)
    OR (kind = 'agent_float' AND (balance_minor < 0 OR lower_bound_minor IS NULL OR lower_bound_minor < 0))
 ORDER BY id
 LIMIT $1"""

# A transfer posted before one of its accounts was opened: the posting function stamps a transfer
# no earlier than its accounts' last posting, and an account's opening time never changes.
SQL_CHECK_BEFORE_OPENING = """
SELECT t.id, t.created_at, CASE WHEN d.created_at >= c.created_at THEN d.id ELSE c.id END AS account_id,
       greatest(d.created_at, c.created_at) AS opened_at
  FROM ledger_transfers t
  JOIN ledger_accounts d ON d.id = t.debit_account_id
  JOIN ledger_accounts c ON c.id = t.credit_account_id
 WHERE t.created_at < greatest(d.created_at, c.created_at)
 ORDER BY t.seq
 LIMIT $1"""

# Dated more than $1 seconds after the check's transaction began (its snapshot's clock).
SQL_CHECK_FUTURE_DATED = """
SELECT id, created_at, now() AS checked_at FROM ledger_transfers
 WHERE created_at > now() + make_interval(secs => $1)
 ORDER BY seq
 LIMIT $2"""

# For the checks' transaction: built-ins (sha256...) resolve to PostgreSQL's own whatever schema
# precedes pg_catalog in the session's search_path (the database's or the role's default); the
# tables resolve as before.
SQL_PIN_CATALOG_FIRST = "SELECT set_config('search_path', 'pg_catalog, ' || current_setting('search_path'), true)"

# The hash functions SQL_CHECK_HASHES recomputes the chain with ($1), as the catalog has them: how
# many functions of that name there are in any schema, and the source of the one the check's
# statements resolve, to compare with what the migrations installed (a replaced one could answer
# each transfer's stored hash and so hide any change).
SQL_CHECK_HASH_FUNCTIONS = """
SELECT n.name,
       (SELECT count(*) FROM pg_proc p WHERE p.proname = n.name) AS definitions,
       (SELECT encode(sha256(convert_to(l.lanname || ':' || p.prosrc, 'UTF8')), 'hex')
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.oid = to_regproc(n.name)) AS source_sha256
  FROM unnest($1::text[]) WITH ORDINALITY AS n(name, position)
 ORDER BY n.position"""

# Recompute each transfer's hash from its columns and the previous hash of both its accounts.
SQL_CHECK_HASHES = """
WITH legs AS (
    SELECT id, seq, debit_account_id AS account_id, true AS is_debit, hash FROM ledger_transfers
    UNION ALL
    SELECT id, seq, credit_account_id, false, hash FROM ledger_transfers),
chained AS (
    SELECT id, is_debit,
           coalesce(lag(hash) OVER (PARTITION BY account_id ORDER BY seq), ledger_genesis_hash(account_id))
               AS previous_hash
      FROM legs),
paired AS (
    SELECT id, (array_agg(previous_hash) FILTER (WHERE is_debit))[1] AS previous_debit_hash,
           (array_agg(previous_hash) FILTER (WHERE NOT is_debit))[1] AS previous_credit_hash
      FROM chained
     GROUP BY id)
SELECT t.id, t.seq
  FROM ledger_transfers t
  JOIN paired p ON p.id = t.id
 WHERE t.hash IS DISTINCT FROM ledger_transfer_hash(
           p.previous_debit_hash, p.previous_credit_hash,
           ledger_transfer_content_hash(t.id, t.debit_account_id, t.credit_account_id, t.amount_minor, t.currency,
                                        t.kind, t.group_id, t.metadata),
           t.seq, t.debit_balance_after_minor, t.credit_balance_after_minor, t.created_at)
 ORDER BY t.seq
 LIMIT $1"""

# Each account's stored chain tip is the hash of its last transfer, and its posting clock that
# transfer's time (both NULL without transfers). A clock moved ahead would date every later
# posting of the account after it (a posting is never stamped before its accounts' last).
SQL_CHECK_CHAIN_TIPS = """
WITH last AS (
    SELECT DISTINCT ON (legs.account_id) legs.account_id, legs.hash, legs.created_at
      FROM (SELECT debit_account_id AS account_id, seq, hash, created_at FROM ledger_transfers
            UNION ALL
            SELECT credit_account_id, seq, hash, created_at FROM ledger_transfers) legs
     ORDER BY legs.account_id, legs.seq DESC)
SELECT a.id, a.chain_hash IS DISTINCT FROM last.hash AS tip_differs, a.last_transfer_at,
       last.created_at AS last_created_at
  FROM ledger_accounts a
  LEFT JOIN last ON last.account_id = a.id
 WHERE a.chain_hash IS DISTINCT FROM last.hash OR a.last_transfer_at IS DISTINCT FROM last.created_at
 ORDER BY a.id
 LIMIT $1"""

# Each float deposit against the ledger. A posted one's transfer (the deposit's id) is a deposit
# of its amount from its source to its float, its reference, maker and checker in its metadata;
# a deposit not posted (pending, rejected, refused) has no deposit into its float under its id.
SQL_CHECK_DEPOSITS = """
SELECT d.id, d.status, t.id IS NOT NULL AS has_transfer
  FROM ledger_deposits d
  LEFT JOIN ledger_transfers t ON t.id = d.id
 WHERE CASE WHEN d.status = 'posted' THEN
                t.id IS NULL OR t.kind <> 'deposit' OR t.debit_account_id <> d.source_account_id
                OR t.credit_account_id <> d.float_account_id OR t.amount_minor <> d.amount_minor
                OR t.currency <> d.currency
                OR t.metadata ->> 'external_ref' IS DISTINCT FROM d.external_ref
                OR t.metadata ->> 'maker' IS DISTINCT FROM d.maker
                OR t.metadata ->> 'checker' IS DISTINCT FROM d.checker
            ELSE t.id IS NOT NULL AND t.kind = 'deposit' AND t.credit_account_id = d.float_account_id END
 ORDER BY d.requested_at, d.id
 LIMIT $1"""

# One digest over every account's chain tip: record it to notice a rewrite of the whole history.
SQL_LEDGER_DIGEST = """
SELECT sha256(coalesce(string_agg(id::text || ':' || coalesce(encode(chain_hash, 'hex'), '-'), ',' ORDER BY id),
                       '')::bytea) AS digest
  FROM ledger_accounts"""

# Each protecting trigger ($1 its name, $2 its table, resolved as the gateway's statements resolve
# it) as the catalog has it: NULLs when that table has no trigger of that name, with the tables
# that have one instead; tgenabled, tgtype (timing, level, events), the UPDATE OF columns, the
# definition (for its WHEN clause), and the function it calls with a hash of that function's
# source, to compare with the one the migrations installed (float_ledger.check.trigger_problems).
SQL_CHECK_TRIGGERS = """
SELECT expected.name,
       t.oid IS NOT NULL AS on_table,
       ARRAY(SELECT o.tgrelid::regclass::text
               FROM pg_trigger o
              WHERE o.tgname = expected.name AND NOT o.tgisinternal
                AND o.tgrelid IS DISTINCT FROM to_regclass(expected.table_name)
              ORDER BY 1) AS elsewhere,
       t.tgenabled::text AS tgenabled,
       t.tgtype::int AS tgtype,
       ARRAY(SELECT a.attname::text
               FROM unnest(t.tgattr::int2[]) WITH ORDINALITY AS k(attnum, position)
               JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = k.attnum
              ORDER BY k.position) AS columns,
       pg_get_triggerdef(t.oid) AS definition,
       c.relnamespace::regnamespace::text AS table_schema,
       p.proname::text AS function_name,
       p.pronamespace::regnamespace::text AS function_schema,
       l.lanname::text AS function_language,
       encode(sha256(convert_to(p.prosrc, 'UTF8')), 'hex') AS function_source_sha256
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS expected(name, table_name, position)
  LEFT JOIN pg_trigger t
         ON t.tgname = expected.name AND t.tgrelid = to_regclass(expected.table_name) AND NOT t.tgisinternal
  LEFT JOIN pg_class c ON c.oid = t.tgrelid
  LEFT JOIN pg_proc p ON p.oid = t.tgfoid
  LEFT JOIN pg_language l ON l.oid = p.prolang
 ORDER BY expected.position"""
