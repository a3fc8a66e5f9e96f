"""What `serve` needs from the machine before it starts, checked without starting it.

load_config() checks each value on its own and stops at the first bad one; preflight()
checks what a valid config asks of this host and process (a token, a state dir it can
create and write, a Unix socket it can bind) and returns every problem at once. `serve`
runs it before building the service and `check-config` runs the same function, so both
refuse the same configs with the same messages, one line a problem, each naming its key.

Nothing here writes: a state dir that does not exist yet is judged by its nearest existing
parent, as `serve` would create it there. Writability is os.access(), which honours
permissions, ACLs and read-only mounts for the real uid. Imports: config only.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .config import Config, ConfigError

# sockaddr_un.sun_path is 108 bytes on Linux, the terminating NUL included; a longer path
# fails at bind() with "AF_UNIX path too long", after everything else has started.
MAX_UNIX_SOCKET_PATH_BYTES = 107
NO_TOKEN = ("no Intercom access token: set INTERCOM_ACCESS_TOKEN, "
            "intercom.access_token_file or intercom.access_token")


def preflight(config: Config, *, socket_activated: bool = False) -> list[ConfigError]:
    """Every reason `serve` would refuse this config at start, in key order; [] if none.

    socket_activated: systemd passed the listening sockets (LISTEN_FDS), so the daemon
    binds nothing itself and intake.unix_socket is not its to create.
    """
    problems: list[ConfigError] = []
    if not socket_activated and config.intake.unix_socket:
        problems += _unix_socket(config.intake.unix_socket)
    if not config.intercom.access_token:
        problems.append(ConfigError("intercom.access_token", NO_TOKEN))
    problems += _state_dir(config.storage.state_dir)
    return problems


def _state_dir(path_text: str) -> list[ConfigError]:
    key, path = "storage.state_dir", Path(path_text)
    if path.exists():
        if not path.is_dir():
            return [ConfigError(key, f"{path} exists and is not a directory")]
        if not _writable(path):
            return [ConfigError(key, f"{path} is not writable by {_who()}")]
        return []
    parent = _nearest_existing(path)
    if not parent.is_dir():
        return [ConfigError(key, f"{path} cannot be created: {parent} is not a directory")]
    if not _writable(parent):
        return [ConfigError(key, f"{path} cannot be created: {parent} is not writable "
                                 f"by {_who()}")]
    return []


def _unix_socket(path_text: str) -> list[ConfigError]:
    key, path = "intake.unix_socket", Path(path_text)
    problems = []
    size = len(os.fsencode(path_text))
    if size > MAX_UNIX_SOCKET_PATH_BYTES:
        problems.append(ConfigError(key, f"{path} is {size} bytes long; a Unix socket path "
                                         f"can be at most {MAX_UNIX_SOCKET_PATH_BYTES}"))
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        problems.append(ConfigError(key, f"the socket's directory {directory} {what}"))
    elif not _writable(directory):
        problems.append(ConfigError(key, f"the socket's directory {directory} is not "
                                         f"writable by {_who()}"))
    try:
        mode = path.lstat().st_mode
    except OSError:
        mode = None  # absent (the usual case), or the directory problem above
    if mode is not None and not stat.S_ISSOCK(mode):
        problems.append(ConfigError(key, f"{path} exists and is not a socket"))
    return problems


def _nearest_existing(path: Path) -> Path:
    for candidate in path.absolute().parents:
        if candidate.exists():
            return candidate
    return Path("/")


def _writable(directory: Path) -> bool:
    """Whether a file can be created there. os.access() alone says yes to root everywhere,
    /proc and read-only mounts included, so a root daemon would pass the check and then
    fail at start: create and remove a probe file as well."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".forwarder-preflight-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _who() -> str:
    return f"uid {os.getuid()}"
