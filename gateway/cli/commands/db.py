"""`vendgate db start|stop|status|url`: the embedded PostgreSQL cluster."""

from __future__ import annotations

import argparse

from gateway.database import embedded_cluster
from gateway.errors import SettingsError
from gateway.jsonlog import redact_url
from gateway.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("db", help="manage the embedded PostgreSQL cluster")
    parser.add_argument("action", choices=["start", "stop", "status", "url"])
    parser.add_argument("--show-password", action="store_true", help="with url: print the full URL")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.uses_embedded_database:
        raise SettingsError("VENDGATE_DATABASE_URL is set: the embedded cluster is not in use")
    cluster = embedded_cluster(settings)
    if args.action == "start":
        created = cluster.init()
        status = cluster.start()
        print(f"{'created and ' if created else ''}started PostgreSQL {status.version} "
              f"in {cluster.pgdata} on 127.0.0.1:{status.port} (pid {status.pid})")
    elif args.action == "stop":
        print("stopped" if cluster.stop() else "not running")
    elif args.action == "status":
        status = cluster.status()
        if status.running:
            print(f"running: PostgreSQL {status.version} in {cluster.pgdata} "
                  f"on 127.0.0.1:{status.port} (pid {status.pid})")
        else:
            print(f"stopped: {cluster.pgdata}{'' if cluster.initialised else ' (not initialised)'}")
            return 3
    else:
        url = cluster.url(settings.database_name)
        print(url if args.show_password else redact_url(url))
    return 0
