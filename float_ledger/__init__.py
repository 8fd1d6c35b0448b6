"""vendgate money: the double-entry float ledger on PostgreSQL and its pure money rules.

    model.py           types, limits and pure money rules (no I/O)
    sql.py             every SQL statement, named
    ledger.py          accounts, posting (apply_transfers / post_transfers), balances, statements,
                       reversals, commission accrual, low-float events
    deposits.py        float deposits with maker/checker approval
    reconciliation.py  per agent and terminal, per business day
    check.py           the invariants behind `vendgate ledger check`
    split.py           how one payment divides into debt recovery, fees, energy and VAT

Schema: gateway/migrations/0002_ledger.sql.
"""
