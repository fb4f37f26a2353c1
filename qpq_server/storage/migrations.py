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
)

SCHEMA_VERSION = len(MIGRATIONS)
