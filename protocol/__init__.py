"""vendgate wire protocol v1: sans-IO framing, messages and sessions (no sockets, no clocks)."""
