"""The lock a training run holds on its workdir, so that two runs never write one workdir.

    WORKDIR/lock.json   {"host", "pid", "started", "heartbeat", "token"}

A second `experiments.train` on a workdir in use is refused in one line naming the holder, before it writes
anything. `eval_ppl` and `sample` only read and take no lock. The holder rewrites `heartbeat` every
HEARTBEAT_S seconds (a hook); a lock is stale, and is taken over with a warning, when its process is gone
(same host: no such pid) or, from another host (shared storage), when its heartbeat is older than
STALE_AFTER_S. On a local disk the lock file is created with O_EXCL, so of two runs started at once exactly
one wins; on object storage (gs://), which has no exclusive create, the winner is whoever's write is read
back. On a pod, process 0 holds the lock.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import time
import uuid

from etils import epath

from llama_jax.errors import CheckpointError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # 10 missed heartbeats: the holder on another host is gone

log = logging.getLogger("llama_jax.lock")


@dataclasses.dataclass
class WorkdirLock:
    path: epath.Path
    token: str
    last_beat: float

    @classmethod
    def acquire(cls, workdir) -> WorkdirLock:
        """Take the workdir's lock, or raise CheckpointError naming the run that holds it."""
        workdir = epath.Path(workdir)
        if workdir.exists() and not workdir.is_dir():
            raise CheckpointError(f"--workdir={workdir} is a file, not a directory; name a new or existing workdir.")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / f"{LOCK_FILE}.probe").write_text("")  # a read-only place fails here, before any work
            (workdir / f"{LOCK_FILE}.probe").unlink()
        except OSError as e:
            raise CheckpointError(f"cannot write to --workdir={workdir} ({e.strerror}); choose a writable one.") from e
        path = workdir / LOCK_FILE
        held = _read(path)
        if held is not None:
            reason = _stale_reason(held)
            if reason is None:
                raise CheckpointError(_in_use_message(workdir, held))
            log.warning("taking over the lock on %s from %s (%s)", workdir, _holder(held), reason)
            path.unlink(missing_ok=True)
        now = time.time()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                "token": uuid.uuid4().hex}
        if not _create(path, info) or (_read(path) or {}).get("token") != info["token"]:
            raise CheckpointError(_in_use_message(workdir, _read(path) or {}))
        return cls(path, info["token"], now)

    def heartbeat(self, now: float | None = None) -> None:
        """Refresh the heartbeat if HEARTBEAT_S have passed (cheap to call every step)."""
        now = time.time() if now is None else now
        if now - self.last_beat < HEARTBEAT_S:
            return
        held = _read(self.path)
        if held is None or held.get("token") != self.token:
            raise CheckpointError(
                f"the lock on {self.path.parent} was taken by {_holder(held or {})} while this run held it "
                "(its heartbeat looked stale); stop one of the two runs."
            )
        held["heartbeat"] = now
        tmp = self.path.parent / f"{LOCK_FILE}.{self.token}.tmp"
        tmp.write_text(json.dumps(held))
        tmp.replace(self.path)
        self.last_beat = now

    def release(self) -> None:
        held = _read(self.path)
        if held is not None and held.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _read(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # half-written by a run killed mid-write: stale unless its pid lives (it has none)


def _create(path: epath.Path, info: dict) -> bool:
    if "://" in os.fspath(path):  # object storage: no exclusive create; _read decides the winner
        path.write_text(json.dumps(info))
        time.sleep(0.5)  # let a concurrent writer's object land before reading back
        return True
    try:
        fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    return True


def _stale_reason(held: dict) -> str | None:
    """Why the lock `held` no longer protects a live run, or None if it does."""
    if not held.get("token"):
        return "the lock file is unreadable"
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return f"process {held['pid']} is gone"
        except PermissionError:  # it exists, owned by another user
            return None
        return None
    age = time.time() - float(held.get("heartbeat", 0))
    return f"no heartbeat for {age:.0f} s" if age > STALE_AFTER_S else None


def _holder(held: dict) -> str:
    return f"pid {held.get('pid', '?')} on {held.get('host', '?')}"


def _in_use_message(workdir, held: dict) -> str:
    started = datetime.datetime.fromtimestamp(float(held.get("started", 0))).isoformat(timespec="seconds")
    age = time.time() - float(held.get("heartbeat", time.time()))
    return (
        f"{workdir} is in use by a training run ({_holder(held)}, started {started}, last heartbeat "
        f"{age:.0f} s ago). Wait for it to finish or stop it, or use another --workdir; eval_ppl and "
        f"sample can read the workdir meanwhile. A lock left by a killed run is taken over automatically "
        f"(same host: at once; another host: after {STALE_AFTER_S:.0f} s without a heartbeat)."
    )
