"""Sans-I/O protocol core: frame codec, request validation. No sockets, no clocks."""
