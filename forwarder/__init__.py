"""intercom-forwarder: a local daemon that takes Intercom data events fire-and-forget,
validates them as Intercom documents, drops duplicates and forwards them to POST /events."""

__version__ = "0.1.0"
