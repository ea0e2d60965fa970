"""Run model-written Python (HumanEval programs, tool calls) in a separate, limited process.

    result = execute_code("print(sum(range(10)))", timeout=5.0)
    result.status   # "ok" | "error" | "timeout" | "killed";  result.stdout, result.stderr, result.error

What is covered (Linux, no root needed):
- a fresh `python -I` process (no user site, no PYTHON* variables) with a scrubbed environment, stdin closed, in a
  temporary working directory that is removed afterwards; its own process group, killed whole on timeout;
- wall-clock timeout, CPU-time limit, address-space limit (memory), file-size limit (which also caps stdout/stderr),
  no core dumps;
- no network: the process enters new user + network namespaces (no interfaces), where the kernel allows
  unprivileged namespaces (it says so on stderr where it does not); in any case the audit hook refuses non-Unix
  sockets, connect/bind/send and DNS;
- an audit hook (installed before the program runs; its state lives in a closure, and the gc
  object walk that could reach it is refused) refuses writes, renames, deletes, mode changes and directory
  descriptors outside the temporary directory; process creation (fork, exec, spawn, system, subprocess); signals
  to other processes (kill, and pidfd functions are removed); and native code (ctypes, _posixsubprocess).

What is not covered: reading files the user can read (e.g. the installed code); native extensions already importable
that bypass Python's audit events; CPU/memory side channels; a kernel exploit. Without unprivileged user namespaces
the network is blocked only by the audit hook. This keeps honest mistakes and ordinary misbehaviour of generated
code contained; it is not a boundary against a determined attacker (use a VM or container for that).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The child's own first lines: limits and namespaces (no preexec_fn: the parent may run threads), then the hook,
# then the program. argv: timeout, memory bytes, output bytes, isolate network (0/1).
_GUARD = r'''
import os, sys, resource
_timeout, _memory, _output, _isolate = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
for _limit, _value in ((resource.RLIMIT_CPU, int(_timeout) + 1), (resource.RLIMIT_AS, _memory),
                       (resource.RLIMIT_FSIZE, _output), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_limit, (_value, _value))
if _isolate:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) != 0:  # new user + network namespaces
        print(f"sandbox: no network namespace ({os.strerror(ctypes.get_errno())}): the audit hook alone blocks "
              "the network", file=sys.stderr)
    del ctypes
    for _name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[_name]  # a later `import ctypes` goes through the import hook again
import posix, signal, _signal
for _module, _names in ((os, ("pidfd_open",)), (posix, ("pidfd_open",)), (signal, ("pidfd_send_signal",)),
                        (_signal, ("pidfd_send_signal",))):
    for _name in _names:
        if hasattr(_module, _name):
            delattr(_module, _name)  # signals by pidfd are not audited: take the functions away

def _install():
    # Everything the hook uses lives in this closure, out of reach of the program's globals.
    root = os.path.realpath(os.getcwd())
    deny = frozenset({"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                      "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
                      "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
                      "socket.sendmsg", "sys.addaudithook", "gc.get_objects", "gc.get_referrers",
                      "gc.get_referents", "os.setuid", "os.mkfifo", "os.mknod"})
    path_events = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                             "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                             "os.chdir"})
    no_import = frozenset({"ctypes", "_ctypes", "_posixsubprocess"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, isdir, fsdecode, sep = os.path.realpath, os.path.isdir, os.fsdecode, os.sep

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            real = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + sep)

    def hook(event, args):
        if event in deny:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "socket.__new__" and args[1] != 1:  # only AF_UNIX
            raise PermissionError("sandbox: network sockets are not allowed")
        if event == "import" and args[0].split(".")[0] in no_import:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and args[0] is not None and not inside(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & write_flags:
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
            if isdir(args[0]):  # a directory descriptor outside would let dir_fd= calls write there
                raise PermissionError(f"sandbox: opening the directory {args[0]!r} is not allowed")
        if event in path_events and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.addaudithook(hook)

_install()
del _install
_source = open("program.py").read()
exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class ExecutionResult:
    status: str  # "ok" | "error" (non-zero exit, e.g. an exception) | "timeout" | "killed" (by a signal or limit)
    stdout: str
    stderr: str
    error: str | None  # the last line of the traceback, or what stopped the process
    returncode: int | None
    duration: float

    @property
    def success(self) -> bool:
        return self.status == "ok"


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 512 * 2**20,
                 max_output_bytes: int = 2**20, isolate_network: bool = True) -> ExecutionResult:
    workdir = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    start = time.time()
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8"}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            argv = [sys.executable, "-I", "-c", _GUARD, str(timeout), str(max_memory_bytes), str(max_output_bytes),
                    "1" if isolate_network else "0"]
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, 9)
                proc.wait()
        stdout, stderr = (open(p, encoding="utf-8", errors="replace").read() for p in (out_path, err_path))
        rc = proc.returncode
        if timed_out:
            status, error = "timeout", f"timed out after {timeout:g}s"
        elif rc < 0:
            status, error = "killed", f"killed by signal {-rc} (a CPU, memory or output limit, or a crash)"
        elif rc != 0:
            lines = stderr.strip().splitlines()
            status, error = "error", lines[-1] if lines else f"exit code {rc}"
        else:
            status, error = "ok", None
        return ExecutionResult(status, stdout, stderr, error, None if timed_out else rc, time.time() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
