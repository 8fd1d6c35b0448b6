-- Registry and vending: agents, terminals, kiosks, customers, meters, tariffs, vending keys,
-- transactions (the idempotency record), receipts, tokens, reversals and the engine outbox.
-- Ledger accounts and transfers live in 0002_ledger.sql; rows here refer to account ids.

CREATE TABLE agents (
    agent_id                    bigserial PRIMARY KEY,
    kind                        text NOT NULL
        CHECK (kind IN ('shop', 'property_manager', 'village', 'mobile_hall', 'staff')),
    name                        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    contact                     text NOT NULL DEFAULT '',
    currency                    char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    float_account_id            bigint NOT NULL UNIQUE,
    commission_account_id       bigint NOT NULL UNIQUE,
    commission_rate_bp          integer NOT NULL DEFAULT 0 CHECK (commission_rate_bp BETWEEN 0 AND 10000),
    low_float_threshold_minor   bigint NOT NULL DEFAULT 0 CHECK (low_float_threshold_minor >= 0),
    time_zone                   text NOT NULL DEFAULT 'UTC',
    created_at                  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE terminals (
    terminal_id            text PRIMARY KEY CHECK (terminal_id ~ '^[A-Z0-9]{8}$'),
    serial                 text NOT NULL UNIQUE,
    model                  text NOT NULL DEFAULT '',
    kind                   text NOT NULL CHECK (kind IN ('pos', 'kiosk')),
    agent_id               bigint NOT NULL REFERENCES agents,
    location               text NOT NULL DEFAULT '',
    status                 text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked', 'retired')),
    allowed_operations     text[] NOT NULL DEFAULT ARRAY['lookup', 'topup', 'reversal', 'reprint', 'float', 'advice', 'eod'],
    txn_min_minor          bigint NOT NULL DEFAULT 1 CHECK (txn_min_minor > 0),
    txn_max_minor          bigint NOT NULL DEFAULT 100000000 CHECK (txn_max_minor >= txn_min_minor),
    daily_limit_minor      bigint NOT NULL DEFAULT 1000000000 CHECK (daily_limit_minor > 0),
    key_version            integer NOT NULL DEFAULT 1,
    key_ciphertext         bytea NOT NULL,
    receipt_seq            bigint NOT NULL DEFAULT 0 CHECK (receipt_seq >= 0),
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX terminals_agent ON terminals (agent_id);

-- Approved amount per terminal and business day, kept in step by the vending batch.
CREATE TABLE terminal_daily_totals (
    terminal_id     text NOT NULL REFERENCES terminals,
    business_date   date NOT NULL,
    approved_count  bigint NOT NULL DEFAULT 0,
    approved_minor  bigint NOT NULL DEFAULT 0 CHECK (approved_minor >= 0),
    PRIMARY KEY (terminal_id, business_date)
);

CREATE TABLE kiosk_certificates (
    serial_hex      text PRIMARY KEY,
    terminal_id     text NOT NULL REFERENCES terminals,
    fingerprint     text NOT NULL UNIQUE,
    not_after       timestamptz NOT NULL,
    revoked_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tariffs (
    tariff_code                 text NOT NULL,
    valid_from                  timestamptz NOT NULL,
    currency                    char(3) NOT NULL,
    energy_price_minor_per_mwh  bigint NOT NULL CHECK (energy_price_minor_per_mwh > 0),
    energy_vat_rate_bp          integer NOT NULL CHECK (energy_vat_rate_bp BETWEEN 0 AND 10000),
    fee_per_purchase_minor      bigint NOT NULL DEFAULT 0 CHECK (fee_per_purchase_minor >= 0),
    fee_vat_rate_bp             integer NOT NULL DEFAULT 0 CHECK (fee_vat_rate_bp BETWEEN 0 AND 10000),
    PRIMARY KEY (tariff_code, valid_from)
);

CREATE TABLE vending_keys (
    supply_group_code   text NOT NULL CHECK (supply_group_code ~ '^[0-9]{6}$'),
    key_revision        integer NOT NULL CHECK (key_revision BETWEEN 1 AND 9),
    key_type            integer NOT NULL CHECK (key_type BETWEEN 0 AND 3),
    key_ciphertext      bytea NOT NULL,
    PRIMARY KEY (supply_group_code, key_revision)
);

CREATE TABLE customers (
    customer_id                 bigserial PRIMARY KEY,
    account_number              text NOT NULL UNIQUE,
    name                        text NOT NULL,
    address                     text NOT NULL DEFAULT '',
    phone                       text NOT NULL DEFAULT '',
    credit_account_id           bigint NOT NULL UNIQUE,
    debt_account_id             bigint NOT NULL UNIQUE,
    debt_recovery_share_bp      integer NOT NULL DEFAULT 0 CHECK (debt_recovery_share_bp BETWEEN 0 AND 10000),
    created_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_name ON customers (lower(name));

CREATE TABLE meters (
    meter_number        text PRIMARY KEY CHECK (meter_number ~ '^[0-9]{6,20}$'),
    customer_id         bigint NOT NULL REFERENCES customers,
    supply_mode         text NOT NULL CHECK (supply_mode IN ('smart', 'sts')),
    tariff_code         text NOT NULL,
    supply_state        text NOT NULL DEFAULT 'on' CHECK (supply_state IN ('on', 'limited', 'off')),
    sts_supply_group_code text,
    sts_tariff_index    text,
    sts_key_revision    integer,
    sts_base_year       integer CHECK (sts_base_year IN (1993, 2014)),
    -- The last TID issued to this meter, and the base date it counts from: a meter moved to
    -- another base date (with its key change) starts a new TID sequence.
    last_token_id       bigint,
    last_token_base_year integer,
    last_purchase_at    timestamptz,
    last_purchase_minor bigint,
    CHECK (supply_mode = 'smart' OR (sts_supply_group_code IS NOT NULL AND sts_tariff_index IS NOT NULL
                                     AND sts_key_revision IS NOT NULL AND sts_base_year IS NOT NULL))
);
CREATE INDEX meters_customer ON meters (customer_id);

-- One row per client transaction id: the idempotency record. A replay returns `reply`.
CREATE TABLE vend_transactions (
    client_txn_id   text PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('topup', 'advice', 'reversal')),
    terminal_id     text NOT NULL REFERENCES terminals,
    agent_id        bigint NOT NULL,
    request_sha256  bytea NOT NULL,
    response_code   integer NOT NULL,
    meter_number    text,
    amount_minor    bigint NOT NULL DEFAULT 0,
    currency        char(3) NOT NULL,
    group_id        uuid,
    receipt_number  bigint,
    business_date   date NOT NULL,
    reply           bytea NOT NULL,
    -- Reprints of the receipt; a reprinted payment can no longer be reversed.
    reprints        integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vend_transactions_terminal_day ON vend_transactions (terminal_id, business_date);

CREATE TABLE receipts (
    terminal_id     text NOT NULL REFERENCES terminals,
    receipt_number  bigint NOT NULL CHECK (receipt_number > 0),
    client_txn_id   text NOT NULL UNIQUE REFERENCES vend_transactions,
    issued_at       timestamptz NOT NULL DEFAULT now(),
    tariff_code     text,
    tariff_valid_from timestamptz,
    PRIMARY KEY (terminal_id, receipt_number)
);

-- Tokens are bearer value: stored encrypted under the master key, shown masked.
CREATE TABLE tokens (
    client_txn_id     text NOT NULL REFERENCES vend_transactions,
    meter_number      text NOT NULL REFERENCES meters,
    token_id          bigint NOT NULL,
    token_class       integer NOT NULL,
    token_subclass    integer NOT NULL,
    units_deci_kwh    bigint NOT NULL,
    token_ciphertext  bytea NOT NULL,
    token_last4       text NOT NULL,
    status            text NOT NULL DEFAULT 'issued' CHECK (status IN ('issued', 'voided')),
    issued_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_txn_id, token_class, token_subclass),
    UNIQUE (meter_number, token_id)
);

-- A reversal names its original. Arriving first, it is a tombstone: the original is refused.
CREATE TABLE reversals (
    original_txn_id   text PRIMARY KEY,
    reversal_txn_id   text NOT NULL,
    terminal_id       text NOT NULL,
    reason            text NOT NULL,
    original_found    boolean NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- Events for the prepayment engine, written in the payment's own transaction.
CREATE TABLE outbox (
    event_id        bigserial PRIMARY KEY,
    kind            text NOT NULL,
    client_txn_id   text NOT NULL,
    meter_number    text,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    attempts        integer NOT NULL DEFAULT 0
);
CREATE INDEX outbox_pending ON outbox (event_id) WHERE delivered_at IS NULL;

-- The utility's own ledger accounts, one per kind and currency.
CREATE TABLE system_accounts (
    kind        text NOT NULL,
    currency    char(3) NOT NULL,
    account_id  bigint NOT NULL UNIQUE,
    PRIMARY KEY (kind, currency)
);
