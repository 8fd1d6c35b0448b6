-- A payment's reversal reaches the prepayment engine only after the payment itself.
--
-- The relay sends the oldest undelivered events and, when the engine refuses a batch, each event
-- on its own, so one the engine cannot take holds back no other. That let a payment_reversed go
-- while its payment_received had been refused (or parked, or was being sent by another gateway's
-- relay): the engine met the reversal of a payment it never had. The relay now takes an event
-- only when no earlier event of its payment (client_txn_id) is undelivered (gateway/sql.py,
-- OUTBOX_PENDING); this index finds those by key, whatever the backlog.
CREATE INDEX outbox_pending_by_txn ON outbox (client_txn_id, event_id) WHERE delivered_at IS NULL;
