"""One writer per sweep directory: a lease with owner, host, pid and a heartbeat.

Two drivers writing one sweep duplicate cells and leave each other's run records wrong,
so `rloop-ray sweep` holds a lease (`lock.json` in the sweep directory) for as long as it
may write. The lease is a small JSON document, not an OS lock, because sweeps live on
shared disks and object stores (S3, GCS) where `flock` does not reach. A background
thread renews the heartbeat every `ttl / 3` seconds; a lease whose heartbeat is older
than its `ttl` belongs to a driver that died (kill -9, a lost node) and is taken over
with a warning (at once when the holder ran on this host and its process is gone).
Taking over writes our document and reads it back after a short pause,
so of two drivers racing for a stale lease exactly one sees itself as the owner.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

LOCK_FILE = "lock.json"
DEFAULT_TTL_SECONDS = 60.0
"""A driver that has not renewed its lease for this long is considered dead."""
SETTLE_SECONDS = 0.2
"""Pause between writing a taken-over lease and reading it back (racing writers settle)."""


class LeaseError(RuntimeError):
    """The sweep directory is leased by another live driver; the message names it."""


class LeaseIO(Protocol):
    """The few file operations a lease needs, relative to the sweep directory."""

    def read_text(self, name: str) -> str | None: ...

    def write_text(self, name: str, text: str) -> None: ...

    def create_text(self, name: str, text: str) -> bool: ...

    def delete(self, name: str) -> None: ...


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    acquired_at: str
    heartbeat_at: float  # unix seconds
    ttl_seconds: float
    command: str = ""

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat_at

    def expired(self, now: float | None = None) -> bool:
        """Heartbeat older than the ttl, or a driver on this host whose process is gone."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return self.age(now) > self.ttl_seconds

    def describe(self) -> str:
        return (f"driver pid {self.pid} on {self.host} (since {self.acquired_at}, "
                f"heartbeat {self.age():.0f}s ago)")


def _pid_alive(pid: int) -> bool:
    """Whether a process of this host still exists (a kill -9'd driver's does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _parse(text: str | None) -> LeaseRecord | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
        return LeaseRecord(**{k: data[k] for k in LeaseRecord.__dataclass_fields__ if k in data})
    except (ValueError, TypeError, KeyError):
        return None  # a torn or foreign lock file: treated as expired


class SweepLease:
    """Context manager holding the lease of one sweep directory.

    `lost` becomes True if another driver took the lease over (our heartbeat stalled past
    the ttl, e.g. a suspended laptop); the driver then stops writing.
    """

    def __init__(self, io: LeaseIO, where: str, *, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                 command: str = "", on_lost: Callable[[], None] | None = None) -> None:
        self.io = io
        self.where = where
        self.ttl = float(ttl_seconds)
        self.owner = uuid.uuid4().hex
        self.command = command
        self.on_lost = on_lost
        self.lost = False
        self.took_over: LeaseRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, acquired_at: str | None = None) -> LeaseRecord:
        return LeaseRecord(
            owner=self.owner, host=socket.gethostname(), pid=os.getpid(),
            acquired_at=acquired_at or _dt.datetime.now(_dt.timezone.utc).isoformat(
                timespec="seconds"),
            heartbeat_at=time.time(), ttl_seconds=self.ttl, command=self.command,
        )

    def _text(self, record: LeaseRecord) -> str:
        return json.dumps(asdict(record), indent=2)

    def acquire(self) -> SweepLease:
        mine = self._record()
        if self.io.create_text(LOCK_FILE, self._text(mine)):
            self._acquired_at = mine.acquired_at
            self._start_heartbeat()
            return self
        current = _parse(self.io.read_text(LOCK_FILE))
        if current is not None and not current.expired():
            raise LeaseError(
                f"{self.where} is being written by another {current.describe()}; "
                f"wait for it to finish, or stop it. A lease left by a driver that died is "
                f"taken over {self.ttl:.0f}s after its last heartbeat."
            )
        self.io.write_text(LOCK_FILE, self._text(mine))
        time.sleep(SETTLE_SECONDS)
        check = _parse(self.io.read_text(LOCK_FILE))
        if check is None or check.owner != self.owner:
            holder = check.describe() if check else "another driver"
            raise LeaseError(f"{self.where}: {holder} took the lease at the same time")
        self.took_over = current
        if current is not None:
            why = ("its process is gone" if current.age() <= current.ttl_seconds
                   else "its heartbeat expired")
            log.warning("took over the lease of %s from %s: %s", self.where,
                        current.describe(), why)
        else:
            log.warning("replaced an unreadable lock file in %s", self.where)
        self._acquired_at = mine.acquired_at
        self._start_heartbeat()
        return self

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="rloop-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = _parse(self.io.read_text(LOCK_FILE))
                if current is not None and current.owner != self.owner:
                    self.lost = True
                    log.error("lost the lease of %s to %s; stopping", self.where,
                              current.describe())
                    if self.on_lost is not None:
                        self.on_lost()
                    return
                self.io.write_text(LOCK_FILE, self._text(self._record(self._acquired_at)))
            except OSError as exc:  # a transient storage error: try again next beat
                log.warning("could not renew the lease of %s: %s", self.where, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        current = _parse(self.io.read_text(LOCK_FILE))
        if current is not None and current.owner == self.owner:
            self.io.delete(LOCK_FILE)

    def __enter__(self) -> SweepLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lease(io: LeaseIO) -> LeaseRecord | None:
    """The current lease of a directory, if any (for `status`)."""
    return _parse(io.read_text(LOCK_FILE))


def lease_info(record: LeaseRecord | None) -> dict[str, Any] | None:
    return None if record is None else asdict(record)
