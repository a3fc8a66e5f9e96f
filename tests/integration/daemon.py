"""A real `intercom-forwarder serve` subprocess for tests that need real signals and a
real second process: its stderr goes to a file that the test reads (so a full pipe can
never stall the daemon), and every wait is bounded polling on a condition."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    url: str
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_events(self, name: str) -> list[dict]:
        """The JSON log lines whose event is `name`, in order."""
        found = []
        for line in self.stderr().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # the CLI's own messages are plain text
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    async def wait_for(self, done: Callable[[], bool], what: str, timeout: float = 15) -> None:
        async def _poll() -> None:
            while not done():
                assert self.proc.returncode is None, (
                    f"daemon exited {self.proc.returncode} waiting for {what}:\n{self.stderr()}")
                await asyncio.sleep(0.02)

        try:
            await asyncio.wait_for(_poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout} s:\n{self.stderr()}") from None

    async def wait_for_log(self, name: str, count: int = 1, timeout: float = 15) -> list[dict]:
        await self.wait_for(lambda: len(self.log_events(name)) >= count, name, timeout)
        return self.log_events(name)

    async def wait_serving(self, timeout: float = 15) -> None:
        """Until GET /healthz answers 200 (readiness may be false on purpose: paused)."""
        async def _up() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(self.url + "/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        async def _poll() -> None:
            while not await _up():
                assert self.proc.returncode is None, (
                    f"daemon exited {self.proc.returncode} at start:\n{self.stderr()}")
                await asyncio.sleep(0.05)

        await asyncio.wait_for(_poll(), timeout)

    async def post(self, obj: object, path: str = "/events") -> int:
        async with aiohttp.ClientSession() as s, s.post(self.url + path,
                                                        data=orjson.dumps(obj)) as r:
            return r.status

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics: {(sample name, sorted labels): value}."""
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            text = await r.text()
        return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
                for family in text_string_to_metric_families(text) for smp in family.samples}

    async def terminate(self, timeout: float = 15) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def spawn(workdir: Path, *, upstream: str, state_dir: Path, name: str = "daemon",
                config: Path | None = None, wrapper: Sequence[str] = (), **env: str) -> Daemon:
    """Start `python -m forwarder serve` with JSON logs on its own TCP port; env adds or
    overrides variables (INTERCOM_ACCESS_TOKEN, FORWARDER_*). Does not wait for it."""
    port = free_port()
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith("FORWARDER_") and k not in ("INTERCOM_ACCESS_TOKEN",
                                                                 "CREDENTIALS_DIRECTORY")}
    full_env = {**inherited,
                "FORWARDER_INTAKE__PORT": str(port),
                "FORWARDER_INTERCOM__BASE_URL": upstream,
                "FORWARDER_INTERCOM__TIMEOUT_SECONDS": "2",
                "FORWARDER_STORAGE__STATE_DIR": str(state_dir),
                "FORWARDER_SHUTDOWN__DRAIN_SECONDS": "1",
                "FORWARDER_LOG__FORMAT": "json",
                **env}
    # wrapper: a command that execs the daemon, e.g. prlimit to give it a real limit.
    argv = [*wrapper, sys.executable, "-m", "forwarder", "serve"]
    if config is not None:
        argv += ["--config", str(config)]
    stderr_path = workdir / f"{name}.stderr"
    with stderr_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=full_env, stdout=asyncio.subprocess.DEVNULL, stderr=err)
    return Daemon(proc=proc, url=f"http://127.0.0.1:{port}", stderr_path=stderr_path)


async def spawn_serving(workdir: Path, *, upstream: str, state_dir: Path, name: str = "daemon",
                        **env: str) -> Daemon:
    """spawn(), then wait until it serves; a daemon that does not is killed, not leaked."""
    daemon = await spawn(workdir, upstream=upstream, state_dir=state_dir, name=name, **env)
    try:
        await daemon.wait_serving()
    except BaseException:
        await daemon.kill()
        raise
    return daemon
