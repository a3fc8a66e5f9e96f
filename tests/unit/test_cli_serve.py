"""`intercom-forwarder serve` hides what it built before serving from the cycle collector."""

from __future__ import annotations

import gc
import signal

from forwarder import cli


def test_serve_freezes_the_service_it_built_before_running_it(monkeypatch, tmp_path):
    """A full collection walks every container it tracks, the queue's item by item, and
    that walk was a 17-26 ms stall under load. What serve builds before running (here a
    fake service holding a list, as the real one holds its queue) must be out of the
    collector's sight while the service runs."""
    seen: dict[str, bool] = {}

    class FakeService:
        def __init__(self, cfg, **_kwargs):
            self.storage: list[bytes] = [b"an accepted event"]

        async def run(self) -> int:
            storage = self.storage
            seen["collector_walks_storage"] = any(o is storage for o in gc.get_objects())
            built_while_serving: list[bytes] = []  # the collector still sees new objects
            seen["collector_walks_new_objects"] = any(
                o is built_while_serving for o in gc.get_objects())
            return 0

    monkeypatch.setattr("forwarder.service.Service", FakeService)
    config = tmp_path / "forwarder.toml"
    config.write_text(f'[intercom]\naccess_token = "t0k3n"\n'
                      f'[storage]\nstate_dir = "{tmp_path}"\n')  # what serve checks first
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main(["serve", "--config", str(config)]) == 0
    finally:
        gc.unfreeze()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen == {"collector_walks_storage": False, "collector_walks_new_objects": True}
