-- A low-float threshold changed across the balance is a crossing too.
--
-- A low-float event was written only by a posting that took a balance across its threshold. A
-- threshold raised above the float (or set where there was none) left the float below it with no
-- event, and none came until a deposit lifted the float above it and a payment took it down
-- again: the agent was not warned while already short. set_low_threshold() now writes the event
-- its change causes, float_below_threshold or float_restored, in the statement that changes it;
-- such an event names no transfer.
ALTER TABLE ledger_events ALTER COLUMN transfer_id DROP NOT NULL;
