"""Simulated POS terminals, kiosks and meters (depends on protocol/ only)."""
