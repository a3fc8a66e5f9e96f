"""What the deployment files promise, checked without a Docker engine or a running systemd.

- The healthcheck (the image's HEALTHCHECK) against real servers on 127.0.0.1 / a Unix socket.
- The image, reproduced: the build context that .dockerignore lets through is copied, a wheel
  is built from it (as the builder stage does), installed with the uvloop extra into a fresh
  venv (as the runtime stage holds it), and the image's commands run from that venv:
  `intercom-forwarder --help`, `python -m forwarder.healthcheck`, and `intercom-forwarder
  serve` until SIGTERM, also under a NOTIFY_SOCKET as systemd would start it.
- The unit files and sidecar examples agree with the config they set (every FORWARDER_*
  variable names a real key; stop timeouts exceed shutdown.drain_seconds).

hadolint and `systemd-analyze verify` run in .ci/lint-deploy, not here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from forwarder import healthcheck
from forwarder.config import CREDENTIAL_NAME, Config, ShutdownConfig
from forwarder.fake_intercom import FakeIntercom

REPO = Path(__file__).resolve().parents[2]
DRAIN_SECONDS = ShutdownConfig().drain_seconds


def _missing(*modules: str) -> str:
    """Why `intercom-forwarder serve` cannot run from this tree yet, or "" when it can."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{name} is not importable yet ({exc}); the image's entrypoint needs it"
    return ""


CLI_MISSING = _missing("forwarder.cli")
SERVE_MISSING = _missing("forwarder.cli", "forwarder.service")


# --- healthcheck ---------------------------------------------------------------------------


@pytest.fixture
async def health_server() -> AsyncIterator[dict]:
    """/healthz on 127.0.0.1 answering `state["status"]`, or hanging when it is None."""
    state: dict = {"status": 200, "release": asyncio.Event()}

    async def healthz(request: web.Request) -> web.Response:
        if state["status"] is None:
            await state["release"].wait()
        return web.json_response({"status": "ok"}, status=state["status"] or 200)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["port"] = runner.addresses[0][1]
    state["url"] = f"http://127.0.0.1:{state['port']}/healthz"
    try:
        yield state
    finally:
        state["release"].set()
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_healthcheck(*argv: str, env: dict[str, str] | None = None) -> int:
    # In a thread: the probe blocks, and the server it probes runs on this loop.
    return await asyncio.to_thread(healthcheck.main, list(argv), env or {})


async def test_healthcheck_exits_0_when_healthz_answers_200(health_server):
    assert await run_healthcheck("--url", health_server["url"]) == 0


async def test_healthcheck_exits_1_and_says_why_when_healthz_answers_503(health_server, capsys):
    health_server["status"] = 503

    assert await run_healthcheck("--url", health_server["url"]) == 1
    assert capsys.readouterr().err.strip() == f"unhealthy: {health_server['url']}: status 503"


async def test_healthcheck_exits_1_when_nothing_listens():
    assert await run_healthcheck("--url", f"http://127.0.0.1:{free_port()}/healthz") == 1


async def test_healthcheck_exits_1_when_the_answer_is_later_than_the_timeout(health_server):
    health_server["status"] = None  # the handler waits until the test ends

    assert await run_healthcheck("--url", health_server["url"], "--timeout", "0.2") == 1


async def test_healthcheck_default_url_takes_the_port_from_forwarder_intake_port(health_server):
    env = {"FORWARDER_INTAKE__PORT": str(health_server["port"])}

    assert await run_healthcheck(env=env) == 0


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:8377/healthz"),
        ({"FORWARDER_INTAKE__HOST": "0.0.0.0"}, "http://127.0.0.1:8377/healthz"),
        ({"FORWARDER_INTAKE__HOST": "::"}, "http://127.0.0.1:8377/healthz"),
        (
            {"FORWARDER_INTAKE__HOST": "::1", "FORWARDER_INTAKE__PORT": "9000"},
            "http://[::1]:9000/healthz",
        ),
        ({"FORWARDER_INTAKE__HOST": "10.1.2.3"}, "http://10.1.2.3:8377/healthz"),
    ],
    ids=[
        "defaults",
        "ipv4-wildcard-probed-on-loopback",
        "ipv6-wildcard",
        "ipv6-literal",
        "one-address",
    ],
)
def test_healthcheck_default_url_follows_the_intake_settings(env, url):
    assert healthcheck.default_url(env) == url


