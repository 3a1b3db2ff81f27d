"""One run per output folder: ``run.lock`` (pid, host, start time, run id) held for the run's life.

A second run in the same folder fails at once naming the holder; a lock left by a process
that is gone (same host, dead pid) is taken over with a warning. A lock from another host
cannot be checked: the error says which file to delete. The same process may re-enter
(a trainer that runs a nested fit in its own folder). Folders the lock created are removed
again on release when the run left them empty (a run that failed in its set-up, e.g. on a
malformed data file, leaves no empty output folder behind).
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import uuid
import warnings

from latentfast import files

LOCK = "run.lock"


class RunLockedError(RuntimeError):
    """Another live run holds this output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, folder, run_id: str | None = None):
        self.path = pathlib.Path(folder) / LOCK
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.owned = False
        self.created: list[pathlib.Path] = []  # folders acquire() made, deepest first

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def acquire(self) -> "RunLock":
        folder = self.path.parent.absolute()
        self.created = [d for d in (folder, *folder.parents) if not d.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            tmp = files.tmp_name(self.path)
            tmp.write_text(json.dumps(self._mine()))
            try:
                os.link(tmp, self.path)  # atomic, fails when it exists: the content is whole at once
                self.owned = True
                return self
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            held = self.holder()
            if held == {}:  # released meanwhile
                continue
            if held is None or (held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1)))):
                what = "an unreadable lock" if held is None else \
                    f"pid {held.get('pid')}, started {held.get('start')}, is gone"
                warnings.warn(f"{self.path}: taking over a stale run lock ({what})", RuntimeWarning, stacklevel=3)
                self.path.unlink(missing_ok=True)
                continue
            if held.get("host") == socket.gethostname() and int(held.get("pid", -1)) == os.getpid():
                self.run_id = held.get("run_id", self.run_id)  # re-entered by this process: the outer run owns it
                return self
            raise RunLockedError(
                f"{self.path.parent} is in use by another run: pid {held.get('pid')} on {held.get('host')}, started "
                f"{held.get('start')} (run {held.get('run_id')}). Two runs in one --output_dir overwrite each "
                f"other's checkpoints: pass another --output_dir, wait for it to finish, or delete {self.path} if "
                f"that run is gone")
        raise RunLockedError(f"{self.path}: could not take the run lock (it keeps changing)")

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.owned and (self.holder() or {}).get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)
            for d in self.created:  # only while empty: rmdir never deletes a file
                try:
                    d.rmdir()
                except OSError:
                    break
        self.owned = False
        self.created = []


__all__ = ["LOCK", "RunLock", "RunLockedError"]
