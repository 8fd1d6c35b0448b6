-- An event the engine turned down waits a growing delay of its own; relays share a backlog.
--
-- Before, a round in which the engine turned down every event (0030_outbox_turns.sql) made the
-- relay double its pause before the next round, up to 30 s, as for an engine that does not answer.
-- With one such event waiting, a payment made meanwhile waited that long before the relay looked
-- again. Now the relay pauses only for an unavailable engine. An event turned down (refused or
-- failed, counted or not) is stamped: `turned_down_at` (as before), `turned_down_count`, and
-- `retry_at`, after a delay that doubles with each turn-down up to a maximum (the relay passes
-- both, gateway/outbox.py). Until then no round takes it, and among the events that are due, those
-- never turned down come first, oldest first, then those due longest ago.
ALTER TABLE outbox ADD COLUMN turned_down_count integer NOT NULL DEFAULT 0,
                   ADD COLUMN retry_at timestamptz;
-- The walk below, in the order it takes events. It replaces 0030's index on turned_down_at, which
-- nothing orders by now (each index is written by every payment).
CREATE INDEX outbox_waiting_retry ON outbox (retry_at NULLS FIRST, event_id) WHERE delivered_at IS NULL;
DROP INDEX outbox_waiting_turn;

-- A relay's round: up to p_events_max events that are due, not parked (p_attempts_max) and that
-- no other relay holds, each held by this session's advisory lock on its event id (the two-int4
-- form, which nothing else in vendgate uses) until the round ends (pg_advisory_unlock_all).
--
-- Before, a round read the oldest 100 waiting events and then tried their locks: while one relay
-- held those, another found nothing, however many waited behind them. Now the lock is tried while
-- the events are walked in order, and the walk goes on past the events another relay holds until
-- enough are taken. The lock is tried here, in the loop, on each event the walk reaches and on no
-- other, whatever plan the walk's query gets: a lock tried in the query beside its scan could be
-- tried on every waiting event (under a plan that sorts them, say), and a backlog of tens of
-- thousands would fill PostgreSQL's shared lock table. The walk ends at the first event not due
-- (the rest of the order is later still) or once p_events_max are taken.
--
-- Each event is read again once locked, in a snapshot taken after the lock: the walk's snapshot is
-- older, and another relay may have delivered, counted or turned down the event and released it
-- since; it marks an event before it releases its lock, so the second read sees what it did.
-- A reversal's event is taken only once its payment's event is delivered (delivered stays
-- delivered, so the walk's older snapshot is enough for that).
CREATE FUNCTION outbox_take(p_events_max integer, p_attempts_max integer) RETURNS SETOF outbox
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    waiting CURSOR FOR
        SELECT o.event_id, o.retry_at FROM outbox o
        WHERE o.delivered_at IS NULL AND o.attempts < p_attempts_max
          AND (o.kind <> 'payment_reversed'
               OR NOT EXISTS (SELECT 1 FROM outbox e
                               WHERE e.delivered_at IS NULL AND e.event_id < o.event_id
                                 AND e.client_txn_id = o.client_txn_id))
        ORDER BY o.retry_at NULLS FIRST, o.event_id;
    taken integer := 0;
BEGIN
    IF p_events_max < 1 THEN
        RETURN;
    END IF;
    FOR w IN waiting LOOP
        EXIT WHEN w.retry_at > now();
        CONTINUE WHEN NOT pg_try_advisory_lock((w.event_id >> 31)::integer, (w.event_id & 2147483647)::integer);
        RETURN QUERY SELECT * FROM outbox o
                      WHERE o.event_id = w.event_id AND o.delivered_at IS NULL AND o.attempts < p_attempts_max
                        AND (o.retry_at IS NULL OR o.retry_at <= now());
        IF FOUND THEN
            taken := taken + 1;
            EXIT WHEN taken >= p_events_max;
        ELSE
            PERFORM pg_advisory_unlock((w.event_id >> 31)::integer, (w.event_id & 2147483647)::integer);
        END IF;
    END LOOP;
END
$$;
