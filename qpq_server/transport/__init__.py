"""Network transports: QUIC (`quic` serves, `quic_client` connects: the only modules
importing aioquic.asyncio, with the federation listener) and WebSocket."""
