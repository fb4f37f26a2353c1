"""Storage backends behind one interface (`Storage`)."""

from qpq_server.storage.base import Account, KeyPackage, Storage, StoredMessage
from qpq_server.storage.factory import open_storage

__all__ = ["Account", "KeyPackage", "Storage", "StoredMessage", "open_storage"]