async def test_healthcheck_probes_over_the_unix_socket(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hc") / "intake.sock")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    try:
        assert await run_healthcheck("--unix-socket", path) == 0
        assert await run_healthcheck("--unix-socket", path + ".missing") == 1
    finally:
        await runner.cleanup()


# --- the build context (.dockerignore) -----------------------------------------------------


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per line, in order; Docker's syntax: * ? ** and ! exceptions."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def in_build_context(relpath: str, rules=None) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    rules = rules if rules is not None else _dockerignore_rules()
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            included = negated
    return included


def build_context_files() -> list[str]:
    """Every file of the work tree that `docker build .` would send."""
    rules = _dockerignore_rules()
    exceptions = [r for negated, r in rules if negated]
    found = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel_dir = os.path.relpath(dirpath, REPO)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Skip an excluded directory unless an exception pattern could re-include below it.
        dirnames[:] = [
            d
            for d in dirnames
            if in_build_context(rel_dir + d, rules)
            or any(r.pattern.startswith(re.escape(rel_dir + d + "/")) for r in exceptions)
        ]
        found += [rel_dir + f for f in filenames if in_build_context(rel_dir + f, rules)]
    return sorted(found)


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "tests/unit/test_notify.py",
        "bench/bench_intake.py",
        "node_modules/x/index.js",
        "tests/contract/node_modules/x/index.js",
        "forwarder/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/x",
        "config/forwarder.toml",
        "access-token",
        "Dockerfile",
    ],
)
def test_dockerignore_keeps_path_out_of_the_build_context(path):
    assert not in_build_context(path)


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "README.md", "forwarder/cli.py", "forwarder/intake/http.py"]
)
def test_dockerignore_lets_the_wheel_sources_in(path):
    assert in_build_context(path)


# --- the image, reproduced in a venv -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageVenv:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """The container's environment: only the venv on PATH, no FORWARDER_* of ours."""
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", **extra}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageVenv]:
    """The builder stage: wheel from the .dockerignore'd context, venv with wheel[uvloop]."""
    base = tmp_path_factory.mktemp("image")
    context = base / "context"
    for rel in build_context_files():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, context / rel)
    wheels = base / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(context)],
        timeout=300,
    )
    (wheel,) = wheels.glob("intercom_forwarder-*.whl")
    venv = ImageVenv(base / "venv")
    _run([sys.executable, "-m", "venv", str(venv.root)], timeout=120)
    _run(
        [str(venv.bin / "pip"), "install", "-q", "--disable-pip-version-check", f"{wheel}[uvloop]"],
        timeout=300,
    )
    yield venv


def test_the_wheel_holds_uvloop_and_the_healthcheck_in_the_image_venv(image_venv):
    done = _run(
        [
            str(image_venv.bin / "python"),
            "-c",
            "import uvloop, forwarder.healthcheck, forwarder.notify",
        ],
        env=image_venv.env(),
        cwd=image_venv.root,
    )
    assert done.stderr == ""


@pytest.mark.skipif(bool(CLI_MISSING), reason=CLI_MISSING)
def test_the_image_entrypoint_answers_help(image_venv):
    done = _run(
        [str(image_venv.bin / "intercom-forwarder"), "--help"],
        env=image_venv.env(),
        cwd=image_venv.root,
    )
    assert "serve" in done.stdout


async def test_the_image_healthcheck_command_exits_0_healthy_and_1_unhealthy(
    image_venv, health_server
):
    """HEALTHCHECK CMD ["python", "-m", "forwarder.healthcheck"] as the container runs it:
    the venv's python first on PATH, the port from FORWARDER_INTAKE__PORT."""

    async def probe() -> int:
        proc = await asyncio.create_subprocess_exec(
            "python",
            "-m",
            "forwarder.healthcheck",
            env=image_venv.env(FORWARDER_INTAKE__PORT=str(health_server["port"])),
            cwd=image_venv.root,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(proc.wait(), 30)

    assert await probe() == 0
    health_server["status"] = 503
    assert await probe() == 1


def serve_env(
    venv: ImageVenv, upstream: FakeIntercom, state_dir: Path, port: int, **extra: str
) -> dict[str, str]:
    return venv.env(
        INTERCOM_ACCESS_TOKEN=upstream.token,
        FORWARDER_INTAKE__PORT=str(port),
        FORWARDER_STORAGE__STATE_DIR=str(state_dir),
        FORWARDER_INTERCOM__BASE_URL=upstream.url,
        FORWARDER_LOG__FORMAT="json",
        **extra,
    )


async def start_serve(
    venv: ImageVenv, env: dict[str, str], log_path: Path
) -> asyncio.subprocess.Process:
    """ENTRYPOINT ["intercom-forwarder"] + CMD ["serve"], output to log_path."""
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            str(venv.bin / "intercom-forwarder"),
            "serve",
            env=env,
            cwd=venv.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def start_container_serve(
    venv: ImageVenv, upstream: FakeIntercom, tmp_path: Path
) -> tuple[asyncio.subprocess.Process, int, Path]:
    """start_serve with the container's settings (env only, no --config) on a free port."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = serve_env(venv, upstream, tmp_path / "state", port)
    return await start_serve(venv, env, log_path), port, log_path


async def wait_healthy(
    venv: ImageVenv, proc: asyncio.subprocess.Process, port: int, log_path: Path
) -> None:
    """Polls the image's healthcheck until it exits 0; bounded at 15 s."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.returncode is None, f"serve exited {proc.returncode}:\n{log_path.read_text()}"
        probe = await asyncio.create_subprocess_exec(
            "python",
            "-m",
            "forwarder.healthcheck",
            "--timeout",
            "1",
            env=venv.env(FORWARDER_INTAKE__PORT=str(port)),
            cwd=venv.root,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if await probe.wait() == 0:
            return
        await asyncio.sleep(0.1)  # a bounded wait on a condition: the daemon starting up
    pytest.fail(f"serve not healthy within 15 s:\n{log_path.read_text()}")


async def stop_serve(proc: asyncio.subprocess.Process, log_path: Path) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), DRAIN_SECONDS + 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"serve did not exit after SIGTERM:\n{log_path.read_text()}")


