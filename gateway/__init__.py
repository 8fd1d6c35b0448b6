"""vendgate gateway: sockets, sessions, the CLI and the services the back office reuses."""
