"""Authentication: access token, OPAQUE accounts, MAC-signed session tokens."""