@pytest.mark.skipif(bool(SERVE_MISSING), reason=SERVE_MISSING)
async def test_the_image_command_serves_forwards_and_exits_0_on_sigterm(
    image_venv, fake_intercom, tmp_path
):
    """Steps: start `intercom-forwarder serve` from the venv with the container's settings
    (env only, no --config) -> healthcheck passes -> POST one event -> the fake Intercom
    receives it -> SIGTERM -> exit 0."""
    proc, port, log_path = await start_container_serve(image_venv, fake_intercom, tmp_path)
    try:
        await wait_healthy(image_venv, proc, port, log_path)
        event = {"event_name": "deploy-smoke", "created_at": int(time.time()), "user_id": "u-1"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{port}/events", json=event) as resp,
        ):
            assert resp.status == 202, await resp.text()
        await fake_intercom.wait_for_delivered(1, timeout=10)
    finally:
        code = await stop_serve(proc, log_path)
    assert code == 0, log_path.read_text()
    assert fake_intercom.delivered[0]["event_name"] == "deploy-smoke"


@pytest.mark.skipif(bool(SERVE_MISSING), reason=SERVE_MISSING)
async def test_serve_under_systemd_notifies_ready_watchdog_and_stopping(
    image_venv, fake_intercom, tmp_path_factory
):
    """Steps: a datagram socket stands in for systemd's NOTIFY_SOCKET, WATCHDOG_USEC=200000
    asks for a ping every 0.1 s -> serve sends READY=1, then WATCHDOG=1 -> SIGTERM ->
    STOPPING=1 -> exit 0."""
    tmp = tmp_path_factory.mktemp("sd")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.setblocking(False)
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    async def wait_for(message: str) -> None:
        async def _recv() -> None:
            while message not in seen:
                seen.extend((await loop.sock_recv(notify, 4096)).decode().splitlines())

        await asyncio.wait_for(_recv(), 15)

    env = serve_env(
        image_venv,
        fake_intercom,
        tmp / "state",
        free_port(),
        NOTIFY_SOCKET=str(tmp / "notify.sock"),
        WATCHDOG_USEC="200000",
    )
    log_path = tmp / "serve.log"
    proc = await start_serve(image_venv, env, log_path)
    try:
        try:
            await wait_for("READY=1")
            await wait_for("WATCHDOG=1")
        except TimeoutError:
            pytest.fail(f"no READY=1/WATCHDOG=1 within 15 s, got {seen}:\n{log_path.read_text()}")
        proc.send_signal(signal.SIGTERM)
        await wait_for("STOPPING=1")
    finally:
        code = await stop_serve(proc, log_path)
        notify.close()
    assert code == 0, log_path.read_text()
    assert seen.index("READY=1") < seen.index("STOPPING=1")


# --- the unit files and examples agree with the config -------------------------------------


