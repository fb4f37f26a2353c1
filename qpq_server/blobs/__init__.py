"""Attachments: large end-to-end-encrypted blobs, streamed over QUIC streams of their own.

`store` keeps them on disk (content-addressed by SHA-256 of the ciphertext, quotas,
expiry); `transfer` speaks the stream protocol (`blob_put`, `blob_get`) for any
transport that can stream frames.
"""

from qpq_server.blobs.store import BlobInfo, BlobStore, HashMismatch, QuotaExceeded, Upload
from qpq_server.blobs.transfer import BLOB_OPS, BlobTransfers, StreamSink

__all__ = ["BLOB_OPS", "BlobInfo", "BlobStore", "BlobTransfers", "HashMismatch",
           "QuotaExceeded", "StreamSink", "Upload"]
