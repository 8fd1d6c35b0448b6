"""Errors the gateway's own infrastructure raises to its callers.

    VendgateError
     ├── SettingsError        bad VENDGATE_* variable or TOML value
     ├── DatabaseUnavailable  the configured database cannot be reached
     ├── ClusterError         the embedded PostgreSQL cluster failed to init/start/stop
     ├── MigrationError       a migration file is missing, changed or failed
     └── ListenError          a listener cannot bind its address (in use, not this machine's)

The CLI turns any VendgateError into one line on stderr and exit status 2.
"""


class VendgateError(Exception):
    """Base of every error vendgate reports to an operator in one line."""


class SettingsError(VendgateError):
    pass


class DatabaseUnavailable(VendgateError):
    pass


class ClusterError(VendgateError):
    pass


class MigrationError(VendgateError):
    pass


class ListenError(VendgateError):
    pass