def unit_directives(name: str) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} for a systemd unit; keys repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in (REPO / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def first(directives: list[tuple[str, str]], key: str) -> str:
    return next(v for k, v in directives if k == key)


def seconds(value: str) -> float:
    """A systemd/compose duration such as 30, 30s, 1min 30s or 1m30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def assert_names_config_keys(variables: set[str]) -> None:
    assert variables, "no FORWARDER_* variables found"
    for var in variables:
        section, _, key = var.removeprefix("FORWARDER_").lower().partition("__")
        section_fields = {f.name: f for f in dataclasses.fields(Config)}
        assert section in section_fields, f"{var}: no config section {section!r}"
        keys = {f.name for f in dataclasses.fields(section_fields[section].default_factory())}
        assert key in keys, f"{var}: no key {section}.{key}"


SERVICE = unit_directives("intercom-forwarder.service")


def test_systemd_stop_timeout_leaves_room_for_the_drain():
    assert seconds(first(SERVICE["Service"], "TimeoutStopSec")) > DRAIN_SECONDS


def test_systemd_unit_is_type_notify_with_a_watchdog_the_daemon_can_feed():
    svc = SERVICE["Service"]
    assert first(svc, "Type") == "notify"
    assert first(svc, "NotifyAccess") == "main"
    assert seconds(first(svc, "WatchdogSec")) > 0


@pytest.mark.skipif(bool(SERVE_MISSING), reason=SERVE_MISSING)
async def test_systemctl_reload_runs_exec_reload_and_serve_reloads_instead_of_dying(
    image_venv, fake_intercom, tmp_path
):
    """Steps: `intercom-forwarder serve` from the image venv; the unit's ExecReload= run
    as systemd would for `systemctl reload`, $MAINPID being serve's PID. Expect: it exits
    0, serve logs service.reloaded and stays healthy, and SIGTERM still exits 0."""
    proc, port, log_path = await start_container_serve(image_venv, fake_intercom, tmp_path)
    try:
        await wait_healthy(image_venv, proc, port, log_path)
        command = first(SERVICE["Service"], "ExecReload").replace("$MAINPID", str(proc.pid))
        reload = await asyncio.create_subprocess_exec(*command.split())
        assert await asyncio.wait_for(reload.wait(), 10) == 0
        deadline = time.monotonic() + 15
        while '"service.reloaded"' not in log_path.read_text():
            assert proc.returncode is None, f"serve died on reload:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.05)  # bounded polling for the log line
        await wait_healthy(image_venv, proc, port, log_path)
    finally:
        code = await stop_serve(proc, log_path)
    assert code == 0, log_path.read_text()


def test_systemd_credential_is_the_one_config_reads():
    name, _, source = first(SERVICE["Service"], "LoadCredential").partition(":")
    assert name == CREDENTIAL_NAME
    assert source.startswith("/etc/intercom-forwarder/")


def test_systemd_environment_names_real_config_keys_and_points_into_its_directories():
    svc = SERVICE["Service"]
    env = dict(v.split("=", 1) for k, v in svc if k == "Environment")
    assert_names_config_keys({k for k in env if k.startswith("FORWARDER_")})
    assert env["FORWARDER_STORAGE__STATE_DIR"] == "/var/lib/" + first(svc, "StateDirectory")
    runtime_dir = "/run/" + first(svc, "RuntimeDirectory")
    assert Path(env["FORWARDER_INTAKE__UNIX_SOCKET"]).parent == Path(runtime_dir)


def test_activated_unix_socket_lives_outside_the_service_runtime_directory():
    """systemd re-owns RuntimeDirectory= on start and removes it on stop; a socket unit's
    file in there would vanish with the first service stop."""
    runtime_dir = Path("/run") / first(SERVICE["Service"], "RuntimeDirectory")
    listens = [
        v for k, v in unit_directives("intercom-forwarder.socket")["Socket"] if k == "ListenStream"
    ]
    paths = [Path(v) for v in listens if v.startswith("/")]
    assert paths and all(runtime_dir not in p.parents for p in paths)
    assert "127.0.0.1:8377" in listens


def test_dockerfile_runs_the_healthcheck_module_as_a_fixed_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    runtime_stage = text.rsplit("\nFROM ", 1)[1]
    user = re.search(r"^USER (\d+)(?::(\d+))?$", runtime_stage, re.MULTILINE)
    assert user and int(user.group(1)) != 0
    assert 'CMD ["python", "-m", "forwarder.healthcheck"]' in runtime_stage
    assert 'ENTRYPOINT ["intercom-forwarder"]' in runtime_stage
    assert_names_config_keys(set(re.findall(r"\b(FORWARDER_[A-Z_]+?__[A-Z_]+)", text)))


@pytest.mark.parametrize(
    ("example", "grace_pattern"),
    [
        ("k8s-pod.yaml", r"terminationGracePeriodSeconds:\s*(\S+)"),
        ("docker-compose.yaml", r"stop_grace_period:\s*(\S+)"),
    ],
)
def test_sidecar_examples_give_the_drain_time_to_finish_and_set_real_keys(example, grace_pattern):
    text = (REPO / "docs" / "examples" / example).read_text()
    graces = re.findall(grace_pattern, text)
    assert graces and all(seconds(g) > DRAIN_SECONDS for g in graces)
    assert_names_config_keys(set(re.findall(r"\b(FORWARDER_[A-Z_]+?__[A-Z_]+)", text)))
