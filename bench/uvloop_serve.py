"""Runs the daemon's own CLI on uvloop: `python bench/uvloop_serve.py serve --config X`.

uvloop.install() sets the event-loop policy before forwarder.cli.main() runs, so the
loop that asyncio.run() creates is uvloop's; everything else is the unchanged daemon.
The benchmark uses this to learn whether a uvloop extra pays, before the CLI grows a
switch of its own.
"""

from __future__ import annotations

import sys

import uvloop

uvloop.install()

from forwarder.cli import main

if __name__ == "__main__":
    sys.exit(main())
