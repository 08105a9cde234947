"""Running untrusted Python (model-written code and its tests), each program in its own subprocess.

    with Sandbox(Limits(timeout=3.0), workers=2) as box:
        run = box.run("print(1)")           # thread-safe: up to `workers` programs at once
        run.returncode, run.stdout, run.stderr, run.timed_out

What every program gets:

- a fresh temporary folder as its working directory (removed afterwards), the program in it as `prog.py`, run by
  `python -I -S prog.py` (isolated mode, no site-packages), stdin from /dev/null, stdout and stderr to files whose
  tails are read back;
- an environment with nothing of the caller's: PATH, LANG/LC_ALL, HOME and TMPDIR (the temporary folder) only;
- rlimits: CPU seconds, address space, file size, open files, core dumps off, and a process count;
- a wall-clock timeout, after which its whole process group is killed;
- a new session (its own process group), no_new_privs (setuid binaries cannot raise its privileges).

As root (the usual case in containers and CI) it also gets:

- its own unprivileged user and group (an id no account and no running process uses; one per worker, so process
  counts and cleanup never mix workers). It cannot signal the harness (a kill of its parent fails with EPERM), and
  writes outside its folder fail on permissions except in world-writable folders, which it gets private copies of:
- its own mount namespace with empty tmpfs mounts on /tmp, /var/tmp, /dev/shm and /run/lock (private, discarded);
- its own network namespace: a loopback interface that is down, no route anywhere;
- its own IPC namespace;
- after it ends, every process still running under its user id (a fork bomb's children, a daemon that called
  setsid) is killed with one kill(-1) from that user id.

Without root it runs as the caller's user, wrapped in `unshare --user --net --pid --fork --kill-child` where that
works (own network and PID namespaces: a kill of its parent hits only the wrapper, and the kernel kills the
namespace's processes when the program ends); the process count limit is the user's current count plus `nproc`.

What is actually in effect is measured once, by running a probe program in the sandbox (`Sandbox.layers`).
The sandbox does not stop (see the module's caller docs too): reading any world-readable file (the repository,
checkpoints, /etc), using up to memory x nproc of RAM in total (RLIMIT_AS is per process; there are no cgroups),
CPU contention with the harness for the length of the timeout, kernel exploits (no seccomp filter), and, without
root, writes anywhere the caller's user can write.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nextbit.core.errors import NextbitError

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_BIND, MNT_DETACH = 0x4000, 0x40000, 0x2, 0x4, 0x1000, 0x2
PR_SET_NO_NEW_PRIVS = 38
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # the world-writable folders a sandbox gets its own of
TAIL = 4096  # bytes of stdout / stderr read back

_libc = ctypes.CDLL(None, use_errno=True)  # resolved here, in the parent: the forked child only calls them
_unshare, _mount, _umount2, _prctl = _libc.unshare, _libc.mount, _libc.umount2, _libc.prctl
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


@dataclass
class Limits:
    timeout: float = 3.0  # wall-clock seconds per program
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    file_mb: int = 16  # largest file a program may write (RLIMIT_FSIZE)
    nproc: int = 8  # processes (and threads) at once (RLIMIT_NPROC)
    nofile: int = 64  # open files per process (RLIMIT_NOFILE)

    @property
    def cpu_seconds(self) -> int:
        return int(self.timeout) + 2


@dataclass
class Run:
    returncode: Optional[int]  # negative: killed by that signal; None only if it never started
    stdout: str  # the last TAIL bytes
    stderr: str
    timed_out: bool  # the wall-clock timeout ended it
    seconds: float


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _id_ranges(path: str) -> list[tuple[int, int]]:
    """(first, count) of the ids this process may switch to (its user namespace's map)."""
    try:
        return [(int(a), int(c)) for a, _, c in (line.split() for line in Path(path).read_text().splitlines())]
    except (OSError, ValueError):
        return [(0, 65536)]


def _ids_in_use() -> set[int]:
    used: set[int] = set()
    for f in ("/etc/passwd", "/etc/group"):
        try:
            used |= {int(line.split(":")[2]) for line in Path(f).read_text().splitlines() if line.count(":") >= 3}
        except (OSError, ValueError, IndexError):
            pass
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                used.add(d.stat().st_uid)
            except OSError:
                pass
    return used


LOCKS = Path(tempfile.gettempdir()) / "nextbit-sandbox-ids"  # one lock file per id a running sandbox holds


def reserve_ids(count: int) -> tuple[list[int], list[int]]:
    """`count` ids, each free as a user and a group id: in no passwd or group entry, owning no running process,
    mappable in this user namespace, and not held by another sandbox (an flock on LOCKS/<id>, held until the
    sandbox closes). Taken from 2,000,000,000 up where the map allows (above the ranges systemd and container
    runtimes hand out), else from 40,000 up. Returns (ids, lock file descriptors)."""
    ranges, granges = _id_ranges("/proc/self/uid_map"), _id_ranges("/proc/self/gid_map")
    ok = lambda i: any(a <= i < a + c for a, c in ranges) and any(a <= i < a + c for a, c in granges)  # noqa: E731
    used = _ids_in_use()
    LOCKS.mkdir(mode=0o700, exist_ok=True)
    ids: list[int] = []
    fds: list[int] = []
    for start in (2_000_000_000, 40_000):
        for i in range(start, start + 10_000):
            if len(ids) == count:
                return ids, fds
            if not ok(i) or i in used:
                continue
            fd = os.open(LOCKS / str(i), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another sandbox runs under this id
                os.close(fd)
                continue
            ids.append(i)
            fds.append(fd)
        if len(ids) == count:
            return ids, fds
    for fd in fds:
        os.close(fd)
    raise NextbitError(f"the sandbox found no {count} free user ids to run programs under")


def _user_tasks(uid: int) -> int:
    """Processes and threads the user has now (what RLIMIT_NPROC counts)."""
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if d.stat().st_uid == uid:
                    n += len(os.listdir(d / "task"))
            except OSError:
                pass
    return n


class Sandbox:
    def __init__(self, limits: Limits = Limits(), workers: int = 2, python: Optional[str] = None):
        if workers < 1:
            raise NextbitError(f"--workers must be >= 1, got {workers}")
        if limits.timeout <= 0:
            raise NextbitError(f"--timeout must be > 0 seconds, got {limits.timeout}")
        self.limits, self.workers = limits, workers
        self.root = os.geteuid() == 0
        self.ids, self._locks = reserve_ids(workers) if self.root else ([os.getuid()] * workers, [])
        self.base = Path(tempfile.mkdtemp(prefix="nextbit-sandbox-"))
        os.chmod(self.base, 0o711)  # sandbox users may enter their own folders here, not list the others
        self.slots: "queue.Queue[int]" = queue.Queue()
        for i in range(workers):
            self.slots.put(i)
        self.kill = shutil.which("kill") or "/bin/kill"
        self.wrapper: list[str] = []
        self._count = 0
        self._lock = threading.Lock()
        try:
            self.python, self.layers = self._choose_python(python)
        except BaseException:
            self.close()
            raise

    # ---- setup -------------------------------------------------------------------------------------------------
    def _choose_python(self, python: Optional[str]) -> tuple[str, dict]:
        """The first interpreter the sandbox's user can run (this one, else the system's python3), with the probe's
        account of what is in effect."""
        if python:
            cands = [python]
        else:
            cands = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]
        wrappers: list[list[str]] = [[]]
        if not self.root and shutil.which("unshare"):
            wrappers = [[shutil.which("unshare"), "--user", "--net", "--pid", "--fork", "--kill-child", "--"], []]
        tried = []
        for p in dict.fromkeys(c for c in cands if c):
            for w in wrappers:
                self.python, self.wrapper = p, w
                layers = self._probe()
                if layers is not None:
                    return p, layers
                tried.append(p)
        raise NextbitError("the sandbox could not run Python as its unprivileged user (tried "
                           f"{', '.join(dict.fromkeys(tried))}); give an interpreter it can run with --python")

    def _probe(self) -> Optional[dict]:
        mark = f"nextbit-probe-{uuid.uuid4().hex}"
        code = (
            "import json, os, resource, socket, sys\n"
            f"open('/tmp/{mark}', 'w').close()\n"
            "try:\n    up = [n for i, n in socket.if_nameindex()]\nexcept OSError:\n    up = ['?']\n"
            "lim = {n: resource.getrlimit(getattr(resource, 'RLIMIT_' + n))[0] for n in ('CPU', 'AS', 'FSIZE', 'NPROC', 'NOFILE')}\n"
            "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'ifaces': up, 'limits': lim,\n"
            "                  'version': sys.version.split()[0], 'env': sorted(os.environ)}))\n"
        )
        run = self.run(code)
        leaked = Path(f"/tmp/{mark}")
        shared_tmp = leaked.exists()
        leaked.unlink(missing_ok=True)
        if run.returncode != 0:
            return None
        try:
            got = json.loads(run.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None
        me = os.getuid()
        return {
            "python": f"{self.python} ({got['version']})",
            "user": (f"uid {got['uid']} / gid {got['gid']}, unprivileged, one per worker" if got["uid"] != me and got["uid"] != 0
                     else ("root (no privilege drop)" if got["uid"] == 0 and not self.wrapper else f"the caller's own user (uid {me})")),
            "network": "own namespace (loopback only)" if set(got["ifaces"]) <= {"lo"} else "shared with the host",
            "tmp": "private tmpfs on " + ", ".join(d for d in PRIVATE_DIRS if os.path.isdir(d)) if not shared_tmp else "shared /tmp",
            "pid namespace": bool(self.wrapper),
            "rlimits": got["limits"],
            "environment": got["env"],
            "timeout_s": self.limits.timeout,
        }

    # ---- one program -------------------------------------------------------------------------------------------
    def _preexec(self, uid: int, work: Path):
        lim = self.limits
        here = os.fsencode(work)
        holders = {os.fsencode(d) for d in PRIVATE_DIRS if here.startswith(os.fsencode(d) + b"/")}
        chain = [os.fsencode(p) for p in reversed(work.parents) if any(os.fsencode(p).startswith(h) for h in holders)] + [here]
        mb = 1 << 20
        nproc = lim.nproc if self.root else _user_tasks(os.getuid()) + lim.nproc
        limits = [
            (resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 1)),
            (resource.RLIMIT_AS, (lim.memory_mb * mb, lim.memory_mb * mb)),
            (resource.RLIMIT_FSIZE, (lim.file_mb * mb, lim.file_mb * mb)),
            (resource.RLIMIT_NOFILE, (lim.nofile, lim.nofile)),
            (resource.RLIMIT_CORE, (0, 0)),
            (resource.RLIMIT_NPROC, (nproc, nproc)),
        ]
        tmpfs_opts = f"size={max(lim.file_mb * 4, 16)}m,mode=1777".encode()
        dirs = [d.encode() for d in PRIVATE_DIRS if os.path.isdir(d)]
        root = self.root

        def run() -> None:  # in the forked child, before exec: os calls and the pre-resolved libc functions only
            _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            if root:
                if _unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC) != 0:
                    _unshare(CLONE_NEWNET)  # at least the network, where mount namespaces are refused
                # the tmpfs mounts only where the namespace is private (never onto the host's /tmp)
                elif _mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0:
                    for d in dirs:
                        if _mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, tmpfs_opts) != 0 or d not in holders:
                            continue
                        # the working folder was under d: the same path again, inside the new tmpfs, bound to it
                        for part in chain:
                            if not os.path.isdir(part):
                                os.mkdir(part, 0o711)
                        if _mount(b"/proc/self/cwd", here, None, MS_BIND, None) == 0:
                            os.chdir(here)
                        else:  # no way to keep the folder: give the host's d back rather than lose the folder
                            _umount2(d, MNT_DETACH)
            for which, value in limits:
                try:
                    resource.setrlimit(which, value)
                except (ValueError, OSError):
                    pass
            if root:  # mandatory: an exception here fails the start, it never runs as root
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

        return run

    def run(self, source: str) -> Run:
        """Run one program; blocks until it ends or times out. Thread-safe (up to `workers` at once)."""
        slot = self.slots.get()
        try:
            return self._run(source, self.ids[slot])
        finally:
            self.slots.put(slot)

    def _run(self, source: str, uid: int) -> Run:
        with self._lock:
            self._count += 1
            work = self.base / f"s{self._count}"
        work.mkdir(mode=0o700)
        try:
            (work / "prog.py").write_text(source, encoding="utf-8")
            os.chmod(work / "prog.py", 0o644)
            if self.root:
                os.chown(work, uid, uid)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "HOME": str(work), "TMPDIR": str(work)}
            out_f, err_f = work / ".stdout", work / ".stderr"
            t0 = time.perf_counter()
            timed_out = False
            with open(out_f, "wb") as out, open(err_f, "wb") as err:
                try:
                    p = subprocess.Popen([*self.wrapper, self.python, "-I", "-S", "prog.py"], cwd=work, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                         preexec_fn=self._preexec(uid, work), close_fds=True)
                except (OSError, subprocess.SubprocessError) as e:
                    return Run(None, "", f"the sandbox could not start the program: {e}", False, 0.0)
                try:
                    rc = p.wait(timeout=self.limits.timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    self._killpg(p.pid)
                    rc = p.wait()
                seconds = time.perf_counter() - t0
                self._killpg(p.pid)  # whatever it left in its group
                self._reap(uid)
            return Run(rc, _tail(out_f), _tail(err_f), timed_out, seconds)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _killpg(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, uid: int) -> None:
        """As root: kill every process left under the sandbox's user id (kill(-1) from that id reaches exactly
        those, atomically, so a fork bomb cannot outrun it)."""
        if not self.root:
            return
        for _ in range(3):
            try:
                r = subprocess.run([self.kill, "-9", "-1"], user=uid, group=uid, extra_groups=[], env={},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   timeout=10)
            except (OSError, subprocess.SubprocessError):
                return
            if r.returncode != 0:  # kill(-1) found nothing left to signal
                return

    # ---- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(layers: dict) -> str:
    """One line for the log: what the sandbox measured itself to have."""
    lim = layers["rlimits"]
    gib = lambda v: "unlimited" if v < 0 else f"{v / (1 << 30):.1f} GiB"  # noqa: E731
    return (f"sandbox: {layers['user']}; network {layers['network']}; {layers['tmp']}; rlimits cpu {lim['CPU']} s, "
            f"address space {gib(lim['AS'])}, file {lim['FSIZE'] >> 20} MiB, processes {lim['NPROC']}; "
            f"timeout {layers['timeout_s']} s; {layers['python']}")


__all__ = ["Limits", "Run", "Sandbox", "describe", "reserve_ids"]
