"""Resident memory of a dict of 1,000,000 int keys (DedupWindow's layout: int -> one shared
float) when the ints hold 64 bits against 60 (forwarder/dedup.py, "Memory layout"). An int
below 2**60 is a 32-byte object; 64 bits take a third 30-bit digit, 36 bytes, which
CPython's allocator rounds up to 48. Each size runs in a fresh process.

    .venv/bin/python bench/dedup_key_bits.py

2026-12-03: 64 bits 91.5 MB, 60 bits 81.5 MB (RSS growth, ru_maxrss).
"""

from __future__ import annotations

import random
import resource
import subprocess
import sys

KEYS = 1_000_000


def grow(bits: int) -> float:
    """RSS growth in MB while filling the dict (run in a child process)."""
    mask = (1 << bits) - 1
    rng = random.Random(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shared = 1.0
    window = {rng.getrandbits(64) & mask: shared for _ in range(KEYS)}
    assert len(window) > 0.99 * KEYS
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(f"{grow(int(sys.argv[2])):.1f}")
        return
    for bits in (64, 60):
        out = subprocess.run([sys.executable, __file__, "--child", str(bits)],
                             capture_output=True, text=True, check=True).stdout.strip()
        print(f"{bits} bits: {out} MB for {KEYS:,} keys")


if __name__ == "__main__":
    main()
