"""vendgate back-office HTTP API."""
