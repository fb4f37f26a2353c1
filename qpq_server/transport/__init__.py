"""Network transports: QUIC (the only module importing aioquic.asyncio)."""
