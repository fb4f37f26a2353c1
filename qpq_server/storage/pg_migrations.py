"""Versioned schema migrations for the PostgreSQL backend (the `schema_version` table
records each one applied; every migration commits in its own transaction).

Never edit a migration that has shipped: append a new one. Text keys use the "C"
collation so ordering and prefix scans do not depend on the database's locale.
"""

from __future__ import annotations

__all__ = ["PG_MIGRATIONS", "PG_SCHEMA_VERSION"]

PG_MIGRATIONS: tuple[str, ...] = (
    # 1: accounts, one-time key packages, delivery queues, metadata, the KT log
    """
    CREATE TABLE accounts (
        username TEXT COLLATE "C" PRIMARY KEY,
        password_file BYTEA NOT NULL,
        setup_version INTEGER NOT NULL,
        identity_key BYTEA,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE key_packages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        username TEXT COLLATE "C" NOT NULL REFERENCES accounts(username),
        key_package BYTEA NOT NULL
    );
    CREATE INDEX key_packages_user ON key_packages(username, id);
    CREATE TABLE messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        recipient TEXT COLLATE "C" NOT NULL,
        sender TEXT COLLATE "C" NOT NULL,
        payload BYTEA NOT NULL,
        sent_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX messages_recipient ON messages(recipient, id);
    CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE kt_leaves (
        idx BIGINT PRIMARY KEY CHECK (idx >= 0),
        username TEXT COLLATE "C" NOT NULL,
        leaf BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX kt_leaves_user ON kt_leaves(username, idx);
    """,
    # 2: federation: relay ids already delivered, per origin domain (exactly once)
    """
    CREATE TABLE relays_seen (
        origin TEXT COLLATE "C" NOT NULL,
        relay_id BIGINT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (origin, relay_id)
    );
    CREATE INDEX relays_seen_at ON relays_seen(seen_at);
    """,
    # 3: each mailbox's stored payload bytes, kept by triggers in the same transaction as
    # every insert and delete, so the quota check reads one row instead of the mailbox
    """
    CREATE TABLE mailbox_usage (
        recipient TEXT COLLATE "C" PRIMARY KEY,
        bytes BIGINT NOT NULL
    );
    CREATE FUNCTION messages_usage() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE mailbox_usage SET bytes = bytes - octet_length(OLD.payload)
                WHERE recipient = OLD.recipient;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            INSERT INTO mailbox_usage(recipient, bytes)
                VALUES (NEW.recipient, octet_length(NEW.payload))
                ON CONFLICT (recipient)
                DO UPDATE SET bytes = mailbox_usage.bytes + excluded.bytes;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER messages_usage AFTER INSERT OR DELETE OR UPDATE OF recipient, payload
        ON messages FOR EACH ROW EXECUTE FUNCTION messages_usage();
    -- after the trigger: CREATE TRIGGER locks out other nodes' inserts and deletes until
    -- this commits, so none falls between the count and the trigger
    INSERT INTO mailbox_usage(recipient, bytes)
        SELECT recipient, sum(octet_length(payload)) FROM messages GROUP BY recipient;
    """,
)

PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
