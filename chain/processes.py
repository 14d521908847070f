"""A small supervisor for one child process: start with a log file, wait until ready, stop."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now, chosen BELOW the kernel's ephemeral range:
    a port from that range can be taken by any outgoing connection before the server binds it."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free TCP port on {host} below {low}")


# Ports already given to a caller of this process: never hand one out twice.
_handed_out: set[int] = set()


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def apply_env(env: dict[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """`env` with `changes` made in place (a value of None unsets the variable); returns it."""
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def rotate_log(path: Path, max_bytes: int, keep: int = 3) -> bool:
    """Rotate `path` when it exceeds `max_bytes`: copies `path.1 .. path.<keep>` (oldest
    dropped), then truncates `path` in place (logrotate's `copytruncate`: the child keeps
    writing to its open file, opened in append mode, so its next lines start the new file;
    a line written between the copy and the truncation can be lost). Returns whether it did."""
    path = Path(path)
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{index + 1}"))
    with path.open("rb") as source, path.with_name(f"{path.name}.1").open("wb") as copy:
        while chunk := source.read(1 << 20):
            copy.write(chunk)
    os.truncate(path, 0)
    return True


class ProcessFailed(RuntimeError):
    pass


class ManagedProcess:
    """One child process with its output in `log_path`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 60.0) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = subprocess.Popen(
            self.argv, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
            start_new_session=True,
        )
        log_file.close()
        if self.ready is not None:
            try:
                self.wait_ready(timeout)
            except BaseException:  # not ready: never left running behind the caller's back
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ProcessFailed(f"{self.name} exited early:\n{self.tail()}")
            if self.ready is None or self.ready():
                return
            time.sleep(0.2)
        raise ProcessFailed(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Send `sig` to the process group and wait; SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss: killing it", self.name, timeout)
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group, no clean-up."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def restart(self, timeout: float = 60.0) -> ManagedProcess:
        self.stop()
        return self.start(timeout)

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
