"""Run untrusted Python (a model's completion) in a throw-away, locked-down child process.

``run_sandboxed(code)`` writes ``code`` to a fresh temporary directory and runs it with
``python -I -S`` (isolated mode: no ``PYTHON*`` variables, no user site, no script
directory on ``sys.path``; ``-S``: no ``site`` module, so no site-packages and no ``.pth``
tricks — the program gets the standard library only). The chain of processes is::

    caller --Popen(new session)--> wrapper (root; unshares namespaces)
                                      '--fork--> init (pid 1 of a new pid namespace; mounts)
                                                    '--fork--> program (rlimits, own uid, exec python)

Protected, where the kernel allows it (``active_protections()`` says which; a probe run on
first use decides, the result is logged once, and later runs fail loudly rather than run
with less than the probe had):

- **network**: a new network (and IPC) namespace with no interface up; every connection,
  even to 127.0.0.1, fails.
- **processes**: a new pid namespace whose init is our code; when it exits (the program
  ended or the wall-clock limit hit) the kernel kills everything left inside, including
  children that called ``setsid``/daemonized. The caller also kills the whole process
  group. ``RLIMIT_NPROC`` bounds fork bombs, but Linux does not enforce it for root, so it
  only counts when the program runs as its own unprivileged uid (below).
- **filesystem**: a new mount namespace in which every mount is remounted read-only; the
  working directory is a private, size-capped tmpfs (gone with the namespace), and a fresh
  ``/proc`` shows only the sandbox's processes.
- **unix sockets, shared memory** (``private_tmp``): ``/tmp``, ``/var/tmp``, ``/run``,
  ``/var/run`` and ``/dev/shm`` are empty read-only tmpfs (the sandbox's own directory is
  bound back in when it lives under one), so the socket files there (D-Bus, X11, Docker),
  connectable even on a read-only mount and outside the network namespace, are not reachable.
- **memfd** (``no_memfd``): a seccomp filter makes ``memfd_create`` and ``shmget`` fail with
  EPERM (their pages do not count against ``RLIMIT_AS``), and every syscall of another ABI
  (x32, ``int 0x80``). cgroup v2 limits are not used (see docs/sandbox.md).
- **caller death**: the wrapper gets SIGTERM when the caller (its thread) dies
  (``PR_SET_PDEATHSIG``), kills the namespace's init, and removes the temp dir itself.
- **privileges**: the program runs under a random unused uid/gid (no supplementary groups,
  so no capabilities, no access to root's 0700 files such as ``/root``), with
  ``no_new_privs`` so set-uid binaries cannot regain root. The interpreter's prefix is
  bind-mounted inside the temp dir because it may live under ``/root`` (pyenv).
- **resources**: ``RLIMIT_CPU`` (then SIGKILL at +1 s), ``RLIMIT_AS`` (memory; Python raises
  ``MemoryError``), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``; a wall-clock
  limit; stdout/stderr read incrementally and capped (head and tail kept), so a program
  printing without end cannot fill the caller's memory.
- **secrets**: the environment is built from nothing (``PATH``, ``HOME``, ``LANG``, and
  ``LD_LIBRARY_PATH`` for the bound interpreter); nothing of the caller's is passed.

Not protected: reading world-readable files (the root filesystem is visible, read-only);
CPU time and memory of the *machine* beyond the per-process limits (a program may run
``max_processes`` processes of ``memory_mb`` each until the wall-clock limit: 4 × 512 MB by
default, and ``code_execution`` runs at most 4 sandboxes at once, so 8 GB in the worst case;
64 × 512 MB, the old default, exceeded the 24 GB machines this runs on); timing and
kernel side channels; kernel exploits (this is not a VM or seccomp jail — for hostile
code at scale, run the trainer itself inside a container or VM). docs/sandbox.md has the
threat model. Without namespaces
(non-root, or a container without CAP_SYS_ADMIN) only rlimits, the clean environment,
the temp working directory and the process-group kill remain.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from grpokit.errors import RewardError

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 10_000  # bytes kept per stream: the first and last half
WORK_DIR_MB = 32  # size of the tmpfs working directory and RLIMIT_FSIZE
_NS_STEPS = ("network_namespace", "readonly_root", "private_tmp", "pid_namespace", "unprivileged_user", "no_new_privs",
             "no_memfd")
# Directories where services put their Unix socket files (D-Bus, X11, Docker, systemd) and where
# shared memory lives: inside the sandbox each is an empty, read-only tmpfs.
_MASKED_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm")
# seccomp: the syscalls whose memory escapes RLIMIT_AS (a memfd's or a SysV segment's pages are
# not in the address space until mapped, and need not ever be): (audit arch, [syscall numbers])
_SECCOMP_DENY = {
    "x86_64": (0xC000003E, [319, 29]),  # memfd_create, shmget
    "aarch64": (0xC00000B7, [279, 194]),
}

# The wrapper runs as a fresh, single-threaded `python -I -S -c` (not a preexec_fn, which
# is unsafe in a multi-threaded caller such as the reward thread pool). It reports to the
# caller as JSON lines on a private pipe (fd `ctl`) that the program itself never inherits.
_WRAPPER = r'''
import ctypes, errno, json, os, re, resource, select, shutil, signal, struct, sys
cfg = json.loads(sys.argv[1])
ctl, tmp, work, uid = cfg["ctl"], cfg["tmp"], cfg["work"], cfg["uid"]
os.set_inheritable(ctl, False)
libc = ctypes.CDLL(None, use_errno=True)
child, dying = None, False

def on_term(*_):  # the caller asks us to stop, or it died (PR_SET_PDEATHSIG): kill init, hence the namespace
    global dying
    dying = True
    if child:
        os.kill(child, signal.SIGKILL)

signal.signal(signal.SIGTERM, on_term)
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGTERM when the caller('s thread) ends
if os.getppid() != cfg["caller"]:  # it ended before that took effect
    on_term()
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
NEWNS, NEWIPC, NEWNET, NEWPID = 0x20000, 0x8000000, 0x40000000, 0x20000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
done, reasons = {}, {}

def report(**msg):
    os.write(ctl, (json.dumps(msg) + "\n").encode())

def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

def attempt(name, fn):
    if name not in cfg["want"]:
        done[name] = False
        return False
    try:
        fn()
    except OSError as exc:
        if cfg["strict"]:
            report(error=f"{name}: {exc}")
            os._exit(1)
        done[name], reasons[name] = False, str(exc)
        return False
    done[name] = True
    return True

def private_mounts():
    check(libc.unshare(NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, REC | PRIVATE)  # nothing we mount leaks back to the host

def mount_points():
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)  # " " is \040
    with open("/proc/self/mountinfo") as f:
        return [(unescape(line.split()[4]), line.split()[5].split(",")) for line in f]

def lock_filesystem():
    if cfg["prefix_rel"] is not None:  # the interpreter may sit under /root (mode 0700)
        mount(cfg["prefix"], tmp + "/py", None, BIND | REC)
    for target, opts in mount_points():
        flags = REMOUNT | BIND | RDONLY | NOSUID | (NODEV if "nodev" in opts else 0) | (NOEXEC if "noexec" in opts else 0)
        try:
            mount(None, target, None, flags)
        except OSError as exc:  # a mount hidden under a later one has no path left: unreachable anyway
            if target == "/" or exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
    if done.get("pid_namespace"):  # a /proc that lists only this namespace's processes
        mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
    owner = uid if "unprivileged_user" in cfg["want"] else 0
    mount("tmpfs", work, "tmpfs", NOSUID | NODEV, f"size={cfg['work_mb']}m,mode=0700,uid={owner},gid={owner}")

def mask_shared_dirs():
    # socket files with open permissions are connectable even on a read-only mount, and the
    # network namespace does not cover them: hide those directories behind empty tmpfs
    keep = os.open(tmp, os.O_PATH | os.O_DIRECTORY)  # our own dir, which may sit under one of them
    masked = []
    for target in cfg["masked"]:
        if os.path.islink(target) or not os.path.isdir(target):
            continue  # /var/run -> /run: masked with its target
        mount("tmpfs", target, "tmpfs", NOSUID | NODEV | NOEXEC, "size=64k,mode=0755")
        masked.append(target)
    if any(tmp.startswith(target.rstrip("/") + "/") for target in masked):
        os.makedirs(tmp, 0o755, exist_ok=True)
        mount(f"/proc/self/fd/{keep}", tmp, None, BIND | REC)  # with the work tmpfs and py/ below it
    os.close(keep)
    for target in masked:
        mount(None, target, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | NOEXEC)

def deny_memfd():
    if not cfg["seccomp"]:
        raise OSError(errno.ENOSYS, f"no seccomp filter for this architecture ({os.uname().machine})")
    arch, denied = cfg["seccomp"]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), ("deny",)]  # another ABI (int 0x80 on x86_64): deny all
    prog += [(LD, 0, 0, 0)]
    if arch == 0xC000003E:
        prog += [(JGE, 0, 1, 0x40000000), ("deny",)]  # the x32 ABI: its own numbers, deny all
    for nr in denied:
        prog += [(JEQ, 0, 1, nr), ("deny",)]
    prog += [(RET, 0, 0, 0x7FFF0000)]  # SECCOMP_RET_ALLOW
    deny = (RET, 0, 0, 0x00050000 | errno.EPERM)  # SECCOMP_RET_ERRNO
    code = b"".join(struct.pack("HBBI", *(deny if ins == ("deny",) else ins)) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")

def start_program():
    try:
        exe, env = cfg["python"], dict(cfg["env"])
        if done.get("readonly_root") and cfg["prefix_rel"] is not None:
            exe = tmp + "/py/" + cfg["prefix_rel"]
            env["LD_LIBRARY_PATH"] = tmp + "/py/lib"  # a pyenv python's RUNPATH names /root/...
        for name, soft, hard in cfg["limits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if "unprivileged_user" in cfg["want"]:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (a uid change clears it): die with init
        if "no_new_privs" in cfg["want"]:
            check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.chdir(work)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; its children should not
            signal.signal(sig, signal.SIG_DFL)
        os.execve(exe, [exe, "-I", "-S", cfg["script"]], env)
    except OSError as exc:
        report(error=f"starting the program: {exc}")
    os._exit(127)

def init(alive):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die (and take the namespace) with the wrapper
    if select.select([alive], [], [], 0)[0]:  # EOF: the wrapper died before that took effect
        os._exit(1)
    os.close(alive)
    if done.get("readonly_root"):
        attempt("readonly_root", lock_filesystem)
    if done.get("readonly_root"):
        attempt("private_tmp", mask_shared_dirs)
    else:
        done["private_tmp"] = False
    attempt("no_memfd", deny_memfd)  # inherited by the program; init is root, allowed to install it
    done["unprivileged_user"] = "unprivileged_user" in cfg["want"]
    done["no_new_privs"] = "no_new_privs" in cfg["want"]
    program = os.fork()
    if program == 0:
        start_program()
    report(protections=done, reasons=reasons)
    while True:  # as pid 1 we also reap orphans, until the program itself ends
        pid, status = os.wait()
        if pid == program:
            report(status=status)
            os._exit(0)  # pid 1 exiting: the kernel kills whatever the program left behind

host_mounts = os.open("/proc/self/ns/mnt", os.O_RDONLY)  # to go back to, to remove our directory
attempt("network_namespace", lambda: check(libc.unshare(NEWNET | NEWIPC), "unshare(CLONE_NEWNET|CLONE_NEWIPC)"))
attempt("readonly_root", private_mounts)
attempt("pid_namespace", lambda: check(libc.unshare(NEWPID), "unshare(CLONE_NEWPID)"))
alive_r, alive_w = os.pipe()  # init's way to see that we died before its PR_SET_PDEATHSIG took effect
if not dying:
    child = os.fork()
    if child == 0:
        os.close(alive_w)
        init(alive_r)
    os.close(alive_r)
    if dying:  # SIGTERM came between the fork and the assignment
        os.kill(child, signal.SIGKILL)
    # SIGTERM (the caller asks us to stop, or died): kill init, and wait for the namespace to be torn down
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # not reaped yet, so a late SIGTERM cannot hit a reused pid
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.waitpid(child, 0)
# SIGTERM: the caller gave up on us (it tolerates a missing directory) or died (then getppid() may
# still name it: a dying multi-threaded caller hands us to another of its threads first)
if dying or os.getppid() != cfg["caller"]:
    if done.get("readonly_root"):  # in our namespace it is read-only, and py/ work/ are mount points
        libc.setns(host_mounts, NEWNS)  # (the namespace dies with us: init is gone)
    shutil.rmtree(tmp, ignore_errors=True)
os._exit(0)
'''


@dataclass
class SandboxResult:
    """What a sandboxed run did. ``stdout``/``stderr`` keep the first and last
    ``OUTPUT_LIMIT // 2`` bytes each. ``returncode`` is negative when a signal ended the
    program (``-9`` after the wall-clock limit). ``killed``: a signal ended it (ours, or
    the kernel's for the CPU limit)."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed: bool
    duration_s: float


class _Capped:
    """Keeps the head and tail of a byte stream, counting what was dropped in between."""

    def __init__(self, limit: int = OUTPUT_LIMIT):
        self.half, self.head, self.tail, self.total = limit // 2, b"", b"", 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = max(self.half - len(self.head), 0)
        self.head += data[:room]
        self.tail = (self.tail + data[room:])[-self.half:]

    def text(self) -> str:
        dropped = self.total - len(self.head) - len(self.tail)
        middle = f"\n... [{dropped} bytes cut] ...\n".encode() if dropped else b""
        return (self.head + middle + self.tail).decode("utf-8", errors="replace")


_probe_lock = threading.Lock()
_protections: dict[str, bool] | None = None


def active_protections() -> dict[str, bool]:
    """Which protections ``run_sandboxed`` applies on this machine (probed once, then cached)."""
    global _protections
    with _probe_lock:
        if _protections is None:
            _protections = _probe()
    return dict(_protections)


def _probe() -> dict[str, bool]:
    # Namespaces need root or CAP_SYS_ADMIN; the own-uid step needs an interpreter that uid can
    # run. Try everything, then drop the own uid if the program could not start under it.
    want, first_error = set(_NS_STEPS), None
    if os.geteuid() != 0:  # only root can hand the program a uid of its own
        want.discard("unprivileged_user")
    for _ in range(2):
        result, found, error = _run(want, strict=False, code="print('ok')", timeout_s=10.0, cpu_s=5,
                                    memory_mb=512, max_processes=64, stdin="")
        if result.stdout.strip() == "ok" and not error:
            break
        first_error = first_error or error or result.stderr.strip()[-300:]
        want.discard("unprivileged_user")
    else:
        raise RewardError(f"the code sandbox cannot start Python ({error or result.stderr.strip()}); "
                          "check that the interpreter and its standard library are readable")
    protections = {name: bool(found["protections"].get(name)) for name in _NS_STEPS}
    protections.update(
        rlimit_cpu=True, rlimit_memory=True, rlimit_fsize=True,
        rlimit_nproc=protections["unprivileged_user"] or os.geteuid() != 0,  # Linux exempts uid 0
        process_group_kill=True, clean_env=True, temp_cwd=True,
    )
    log.info("code sandbox active protections: %s", ", ".join(k for k, v in protections.items() if v))
    if first_error:
        found["reasons"].setdefault("unprivileged_user", first_error)
    missing = {k: found["reasons"].get(k, "not available") for k, v in protections.items() if not v}
    if missing:
        log.warning("code sandbox runs WITHOUT: %s", "; ".join(f"{k} ({why})" for k, why in missing.items()))
    return protections


def run_sandboxed(code: str, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
                  max_processes: int = 4, stdin: str = "") -> SandboxResult:
    """Run ``code`` as a Python script under every protection this machine supports.

    Raises ``RewardError`` only when the sandbox itself cannot be set up; anything the
    program does (crash, hang, hit a limit) is reported in the ``SandboxResult``.
    """
    protections = active_protections()
    want = {name for name in _NS_STEPS if protections[name]}
    result, _, error = _run(want, strict=True, code=code, timeout_s=timeout_s, cpu_s=cpu_s,
                            memory_mb=memory_mb, max_processes=max_processes, stdin=stdin)
    if error:
        raise RewardError(f"the code sandbox could not be set up: {error}")
    return result


def _run(want: set[str], *, strict: bool, code: str, timeout_s: float, cpu_s: int, memory_mb: int,
         max_processes: int, stdin: str) -> tuple[SandboxResult, dict, str | None]:
    """One run: returns the result, the wrapper's report and its setup error (if any)."""
    with tempfile.TemporaryDirectory(prefix="grpokit-sandbox-", ignore_cleanup_errors=True) as tmp:
        tmp = os.path.realpath(tmp)  # the wrapper compares it with mount points
        work, script = os.path.join(tmp, "work"), os.path.join(tmp, "main.py")
        uid = 1_000_000 + secrets.randbelow(1_000_000_000)  # unused: RLIMIT_NPROC counts per uid
        os.chmod(tmp, 0o755)
        os.mkdir(work, 0o700)
        os.mkdir(os.path.join(tmp, "py"))
        with open(script, "w") as f:
            f.write(code)
        os.chmod(script, 0o644)
        if "unprivileged_user" in want:
            os.chown(work, uid, uid)  # the working dir when there is no private tmpfs
        python = os.path.realpath(sys.executable)
        prefix_rel = os.path.relpath(python, sys.base_prefix)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8"}
        limits = [
            ("RLIMIT_CPU", cpu_s, cpu_s + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
            ("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
            ("RLIMIT_NPROC", max_processes, max_processes),  # not enforced by Linux for uid 0
            ("RLIMIT_FSIZE", WORK_DIR_MB << 20, WORK_DIR_MB << 20),
            ("RLIMIT_NOFILE", 256, 256),
            ("RLIMIT_CORE", 0, 0),
        ]
        ctl_r, ctl_w = os.pipe()
        cfg = dict(ctl=ctl_w, caller=os.getpid(), masked=_MASKED_DIRS, seccomp=_SECCOMP_DENY.get(os.uname().machine),
                   tmp=tmp, work=work, script=script, uid=uid, want=sorted(want), strict=strict,
                   python=python, prefix=sys.base_prefix, prefix_rel=None if prefix_rel.startswith("..") else prefix_rel,
                   env=env, limits=limits, work_mb=WORK_DIR_MB)
        try:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-c", _WRAPPER, json.dumps(cfg)], cwd=tmp, env=env, pass_fds=(ctl_w,),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )
        finally:
            os.close(ctl_w)
        with os.fdopen(ctl_r, "rb") as ctl:
            result = _supervise(proc, stdin.encode(), timeout_s)
            reports = [json.loads(line) for line in ctl.read().splitlines() if line.strip()]
    found: dict = {"protections": {}, "reasons": {}}
    for message in reports:
        found.update(message)
    if "status" in found and not result.timed_out:
        result.returncode = os.waitstatus_to_exitcode(found["status"])
        result.killed = result.returncode < 0
    return result, found, found.get("error")


def _supervise(proc: subprocess.Popen, stdin: bytes, timeout_s: float) -> SandboxResult:
    """Feed stdin, read capped output until the program ends or time runs out; leave nothing running."""
    start = time.monotonic()
    deadline = start + timeout_s
    out, err = _Capped(), _Capped()
    timed_out = _pump(proc, stdin, {proc.stdout: out, proc.stderr: err}, deadline)
    if timed_out or proc.poll() is None:
        _stop(proc)
    # the wrapper has exited, so the pid namespace is gone; the group kill is for machines without one
    _killpg(proc.pid)
    _pump(proc, b"", {proc.stdout: out, proc.stderr: err}, time.monotonic() + 2.0)
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    # the program's own exit status comes from the wrapper's report; until then: killed
    return SandboxResult(returncode=-signal.SIGKILL, stdout=out.text(), stderr=err.text(),
                         timed_out=timed_out, killed=True, duration_s=time.monotonic() - start)


def _pump(proc: subprocess.Popen, stdin: bytes, sinks: dict, deadline: float) -> bool:
    """Move data until both outputs close; True when the deadline passed first."""
    with selectors.DefaultSelector() as sel:
        for stream in sinks:
            if not stream.closed:
                sel.register(stream, selectors.EVENT_READ)
        if stdin and not proc.stdin.closed:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        elif not proc.stdin.closed:
            proc.stdin.close()
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            events = sel.select(min(remaining, 0.1))
            if not events and proc.poll() is not None:
                return False  # wrapper gone; only leftovers of a run without pid namespace hold the pipes
            for key, _ in events:
                if key.fileobj is proc.stdin:
                    try:
                        stdin = stdin[os.write(proc.stdin.fileno(), stdin[:65536]):]
                    except BrokenPipeError:
                        stdin = b""
                    if not stdin:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                data = os.read(key.fileobj.fileno(), 65536)
                if data:
                    sinks[key.fileobj].add(data)
                else:
                    sel.unregister(key.fileobj)
    return False


def _stop(proc: subprocess.Popen) -> None:
    # SIGTERM asks the wrapper to SIGKILL the namespace's init and wait until the kernel has
    # killed everything inside; if it cannot (no pid namespace, or it is stuck), kill the group.
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
