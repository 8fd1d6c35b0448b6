-- A retired terminal's serial can be registered again.
--
-- Retirement is final (gateway/registry.py set_terminal_status): the record, its key and its
-- receipts stay, and a device put back into service is registered anew, under a terminal id and
-- a key of its own. But a serial was unique over every terminal ever registered, so the device
-- itself (its serial) could never be registered again. A serial is now unique among the
-- terminals not retired.
ALTER TABLE terminals DROP CONSTRAINT terminals_serial_key;
CREATE UNIQUE INDEX terminals_serial_in_service ON terminals (serial) WHERE status <> 'retired';
