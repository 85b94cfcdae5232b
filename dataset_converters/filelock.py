"""An exclusive lock on a file that a killed holder never leaves behind.

The operating system's advisory lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on
Windows) is released when its holder ends, however it ends, so a crash or ``kill -9``
leaves nothing stuck. The lock file holds the holder's pid and start time, for the
message of whoever is refused, and is removed when the holder lets go. Used by the converters (one conversion of a dataset into a
folder at a time), by the benchmark runner (one writer per output folder) and by a run's
stages (one run at a time builds a dataset's cached stages; the others wait, then reuse them).
"""

import os
import time
from datetime import datetime, timezone


class LockBusy(OSError):
    """The lock is held by another process; ``holder`` says which (pid, start time)."""

    def __init__(self, path, holder):
        super().__init__(f"{path} is locked" + (f" by {holder}" if holder else ""))
        self.path = path
        self.holder = holder


class FileLock:
    def __init__(self, path):
        self.path = path
        self._fd = None

    def acquire(self):
        """Take the lock or raise :class:`LockBusy` at once (never waits)."""
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock_fd(fd)
            except OSError:
                try:
                    os.lseek(fd, 0, os.SEEK_SET)
                    holder = os.read(fd, 200).decode("utf-8", "replace").strip()
                except OSError:
                    holder = ""
                os.close(fd)
                raise LockBusy(self.path, holder) from None
            # the holder before us removes the file as it lets go: the lock we got must be on
            # the file that the path names now, or it guards nothing
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            _unlock_fd(fd)
            os.close(fd)
        else:
            raise LockBusy(self.path, "the lock file keeps being replaced")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()}, started {started}\n".encode())
        self._fd = fd
        return self

    def acquire_waiting(self, on_busy=None, poll_seconds=1.0, report_every=60.0):
        """Take the lock, waiting for its holder to let go (or to end, however it ends).

        ``on_busy(holder, waited_seconds)`` is called when the lock is first found held and
        then every ``report_every`` seconds of waiting, so a waiting process can say why."""
        t0 = time.monotonic()
        next_report = 0.0
        while True:
            try:
                return self.acquire()
            except LockBusy as e:
                waited = time.monotonic() - t0
                if on_busy is not None and waited >= next_report:
                    on_busy(e.holder, waited)
                    next_report = waited + report_every
            time.sleep(poll_seconds)

    def release(self):
        """Let go; the lock file is removed (while still locked, so no one else holds it)."""
        if self._fd is not None:
            try:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
                _unlock_fd(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _lock_fd(fd):
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock_fd(fd):
    try:
        import fcntl
    except ImportError:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
