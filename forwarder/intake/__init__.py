"""Intake: the Intercom-compatible HTTP API apps post events to (TCP and Unix socket)."""
