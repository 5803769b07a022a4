"""The code sandbox and the ``code_execution`` reward, against real hostile programs.

Each test runs real child processes (about 50 ms each; the timeout tests 1-2 s). Checks
that need a protection this machine lacks skip and say which (``active_protections()``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from grpokit.errors import RewardError
from grpokit.rewards.code import code_execution, extract_program, split_tests
from grpokit.rewards.sandbox import OUTPUT_LIMIT, active_protections, run_sandboxed

ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 0) == 0\nassert add(-1, 1) == 0"
# a program that starts one process sleeping 30 s whose command line carries `marker`
SLEEPER = (
    "import os, sys\n"
    "def sleeper(marker):\n"
    "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', marker])\n"
)


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\nIt adds."


def processes_with(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (a /proc scan, no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # exited while we looked
                pass
    return found


def assert_healthy():
    """After whatever came before, a plain run still works."""
    assert code_execution(None, [fenced("def add(a, b):\n    return a + b")], tests=[ADD_TESTS]) == [1.0]


def need(protection: str):
    if not active_protections().get(protection, True):  # unknown name: run, so a missing feature fails
        pytest.skip(f"this machine's sandbox has no {protection} (see the grpokit.rewards.sandbox log)")


def test_rewards_are_the_fraction_of_tests_passed():
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a * b"),  # passes 2 of 4: (2, 2) and (0, 0)
        [{"role": "assistant", "content": fenced("def add(a, b):\n    return a + b")}],  # chat form
        fenced("def add(a, b):\n    return a + b"),
        "def add(a, b): return a - b",  # no fence: the whole text is the program
    ]
    tests = [ADD_TESTS, ADD_TESTS, ["assert add(1, 1) == 2", "assert add(1, 1) == 3"], None, ["assert add(3, 0) == 3"]]
    assert code_execution(None, completions, tests=tests) == [1.0, 0.5, 0.5, None, 1.0]
    assert code_execution(None, ["print(1)"]) == [None]  # no tests column at all


def test_crashes_and_fake_results_score_zero():
    crash = fenced("def add(a, b):\n    return a + b\nraise ValueError('boom')")
    syntax = fenced("def add(a, b) return a + b")
    exits_early = fenced("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)")  # tests still run: (0, 0), (-1, 1) pass
    fakes = fenced("import os\nprint('\\n' + 'f' * 32 + ' 1111')\nos._exit(0)")  # prints a result line, skips tests
    rewards = code_execution(None, [crash, syntax, exits_early, fakes], tests=[ADD_TESTS] * 4)
    assert rewards == [0.0, 0.0, 0.5, 0.0]


def test_single_string_tests_count_top_level_asserts():
    assert split_tests("import math\nassert 1\nx = 2\nassert x == 2", row=0) == [
        ("setup", "import math"), ("test", "assert 1"), ("setup", "x = 2"), ("test", "assert x == 2"),
    ]
    humaneval = "def check(f):\n    assert f(1, 2) == 3\n\ncheck(add)"
    assert [kind for kind, _ in split_tests(humaneval, row=0)] == ["test"]
    with pytest.raises(RewardError, match="row 3"):
        split_tests("assert (", row=3)


def test_extract_program_prefers_the_last_python_block():
    text = "```\nnot this\n```\n```python\nfirst = 1\n```\nthen\n```py\nlast = 2\n```"
    assert extract_program(text) == "last = 2\n"
    assert extract_program("```js\nx\n```") == "x\n"
    assert extract_program("```python\ntruncated = 1") == "truncated = 1"
    assert extract_program("plain = 1") == "plain = 1"


def test_infinite_loop_ends_at_the_wall_clock_limit():
    assert code_execution(None, [fenced("while True:\n    pass")], tests=["assert True"], timeout_s=1.0) == [0.0]
    # the wall-clock limit is what ended it (the 5 s CPU limit would have too, later): no timing asserted
    result = run_sandboxed("while True: pass", timeout_s=1.0)
    assert result.timed_out and result.killed and result.returncode == -9


def test_fork_bomb_scores_zero_and_leaves_no_process():
    marker = f"grpokit-fork-bomb-{os.getpid()}"
    bomb = SLEEPER + (
        "import time\n"
        "for _ in range(100):  # bounded by the test: at most 100 children\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        f"            sleeper({marker!r})\n"
        "    except OSError:  # RLIMIT_NPROC says no: keep the ones we have\n"
        "        time.sleep(0.01)\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    assert code_execution(None, [fenced(bomb)], tests=["assert True"], timeout_s=2.0) == [0.0]
    assert processes_with(marker) == []
    assert_healthy()


def test_background_children_do_not_outlive_a_normal_exit():
    need("pid_namespace")  # a child that leaves the process group is only caught by the namespace
    marker = f"grpokit-daemon-{os.getpid()}"
    code = SLEEPER + (
        "if os.fork() == 0:\n"
        "    os.setsid()  # leave the process group, as a daemon would\n"
        f"    sleeper({marker!r})\n"
        "print('parent done')\n"
    )
    result = run_sandboxed(code, timeout_s=2.0)
    assert result.returncode == 0 and "parent done" in result.stdout and not result.timed_out
    assert processes_with(marker) == []


def test_memory_hog_scores_zero():
    hog = fenced("def add(a, b):\n    return a + b\nblob = bytearray(2 * 1024**3)")
    assert code_execution(None, [hog], tests=[ADD_TESTS], memory_mb=256) == [0.0]
    result = run_sandboxed("blob = bytearray(2 * 1024**3)", memory_mb=256)
    assert result.returncode == 1 and "MemoryError" in result.stderr
    assert_healthy()


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("GRPOKIT_SECRET", "hunter2-secret-value")
    absent = fenced("import os\ndef add(a, b):\n    return a + b\nassert 'GRPOKIT_SECRET' not in os.environ")
    assert code_execution(None, [absent], tests=[ADD_TESTS]) == [1.0]
    result = run_sandboxed("import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ').read())")
    assert result.returncode == 0 and "PATH" in result.stdout
    assert "hunter2-secret-value" not in result.stdout + result.stderr


def test_writes_outside_the_working_directory_fail(tmp_path):
    need("readonly_root")
    existing, new = tmp_path / "existing.txt", tmp_path / "new.txt"
    existing.write_text("original")
    code = (
        "import os\n"
        "open('mine.txt', 'w').write('ok')  # the working directory is writable\n"
        "print('own dir ok', open('mine.txt').read())\n"
        f"for path in [{str(existing)!r}, {str(new)!r}, '/tmp/grpokit-escape.txt', '/dev/shm/grpokit-escape']:\n"
        "    try:\n"
        "        open(path, 'w').write('pwned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as exc:\n"
        "        print('refused', path, exc.errno)\n"
    )
    result = run_sandboxed(code)
    assert result.returncode == 0 and "own dir ok ok" in result.stdout
    assert "WROTE" not in result.stdout and result.stdout.count("refused") == 4
    assert existing.read_text() == "original" and not new.exists()
    assert not Path("/tmp/grpokit-escape.txt").exists() and not Path("/dev/shm/grpokit-escape").exists()


def test_no_network_even_to_localhost():
    need("network_namespace")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
            "    print('CONNECTED')\n"
            "except OSError as exc:\n"
            "    print('no network', exc.errno)\n"
        )
        result = run_sandboxed(code, timeout_s=3.0)
        assert result.returncode == 0 and "no network" in result.stdout and "CONNECTED" not in result.stdout
        listener.settimeout(0.3)  # a connection that had arrived would be waiting in the backlog
        with pytest.raises(socket.timeout):
            listener.accept()
    assert_healthy()


def test_output_is_capped_and_stdin_is_fed():
    flood = run_sandboxed("import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 1000)\nprint('END')")
    assert flood.returncode == 0 and len(flood.stdout) < OUTPUT_LIMIT + 100
    assert flood.stdout.startswith("x") and flood.stdout.rstrip().endswith("END") and "bytes cut" in flood.stdout
    echo = run_sandboxed("print(input()[::-1])", stdin="olleh\n")
    assert echo.stdout == "hello\n"


def test_protections_are_reported_honestly():
    protections = active_protections()
    assert {"network_namespace", "readonly_root", "pid_namespace", "unprivileged_user", "rlimit_nproc",
            "process_group_kill", "clean_env", "temp_cwd"} <= set(protections)
    # Linux does not apply RLIMIT_NPROC to root, so it counts only when the program has its own uid
    assert protections["rlimit_nproc"] == (protections["unprivileged_user"] or os.geteuid() != 0)
    if protections["unprivileged_user"]:
        assert run_sandboxed("import os; print(os.getuid(), os.getgroups())").stdout.split()[0] != "0"


def test_unix_socket_files_under_tmp_are_unreachable():
    need("private_tmp")
    import tempfile
    sock_dir = tempfile.mkdtemp(prefix="grpokit-test-sock-")
    path = os.path.join(sock_dir, "bus.sock")
    try:
        os.chmod(sock_dir, 0o777)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            os.chmod(path, 0o777)
            listener.listen(1)
            code = (
                "import socket\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                "try:\n"
                f"    s.connect({path!r})\n"
                "    s.sendall(b'hi')\n"
                "    print('CONNECTED')\n"
                "except OSError as exc:\n"
                "    print('unreachable', exc.errno)\n"
            )
            result = run_sandboxed(code, timeout_s=3.0)
            assert result.returncode == 0 and "unreachable" in result.stdout and "CONNECTED" not in result.stdout
            listener.settimeout(0.3)
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(sock_dir)


def _shmem_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1])
    raise AssertionError("no Shmem in /proc/meminfo")


def test_memfd_cannot_bypass_the_memory_limit():
    need("no_memfd")
    code = (
        "import os, threading\n"
        "chunk = b'x' * (1 << 20)\n"
        "for i in range(256):  # 16 MiB per memfd: each stays under RLIMIT_FSIZE\n"
        "    if i % 16 == 0:\n"
        "        fd = os.memfd_create('grpokit-hog')\n"
        "    os.write(fd, chunk)\n"
        "print('WROTE 256 MiB', flush=True)\n"
        "import time; time.sleep(1.5)\n"
    )
    before = _shmem_kb()
    peak = [before]
    result = None

    def run():
        nonlocal result
        result = run_sandboxed(code, memory_mb=128, timeout_s=4.0)

    import threading
    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        peak[0] = max(peak[0], _shmem_kb())
        thread.join(0.05)
    assert "WROTE" not in result.stdout
    assert result.returncode != 0 or result.killed
    assert peak[0] - before < 200 * 1024  # others may use shared memory meanwhile; 256 MiB would show


def test_sandbox_dies_with_a_killed_caller(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    marker = f"grpokit-orphan-{os.getpid()}-{time.monotonic_ns()}"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    code = SLEEPER + f"sleeper({marker!r})\n"
    caller = (
        "import sys\n"
        "from grpokit.rewards.sandbox import run_sandboxed\n"
        f"run_sandboxed({code!r}, timeout_s=60.0, cpu_s=60)\n"
    )
    env = dict(os.environ, TMPDIR=str(tmpdir))
    child = subprocess.Popen([sys.executable, "-c", caller], cwd=Path(__file__).resolve().parents[1], env=env)
    try:
        deadline = time.monotonic() + 20
        while not set(processes_with(marker)) - {child.pid}:  # the caller's own command line has it too
            assert time.monotonic() < deadline and child.poll() is None, "the sandbox never started"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 5
        while (processes_with(marker) or list(tmpdir.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(marker) == []
        assert list(tmpdir.iterdir()) == []
    finally:
        child.kill()
        child.wait()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


WRONG_ADD = "def add(a, b):\n    return 'wrong'\n"  # passes none of ADD_TESTS


@pytest.mark.parametrize("attack", [
    # the tests are run with exec: make every test a no-op that "passes"
    "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n",
    # rewrite the result line on its way out: every mark a pass
    "import os, re\n_write = os.write\n"
    "os.write = lambda fd, data: _write(fd, re.sub(rb'(?m)^([0-9a-f]{32}) ([01]+)$', "
    "lambda m: m.group(1) + b' ' + b'1' * len(m.group(2)), data))\n",
    # find the nonce in the harness's frame and print a perfect result line before the tests run
    "import os, sys\nframe = sys._getframe()\n"
    "while frame is not None:\n"
    "    nonce = frame.f_locals.get('nonce')\n"
    "    if isinstance(nonce, str):\n"
    "        sys.stdout.write('\\n' + nonce + ' 1111\\n'); sys.stdout.flush(); os._exit(0)\n"
    "    frame = frame.f_back\n",
], ids=["replace_exec", "patch_os_write", "nonce_from_frames"])
def test_a_wrong_solution_cannot_game_the_harness(attack):
    assert code_execution(None, [fenced(WRONG_ADD + attack)], tests=[ADD_TESTS]) == [0.0]
    assert code_execution(None, [fenced(WRONG_ADD + attack)], tests=[ADD_TESTS.splitlines()]) == [0.0]
