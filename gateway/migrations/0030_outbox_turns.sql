-- Events the engine turned down without it counting take their turn after the others.
--
-- A relay round takes the oldest waiting events (up to 100). When the engine fails on every one
-- of them (a 5xx, or a refusal that may be about the URL), in the batch and one by one, nothing
-- was delivered, so nothing is counted against them: it cannot tell a broken engine from events
-- it breaks on. Before, the next round took the same oldest events, so a run of 100 such events
-- (a terminal's day of offline advices, say) held back every event behind it for good. Now such
-- a round stamps them `turned_down_at`, and a round takes events never turned down first, oldest
-- first, then those turned down longest ago: the events behind the run are sent, and once one is
-- delivered the run's failures in a round beside it count, up to parking. A delivered or counted
-- event keeps its stamp; an outage (no answer, 503) stamps nothing, so a backlog keeps its order.
ALTER TABLE outbox ADD COLUMN turned_down_at timestamptz;
CREATE INDEX outbox_waiting_turn ON outbox (turned_down_at NULLS FIRST, event_id) WHERE delivered_at IS NULL;
