"""Versioned schema migrations for the SQL backends (PRAGMA user_version tracks them)."""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

MIGRATIONS: tuple[str, ...] = (
    # 1: accounts, one-time key packages, delivery queues, metadata
    """
    CREATE TABLE accounts (
        username TEXT PRIMARY KEY,
        password_file BLOB NOT NULL,
        setup_version INTEGER NOT NULL,
        identity_key BLOB,
        created_at REAL NOT NULL
    );
    CREATE TABLE key_packages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        username TEXT NOT NULL REFERENCES accounts(username),
        key_package BLOB NOT NULL
    );
    CREATE INDEX key_packages_user ON key_packages(username, id);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL,
        payload BLOB NOT NULL,
        sent_at REAL NOT NULL
    );
    CREATE INDEX messages_recipient ON messages(recipient, id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: key-transparency log leaves (RFC 9162 leaf inputs, in order)
    """
    CREATE TABLE kt_leaves (
        idx INTEGER PRIMARY KEY,
        username TEXT NOT NULL,
        leaf BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX kt_leaves_user ON kt_leaves(username, idx);
    """,
    # 3: federation: relay ids already delivered, per origin domain (exactly once)
    """
    CREATE TABLE relays_seen (
        origin TEXT NOT NULL,
        relay_id INTEGER NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (origin, relay_id)
    );
    CREATE INDEX relays_seen_at ON relays_seen(seen_at);
    """,
    # 4: each mailbox's stored payload bytes, kept by triggers in the same transaction as
    # every insert and delete, so the quota check reads one row instead of the mailbox
    """
    CREATE TABLE mailbox_usage (
        recipient TEXT PRIMARY KEY,
        bytes INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO mailbox_usage(recipient, bytes)
        SELECT recipient, sum(length(payload)) FROM messages GROUP BY recipient;
    CREATE TRIGGER messages_usage_insert AFTER INSERT ON messages BEGIN
        INSERT INTO mailbox_usage(recipient, bytes) VALUES (NEW.recipient, length(NEW.payload))
            ON CONFLICT(recipient) DO UPDATE SET bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER messages_usage_delete AFTER DELETE ON messages BEGIN
        UPDATE mailbox_usage SET bytes = bytes - length(OLD.payload)
            WHERE recipient = OLD.recipient;
    END;
    CREATE TRIGGER messages_usage_update AFTER UPDATE OF recipient, payload ON messages BEGIN
        UPDATE mailbox_usage SET bytes = bytes - length(OLD.payload)
            WHERE recipient = OLD.recipient;
        INSERT INTO mailbox_usage(recipient, bytes) VALUES (NEW.recipient, length(NEW.payload))
            ON CONFLICT(recipient) DO UPDATE SET bytes = bytes + excluded.bytes;
    END;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
