"""Errors the float ledger raises. A refused transfer is never an error: it is a PostStatus.

    LedgerError
     ├── InvalidTransfer     a transfer or batch breaks a structural rule (the caller's bug); nothing was sent
     ├── InvalidAccount      an account definition the ledger cannot hold (bound above zero, bad currency)
     ├── AccountNotFound     no account with that id
     ├── UnknownTimeZone     not an IANA time zone name
     ├── RetriesExhausted    post_transfers met serialization failures/deadlocks retries_max + 1 times
     ├── ReconciliationNeedsSnapshot  reconciling inside a READ COMMITTED transaction (no one snapshot)
     ├── PostingsInFlight    a transaction that may post transfers dated at or before a time is still open
     └── DepositError
          ├── DepositNotFound
          ├── DepositConflict  the deposit id or external reference was used with other content
          └── CheckerIsMaker   the operator who requested a deposit cannot also decide it

These are raised before any SQL runs (or after a read), so the caller's transaction stays usable.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error of the float ledger."""


class InvalidTransfer(LedgerError, ValueError):
    pass


class InvalidAccount(LedgerError, ValueError):
    pass


class AccountNotFound(LedgerError, LookupError):
    pass


class UnknownTimeZone(LedgerError, ValueError):
    pass


class RetriesExhausted(LedgerError):
    pass


class ReconciliationNeedsSnapshot(LedgerError):
    pass


class PostingsInFlight(LedgerError):
    """A figure as of a time would not be final: a transaction begun by then is still open."""


class DepositError(LedgerError):
    pass


class DepositNotFound(DepositError, LookupError):
    pass


class DepositConflict(DepositError):
    pass


class CheckerIsMaker(DepositError):
    pass
