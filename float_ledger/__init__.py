"""vendgate money: the double-entry float ledger on PostgreSQL and its pure money rules."""
