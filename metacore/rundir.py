"""A run directory (`metacore train --out DIR`): opening it for training, and its lock.

    RUN_FILES                   the files that make a directory hold a run
    open_run_dir(path) -> RunLock   create the directory if needed and take its lock
    run_files(path) -> [names]  which of RUN_FILES are present

The lock is an OS advisory lock, fcntl.flock(LOCK_EX | LOCK_NB) on DIR/run.lock, held by the
training process from before it looks at the directory until its training ends (the end of
Trainer.train, Trainer.close, or the process's exit). A second process on the same directory is refused at once with
RunLockedError naming the holder's PID (written into the lock file by the holder). The OS
drops a flock when its holder dies, SIGKILL included, so a killed run never blocks
`--resume`; the lock file itself is left in place (deleting it would let two processes lock
two different files of the same name).

flock locks belong to an open file description: two Trainers of one process on one directory
also exclude each other, as two processes do.
"""
import os
import time

from metacore.errors import RunDirError, RunLockedError

try:
    import fcntl
except ImportError:            # not POSIX (Windows): no lock, as before this module existed
    fcntl = None

LOCK_NAME = "run.lock"
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.npz")


def run_files(path):
    """The names of RUN_FILES present in the directory `path`."""
    return [n for n in RUN_FILES if os.path.exists(os.path.join(path, n))]


def _check_dir(path):
    """Refuse, naming the path, what os.makedirs would report as a raw OSError."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"{path} exists and is not a directory; --out must be a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"cannot create {path}: {parent} is a file, not a directory")


class RunLock:
    """The flock on DIR/run.lock; see the module docstring. release() is idempotent."""

    def __init__(self, path):
        self.path = os.path.join(path, LOCK_NAME)
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            self.fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = _read_pid(fd)
            os.close(fd)
            who = f"PID {holder}" if holder else "a process whose PID is not yet written"
            raise RunLockedError(
                f"{os.path.dirname(self.path)} is in use by another metacore process "
                f"({who}; lock {self.path}); wait for it to end or choose another --out")
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd
        return self

    def release(self):
        """Close the lock file, which releases the flock. Safe to call more than once."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    @property
    def held(self):
        return self.fd is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()


def _read_pid(fd, wait_s=0.5):
    """The PID the holder wrote, or None; it writes right after locking, so wait briefly for
    an empty file to fill."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def open_run_dir(path):
    """Create the run directory `path` (and its parents) if needed and lock it. -> RunLock
    (held); raises RunDirError for a path that cannot be a directory, RunLockedError when
    another process holds it."""
    _check_dir(path)
    os.makedirs(path, exist_ok=True)
    return RunLock(path).acquire()
