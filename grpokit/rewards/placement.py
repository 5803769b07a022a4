"""Where a reward call runs, and how it is stopped at its timeout.

TRL calls reward functions on the main thread, one after another, so code written for it
may rely on that: math-verify's ``parse``/``verify`` time out with ``signal.alarm`` and
raise in any other thread. grpokit therefore places each component (``rewards[i].run_in``):

- ``thread`` — a worker thread, concurrently with the other components. For built-ins
  that are thread-safe and bounded, and user functions marked ``@thread_safe``. A call
  past its timeout is abandoned (a thread cannot be killed) and counts as a failure.
- ``main`` — the main thread, as TRL calls it (the default for user functions). At the
  timeout a kernel timer signals the process (SIGUSR2, not SIGALRM, which math-verify
  owns), and the handler raises ``RewardTimeout`` in the main thread; it derives from
  BaseException so the ``except Exception`` blocks of reward code (and math-verify) do
  not swallow it, and it is re-sent each second until the call gives up. Python runs
  signal handlers between bytecodes, so this interrupts Python code, sleeps, sockets and
  regular expressions; one C call that never returns to the interpreter (a huge integer
  power) outlives it — for such code use ``process``.
  Off the main thread (no signals there), ``main`` components run as ``process``.
- ``process`` — a worker process of the component's own (forkserver, so it starts in
  milliseconds from a pre-imported parent), which rebuilds the component from its spec and
  runs calls on its own main thread; at the timeout it is killed and restarted for the
  next batch. It also contains crashes (a segfault or out-of-memory kill is one failed call).

Every failure — exception, wrong length, timeout, dead worker — becomes a ``None`` batch for
that component, and the orchestrator's ``max_consecutive_failures`` decides when to stop.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Callable

from grpokit.errors import RewardError

log = logging.getLogger(__name__)
SIGNAL = signal.SIGUSR2
RESEND_S = 1.0
WORKER_START_S = 300.0  # importing a user's module (sympy, a judge model) may take a while, once


class RewardTimeout(BaseException):
    """A reward call ran past its timeout (BaseException: reward code's ``except Exception`` must not eat it)."""


# ---------------------------------------------------------------- thread


def call_in_thread(fn: Callable, args: tuple) -> Future:
    """``fn(*args)`` in a daemon thread of its own. Not a ThreadPoolExecutor: the interpreter joins
    those at exit, so one reward stuck past its timeout would keep the finished trainer from exiting."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="reward", daemon=True).start()
    return future


# ---------------------------------------------------------------- main thread


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):  # Linux's struct sigevent: 64 bytes
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int), ("sigev_notify", ctypes.c_int),
                ("_pad", ctypes.c_int * 12)]


def _timespec(seconds: float) -> _Timespec:
    return _Timespec(int(seconds), int((seconds % 1) * 1e9))


class KernelTimer:
    """A POSIX timer (``timer_create`` on CLOCK_MONOTONIC) that sends ``SIGNAL`` to the main thread.

    Kernel-timed, it fires even while a long C call holds the GIL (a watchdog *thread* could
    not run then: measured, a math-verify bomb kept it from sending for 5 s), and it is not the
    ITIMER_REAL that math-verify's ``signal.alarm(0)`` cancels. Linux only; elsewhere the
    watchdog thread below stands in."""

    _timer: "KernelTimer | None | bool" = None

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self._settime, self.pid = libc.timer_settime, os.getpid()
        # SIGEV_THREAD_ID (4): to the main thread only, so no other thread's system call is interrupted
        event, self._id = _Sigevent(sigev_signo=SIGNAL, sigev_notify=4), ctypes.c_void_p()
        event._pad[0] = threading.main_thread().native_id  # the union's first member is the target tid
        if libc.timer_create(1, ctypes.byref(event), ctypes.byref(self._id)) != 0:  # 1: CLOCK_MONOTONIC
            raise OSError(ctypes.get_errno(), "timer_create failed")

    @classmethod
    def get(cls) -> "KernelTimer | None":
        if cls._timer is None or (cls._timer and cls._timer.pid != os.getpid()):  # timers do not survive fork
            try:
                cls._timer = cls() if sys.platform.startswith("linux") else False
            except (OSError, AttributeError):
                cls._timer = False
        return cls._timer or None

    def arm(self, first_s: float, every_s: float) -> None:
        spec = _Itimerspec(_timespec(every_s), _timespec(max(first_s, 1e-3)))
        self._settime(self._id, 0, ctypes.byref(spec), None)

    def disarm(self) -> None:
        self._settime(self._id, 0, ctypes.byref(_Itimerspec()), None)


class _Deadline:
    """The main-thread call in progress: its deadline, and whether it has ended."""

    current: "_Deadline | None" = None
    previous_handler = None

    def __init__(self, timeout_s: float):
        self.timeout_s, self.deadline, self.finished = timeout_s, time.monotonic() + timeout_s, False
        self.done = threading.Event()

    def finish(self) -> None:
        self.finished = True
        self.done.set()


def _on_signal(signum, frame) -> None:
    call = _Deadline.current
    if call is not None and not call.finished and time.monotonic() >= call.deadline:
        raise RewardTimeout(f"timed out after {call.timeout_s:g} s")
    previous = _Deadline.previous_handler
    if callable(previous) and call is None:  # a SIGUSR2 meant for someone else: pass it on
        previous(signum, frame)


def _install_handler() -> None:
    if signal.getsignal(SIGNAL) is not _on_signal:
        _Deadline.previous_handler = signal.signal(SIGNAL, _on_signal)


def _watchdog(call: _Deadline, main_id: int) -> None:
    """Where there is no kernel timer: signal the main thread from a thread (needs the GIL to run)."""
    if call.done.wait(call.timeout_s):
        return
    while not call.finished:
        signal.pthread_kill(main_id, SIGNAL)
        call.done.wait(RESEND_S)


def call_on_main_thread(fn: Callable[[], object], timeout_s: float):
    """``fn()`` on the calling (main) thread, interrupted by ``RewardTimeout`` after ``timeout_s`` and
    again every second after that (reward code with a bare ``except:`` may have eaten the first)."""
    _install_handler()
    call, timer, guard = _Deadline(timeout_s), KernelTimer.get(), None
    _Deadline.current = call
    if timer is not None:
        timer.arm(timeout_s, RESEND_S)
    else:
        guard = threading.Thread(target=_watchdog, args=(call, threading.main_thread().ident),
                                 name="reward-watchdog", daemon=True)
        guard.start()
    try:
        try:
            return fn()
        finally:
            call.finish()
    except RewardTimeout:
        call.finish()  # the signal may land between fn's return and the finish above
        raise
    finally:
        if timer is not None:
            timer.disarm()
        if guard is not None:
            guard.join()
        _Deadline.current = None


# ---------------------------------------------------------------- worker process


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the trainer dies, even mid-call (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


def _serve(conn, spec: dict, search_path: list[str], sys_path: list[str]) -> None:
    """A worker's life: rebuild the component, then answer calls until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which finishes its step
    _die_with_parent()
    sys.path[:] = sys_path
    try:
        from grpokit.config import RewardSpec
        from grpokit.rewards.component import RewardComponent

        component = RewardComponent(RewardSpec.model_validate({**spec, "run_in": "main"}), search_path)
    except BaseException as exc:  # reported to the trainer as this component's failure
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            payload = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", component(*payload))
        except (Exception, SystemExit) as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except Exception as exc:  # e.g. a value that does not pickle
            conn.send(("error", f"cannot send the result back ({type(exc).__name__}: {exc})"))


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # the fork server imports grpokit's rewards once; each worker forks from it ready-made
        context.set_forkserver_preload(["grpokit.rewards"])
        return context
    return multiprocessing.get_context("spawn")


_LIVE_WORKERS: "weakref.WeakSet[ProcessWorker]" = weakref.WeakSet()


@atexit.register
def _stop_all_workers() -> None:  # before multiprocessing's own exit hook, which would join them
    for worker in list(_LIVE_WORKERS):
        worker.close()


class ProcessWorker:
    """One component's worker process: started at once (overlapping the model load), restarted after a kill."""

    def __init__(self, spec, search_path: list[str]):
        self.spec = spec.model_dump(mode="json")
        self.name, self.search_path = spec.name, list(search_path)
        self.process = self.conn = None
        self.ready = False
        self.sent_at = 0.0
        self.start()
        _LIVE_WORKERS.add(self)

    def start(self) -> None:
        context = _context()
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.spec, self.search_path, list(sys.path)),
                                       name=f"reward-{self.name}", daemon=False)  # may start processes itself
        self.process.start()
        child.close()
        self.ready = False

    def _receive(self, seconds: float):
        if not self.conn.poll(max(0.0, seconds)):
            return None
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(1)
            code = self.process.exitcode
            return ("error", f"its worker process died (exit code {code}); it is restarted for the next batch")

    def _wait_ready(self) -> None:
        if self.ready:
            return
        reply = self._receive(WORKER_START_S)
        if reply is None or reply[0] != "ready":
            message = reply[1] if reply else f"its worker process did not start within {WORKER_START_S:g} s"
            self.kill()
            raise RewardError(message)
        self.ready = True

    def send(self, payload) -> None:
        if self.process is None:
            self.start()
        self._wait_ready()
        self.sent_at = time.perf_counter()
        self.conn.send(payload)

    def result(self, timeout_s: float):
        """The reply to the last ``send``; a timeout kills the worker (it restarts on the next send)."""
        reply = self._receive(timeout_s - (time.perf_counter() - self.sent_at))
        if reply is None:
            self.kill()
            raise RewardTimeout(f"timed out after {timeout_s:g} s (its worker process was killed and restarts "
                                "for the next batch)")
        if reply[0] == "error":
            if not self.process.is_alive():
                self.kill()
            raise RewardError(reply[1])
        return reply[1]

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
        self.process = self.conn = None
        self.ready = False

    def close(self) -> None:
        """Let the worker finish on end-of-pipe; kill it if it does not."""
        if self.process is None:
            return
        self.conn.close()
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = self.conn = None
