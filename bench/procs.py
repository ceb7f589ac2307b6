"""Processes for the benchmarks: each in its own process group, pinned to a core and stopped as a
group (on exit, Ctrl-C or error); waiting for ports; CPU accounting per core (the noise gauge)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# One worker under test on one core; everything that makes load or answers it on the other.
SUT_CPU, LOAD_CPU = "0", "1"
REPO = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ------------------------------------------------------------------------------
class Processes:
    """Every child in its own process group, stopped as a group (uvicorn, nginx's workers)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: str,
        env: dict[str, str] | None = None,
        stdout: Path | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        out = (stdout or self.workdir / f"{name}.stdout").open("ab")
        err = (self.workdir / f"{name}.stderr").open("ab")
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        err.close()
        self.procs.append((name, proc))
        _GROUP_CORE[proc.pid] = cpu  # start_new_session: the pid is the group id
        return proc

    def pid(self, name: str) -> int:
        # taskset execs the command, so the pid is the server's own.
        return next(proc.pid for n, proc in self.procs if n == name)

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        path = self.workdir / f"{name}.stderr"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            _stop_group(name, proc)
        self.procs.clear()


def _stop_group(name: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the group, wait, then SIGKILL whatever is left of it (nginx's worker, threads).

    The group is signalled only while its leader is unreaped (a zombie at worst), so its id
    cannot have been reused by an unrelated process."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        # Reaped already (it died during the run): kill any member it left behind.
        for pid in _group_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        log(f"  could not reap {name} (pid {proc.pid})")


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name) of every live process: field 2 is
    the process group, 11-14 utime, stime, cutime, cstime in clock ticks."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                yield int(entry.name), Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue


def tcp_peer_ports(pid: int) -> list[int]:
    """Remote ports of the process's established TCP connections (its socket fds matched by inode
    in /proc/net/tcp and tcp6, which list the process's network namespace)."""
    inodes: set[str] = set()
    for fd in os.scandir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(fd.path)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports: list[int] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local remote state ... uid timeout inode
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                ports.append(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def _group_members(pgid: int) -> list[int]:
    return [pid for pid, fields in proc_stats() if int(fields[2]) == pgid]


def wait_http(url: str, *, timeout: float = 20.0, procs: Processes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:g}s")


def wait_port(port: int, *, timeout: float = 10.0, procs: Processes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check_alive()
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not open after {timeout:g}s")


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# -- the fixed upstream, redis, candidates ----------------------------------------------------
def cpu_seconds(pid: int | None) -> float:
    """utime + stime of the whole process (all threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_seconds() -> dict[str, float]:
    """Busy time per core (everything but idle and iowait), from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name[3:] in (SUT_CPU, LOAD_CPU) and name.startswith("cpu"):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            busy[name[3:]] = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy


_GROUP_CORE: dict[int, str] = {}  # process group -> the core its processes are pinned to


def own_cpu_seconds() -> dict[str, float]:
    """CPU used so far by this script's children, per core they are pinned to: every process in
    a group started by `Processes` (nginx's worker included), plus reaped children (wrk)."""
    own = {
        SUT_CPU: 0.0,
        LOAD_CPU: resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
    }
    tick = os.sysconf("SC_CLK_TCK")
    for _, fields in proc_stats():
        core = _GROUP_CORE.get(int(fields[2]))  # pgrp
        if core is not None:
            own[core] += (int(fields[11]) + int(fields[12])) / tick
    return own


class CoreLoad:
    """How much of each core went to work other than this benchmark's: the noise gauge."""

    def __init__(self) -> None:
        self.busy, self.own, self.wall = core_busy_seconds(), own_cpu_seconds(), time.monotonic()

    def other(self) -> dict[str, float]:
        busy, own, wall = core_busy_seconds(), own_cpu_seconds(), time.monotonic() - self.wall
        return {
            core: round(max(0.0, (busy[core] - self.busy[core] - (own[core] - self.own[core])) / wall), 3)
            for core in (SUT_CPU, LOAD_CPU)
        }


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it): thousands of
    open streams need a socket each, on the client and on the server."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
