"""The HumanEval sandbox: generated code runs in a separate, limited process and never decides its own verdict.

    run_problem(problem, completion, timeout=3.0)   # "passed" | "failed: <why>" | "timed out"
    run_script(program, timeout=3.0)                # a whole program: passes when it runs to its end

Three processes per sample. The evaluator (this process) starts a *judge* (`python -I`, trusted code only:
the problem's prompt and test), which starts the *worker* that runs the untrusted prompt + completion:

    evaluator --stdin/stdout--> judge --request/reply pipes--> worker (sandboxed)

run_problem: the judge executes the problem's `check(candidate)` itself, with `candidate` a proxy that sends
each call's arguments to the worker and decodes its reply as plain data (tagged JSON: numbers, strings,
lists, tuples, dicts, sets, bytes; nothing else crosses). So the verdict is computed by trusted code from
the function's return values: the worker cannot write a "passed" token, exit early with status 0, or return
an object whose __eq__ always says True. The test's other names are the prompt's (a completion that
redefines a prompt helper, e.g. encode_cyclic of HumanEval/38, does not change what the test calls); the
164 canonical solutions pass. run_script (whole programs, the old interface): the worker runs the
program and then writes a random token on its result pipe; the judge passes it when the token arrives and
the worker exits 0. There the program *can* forge its verdict (it may read the token from its own memory):
use it for plumbing checks, never for scores.

What the worker gets (applied before any untrusted line runs):
  - its own session and process group (start_new_session), killed as a whole when the sample ends; where
    `unshare` works (root, or unprivileged user namespaces), also its own network namespace (no network at
    all: only a down loopback), PID namespace (it sees and can signal only its own processes; they all die
    with it) and a private /proc (the evaluator's /proc/<pid>/environ is out of sight);
  - an environment of PATH, HOME / TMPDIR (its private temporary folder), LANG and PYTHONHASHSEED only;
  - rlimits: CPU seconds, address space, 16 MiB files, no core files;
  - when run as root: uid/gid nobody (65534) once the program is read, if nobody can read this
    interpreter's standard library (not for one installed under /root: then the worker stays root);
  - socket creation disabled in-process too (socket.*, _socket.* incl. SocketType): without `unshare` the
    only network block, a best-effort one that code using ctypes or a subprocess can get around;
  - stdin, stdout and stderr on /dev/null;
  - the time limit counts from the moment the program's top level has run (5 s are allowed for the
    interpreter's start and that top level), so a loaded machine does not fail slow starters.
The evaluator never waits for a pipe's end-of-file (a forked grandchild that keeps a pipe cannot hang it):
it reads with a deadline and kills the judge's and the worker's groups after the verdict or the timeout.
os.kill(os.getppid(), 9) in the worker reaches the PID namespace's init (which ignores it) or, without
`unshare`, the judge (the sample fails); never the evaluator.

Not protected against (say so when publishing numbers): without `unshare`, a process that calls setsid()
escapes the group kill (it lingers: a busy one until its CPU limit, a sleeping one until it wakes; it
cannot change a verdict), the program can reach
the network through ctypes/subprocess, read /proc/<pid>/environ of other processes of the same user (the
evaluator's included: keep secrets out of its environment) and signal them; with or without it, the worker
can read and write every file its user can (run as a dedicated user or in a container for untrusted
models), fork bombs are bounded only by the time limit, and a kernel exploit is out of scope.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Optional

NOBODY = 65534
_STARTUP = 5.0  # seconds the worker may take to start and run the program's top level (run_problem)
_MARGIN = 10.0  # further seconds the evaluator allows the judge before it gives up on a verdict

# Tagged JSON for values crossing the sandbox, the same code in judge and worker.
_CODEC = r'''
import json as _json


def _enc(x, depth=0):
    if depth > 64:
        raise ValueError("value nested too deeply to cross the sandbox")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0:
        return _enc(x.item(), depth + 1)  # numpy scalars compare like Python numbers in the original harness
    for base in (int, float, str):  # a subclass crosses as its plain value, never with its own __eq__
        if isinstance(x, base) and not isinstance(x, bool):
            return base.__new__(base, x) if base is not float else float.__float__(x)
    t = type(x)
    if t is list:
        return [_enc(v, depth + 1) for v in x]
    if t is tuple:
        return {"t": [_enc(v, depth + 1) for v in x]}
    if t is dict:
        return {"d": [[_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "f": [_enc(v, depth + 1) for v in x]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    raise TypeError(f"a {t.__name__} cannot cross the sandbox (plain data only)")


def _dec(x, depth=0):
    if depth > 64:
        raise ValueError("value nested too deeply")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [_dec(v, depth + 1) for v in x]
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed value")
    (tag, v), = x.items()
    if tag == "t":
        return tuple(_dec(i, depth + 1) for i in v)
    if tag == "d":
        return {_dec(k, depth + 1): _dec(i, depth + 1) for k, i in v}
    if tag in ("s", "f"):
        return (set if tag == "s" else frozenset)(_dec(i, depth + 1) for i in v)
    if tag == "b":
        return bytes.fromhex(v)
    if tag == "c":
        return complex(float(v[0]), float(v[1]))
    raise ValueError(f"unknown tag {tag!r}")
'''

# The worker: limits itself, then runs the untrusted program; in "problem" mode it then serves calls of
# the entry point, in "script" mode it writes the token after the program's last line.
_WORKER = _CODEC + r'''
import os, sys
if os.getpid() == 1:  # init of its PID namespace ignores its own signals: the program runs in a child
    child = os.fork()
    if child:
        while True:
            pid, status = os.wait()  # reaps orphans too
            if pid == child:
                os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
rd, wr, mode, entry, path, cpu, mem, block, drop = sys.argv[1:10]
rd, wr, cpu, mem = int(rd), int(wr), int(cpu), int(mem)
with open(path, encoding="utf-8") as f:
    source = f.read()
token = os.read(rd, 64).decode().strip() if mode == "script" else None
try:
    import resource
    for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_AS", mem), ("RLIMIT_FSIZE", 16 * 2**20), ("RLIMIT_CORE", 0)):
        if hasattr(resource, name) and value > 0:
            resource.setrlimit(getattr(resource, name), (value, value))
except (ImportError, ValueError, OSError):
    pass
if block == "block":
    import socket, _socket
    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled in the HumanEval sandbox")
    for mod in (socket, _socket):
        for name in ("socket", "SocketType", "socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "dup"):
            if hasattr(mod, name):
                setattr(mod, name, _no_network)
if os.getuid() == 0 and drop == "drop":
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
reply = os.fdopen(wr, "w", encoding="utf-8")
requests = os.fdopen(rd, "r", encoding="utf-8")
def send(message):
    reply.write(_json.dumps(message) + "\n")
    reply.flush()
del sys.argv[1:]
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
code = compile(source, path, "exec")
if mode == "script":
    exec(code, namespace)
    send({"token": token})
    sys.exit(0)
try:
    exec(code, namespace)
except BaseException as e:
    send({"fail": f"the program raised {type(e).__name__} before the tests: {str(e)[:300]}"})
    os._exit(1)
fn = namespace.get(entry)
if not callable(fn):
    send({"fail": f"the program defines no function {entry!r}"})
    os._exit(1)
send({"ready": True})
for line in requests:
    call = _json.loads(line)
    try:
        value = fn(*_dec(call["args"]), **_dec(call["kwargs"]))
        message = {"ok": _enc(value)}
    except Exception as e:
        message = {"raise": type(e).__name__, "message": str(e)[:300]}
    send(message)
'''

# The judge: trusted code only. Starts the worker, runs the problem's check(candidate) with a proxy
# candidate (problem mode) or waits for the token (script mode); prints one JSON verdict line.
_JUDGE = _CODEC + r'''
import builtins, os, select, signal, subprocess, sys, time
job = _json.loads(sys.stdin.read())
# the interpreter's start is not the program's time: the tests get `timeout` from the worker's "ready"
deadline = time.monotonic() + job["timeout"] + (job["startup"] if job["mode"] == "problem" else 0)
to_worker_r, to_worker_w = os.pipe()
from_worker_r, from_worker_w = os.pipe()
worker = subprocess.Popen(job["prefix"] + [sys.executable, "-I", "-c", job["worker"], str(to_worker_r),
                          str(from_worker_w), job["mode"], job["entry_point"], job["path"], str(job["cpu"]),
                          str(job["memory"]), job["block"], job["drop"]],
                          pass_fds=(to_worker_r, from_worker_w), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=job["cwd"], env=job["env"],
                          start_new_session=True)
os.close(to_worker_r)
os.close(from_worker_w)
if job["mode"] == "script":
    os.write(to_worker_w, (job["token"] + "\n").encode())
print(_json.dumps({"worker": worker.pid}), flush=True)
buffer = b""


class Timeout(BaseException):  # not an Exception: the test code cannot catch it
    pass


class WorkerGone(BaseException):
    pass


def receive():
    global buffer
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout()
        ready, _, _ = select.select([from_worker_r], [], [], left)
        if not ready:
            raise Timeout()
        chunk = os.read(from_worker_r, 1 << 16)
        if not chunk:
            raise WorkerGone()
        buffer += chunk
        if len(buffer) > 64 * 2**20:
            raise WorkerGone()
    line, buffer = buffer.split(b"\n", 1)
    return _json.loads(line)


def candidate(*args, **kwargs):
    os.write(to_worker_w, (_json.dumps({"args": _enc(list(args)), "kwargs": _enc(kwargs)}) + "\n").encode())
    message = receive()
    if "ok" in message:
        return _dec(message["ok"])
    kind = getattr(builtins, str(message.get("raise")), None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = RuntimeError
    raise kind(message.get("message", ""))


def gone_why():
    try:
        status = worker.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return "failed: the program closed its result channel"
    if status < 0:
        return f"failed: killed by signal {-status}"
    return f"failed: exited (status {status}) before the tests finished"


def judge():
    global deadline
    if job["mode"] == "script":
        message = receive()
        if message.get("token") != job["token"]:
            return "failed: wrong token"
        try:
            status = worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise Timeout()
        return "passed" if status == 0 else f"failed: exit status {status}"
    message = receive()
    if "fail" in message:
        return "failed: " + str(message["fail"])
    if message.get("ready") is not True:
        return "failed: malformed message from the program"
    deadline = time.monotonic() + job["timeout"]
    namespace = {"__name__": "__judge__"}
    exec(compile(job["prompt"] + "\n" + job["test"], "test.py", "exec"), namespace)
    namespace[job["entry_point"]] = candidate  # a test may call the function by its name (HumanEval/33)
    try:
        namespace["check"](candidate)
    except (Timeout, WorkerGone):
        raise
    except AssertionError as e:
        return "failed: AssertionError" + (f": {str(e)[:200]}" if str(e) else "")
    except Exception as e:
        return f"failed: {type(e).__name__}: {str(e)[:200]}"
    return "passed"


try:
    verdict = judge()
except Timeout:
    verdict = "timed out"
except WorkerGone:
    verdict = gone_why()
except ValueError:  # a malformed reply
    verdict = "failed: malformed message from the program"
try:
    os.killpg(worker.pid, signal.SIGKILL)
except OSError:
    pass
print(_json.dumps({"verdict": verdict}), flush=True)
'''


@functools.lru_cache(maxsize=1)
def isolation_prefix() -> tuple:
    """The `unshare` command that gives the worker its own network and PID namespaces, or () where it does
    not work here (no util-linux, no privilege, user namespaces disabled). Probed once per process."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    base = [exe, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    for prefix in (base, base + ["--user", "--map-root-user"]):
        try:
            probe = subprocess.run(prefix + ["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


@functools.lru_cache(maxsize=1)
def _stdlib_readable_by_others() -> bool:
    """Whether a process of another user (nobody) can import the standard library of this interpreter:
    every folder on the way searchable by others and the folder itself readable (not so for an interpreter
    installed under /root)."""
    import sysconfig

    path = os.path.realpath(sysconfig.get_paths()["stdlib"])
    parts = path.split(os.sep)
    try:
        for i in range(2, len(parts) + 1):
            if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & 0o001:
                return False
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


def _kill_group(pid: Optional[int]) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:  # already gone
        pass


def _read_lines(proc: subprocess.Popen, deadline: float) -> list:
    """The JSON lines the judge printed until it exited or the deadline passed (never waits for EOF past it)."""
    fd, data = proc.stdout.fileno(), b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
        if b'"verdict"' in data and data.endswith(b"\n"):
            break
    out = []
    for line in data.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _run(job: dict, source: str, timeout: float, memory_mb: int) -> str:
    prefix = list(isolation_prefix())
    work = tempfile.mkdtemp(prefix="humaneval-")
    proc = None
    lines: list = []
    try:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        if os.getuid() == 0:  # the worker drops to nobody: its folder must stay its own
            os.chown(work, NOBODY, NOBODY)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        job.update(timeout=float(timeout), startup=_STARTUP, cpu=int(timeout + _STARTUP) + 2, memory=memory_mb * 2**20, path=path, cwd=work,
                   env=env, prefix=prefix, worker=_WORKER, block="block",
                   drop="drop" if os.getuid() == 0 and _stdlib_readable_by_others() else "keep")
        proc = subprocess.Popen([sys.executable, "-I", "-c", _JUDGE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=work, env=env, start_new_session=True)
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        lines = _read_lines(proc, time.monotonic() + timeout + _STARTUP + _MARGIN)
    finally:
        if proc is not None:
            _kill_group(proc.pid)
            for line in lines:  # the judge is gone if the worker killed it: its group still goes
                _kill_group(line.get("worker") if isinstance(line, dict) else None)
            proc.stdout.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(work, ignore_errors=True)
    verdicts = [line["verdict"] for line in lines if isinstance(line, dict) and "verdict" in line]
    if verdicts:
        return str(verdicts[-1])
    if proc.returncode is not None and proc.returncode < 0:
        return f"failed: the judge was killed by signal {-proc.returncode} (by the program?)"
    return "timed out" if proc.returncode is None else f"failed: the judge ended without a verdict ({proc.returncode})"


def run_problem(problem: Mapping, completion: str, timeout: float = 3.0, memory_mb: int = 2048) -> str:
    """Run HumanEval's check(candidate) on problem["prompt"] + completion (module docstring): "passed",
    "failed: <why>" or "timed out"."""
    job = {"mode": "problem", "entry_point": problem["entry_point"], "prompt": problem["prompt"],
           "test": problem["test"]}
    return _run(job, problem["prompt"] + completion, timeout, memory_mb)


def run_script(program: str, timeout: float = 3.0, memory_mb: int = 2048) -> str:
    """Run a whole program in the sandbox: "passed" when it runs to its end and exits 0. The program can
    forge this verdict (see the module docstring): scores go through run_problem."""
    token = secrets.token_hex(16)
    job = {"mode": "script", "entry_point": "", "token": token}
    return _run(job, program, timeout, memory_mb)
