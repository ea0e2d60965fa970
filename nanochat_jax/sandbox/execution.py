"""Run model-written Python (HumanEval programs, tool calls) where the kernel, not the program, keeps it in.

    result = execute_code("print(sum(range(10)))", timeout=5.0)  # .status (one of STATUSES), .stdout, .error, .mode
    python -m nanochat_jax.sandbox --check  # which layers are active on this machine, and what a call costs

Kernel mode (the default; needs bubblewrap and unprivileged user namespaces): the program is the only process of
new user, mount, PID, network, IPC, UTS and cgroup namespaces, without capabilities, as the caller's host uid (HOST_UID
when root calls: then it owns nothing it sees, and the thread rlimit binds it); it sees this Python and the system
libraries read-only and writes one tmpfs capped at `max_disk_bytes` and `max_files`; then guard.py adds its layers.
Not covered: reading what is visible; CPU and memory side channels; kernel exploits via the allowed system calls.

Without bubblewrap or user namespaces, model code is refused (status "refused", one loud message naming the fix)
unless the user opts in to unsafe mode (`--unsafe-sandbox`, NANOCHAT_UNSAFE_SANDBOX=1 or `allow_unsafe()`): the guard
alone. Not covered there: the host's processes and /proc are visible (seccomp refuses signals and limits to them);
without Landlock (before Linux 5.13) the program reads what the user can and only the audit hook stops writes outside
its directory, whose size is not capped; a root caller's program is uid 0 without capabilities (seccomp refuses owner,
mode and time changes; the thread rlimit does not bind it, only a pids cgroup where one can be made).
"""
import ast
import atexit
import json
import marshal
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nanochat_jax.sandbox import guard

STATUSES = ("ok", "error", "timeout", "memory", "output-cap", "refused")
UNSAFE_ENV = "NANOCHAT_UNSAFE_SANDBOX"
SETUP_SECONDS = 60.0  # to reach the program's first line (a loaded machine can be slow to start Python)
SANDBOX_UID = 1000  # the program's uid inside; on the host it is the caller's, or HOST_UID when root calls
HOST_UID = 65534  # (nobody) a root caller's sandbox runs as this host uid: it owns nothing the sandbox can see
THREADS = 64  # the program's threads: RLIMIT_NPROC (an unprivileged uid, whoever calls), and for root a pids cgroup
_ETC = {"/etc/passwd": "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/tmp:/bin/sh\n"
                       "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "/etc/group": "root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n",
        "/etc/hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n", "/etc/hostname": "sandbox\n"}
_GUARD = Path(guard.__file__).read_text()  # the sandboxed interpreter's first lines
_unsafe_allowed = False


@dataclass
class ExecutionResult:
    status: str  # one of STATUSES
    stdout: str
    stderr: str
    error: str | None  # the last line of the traceback, or what stopped the program
    returncode: int | None
    duration: float
    mode: str | None = None  # "kernel" | "unsafe" | None (the program did not run)
    leftover: int = 0  # processes still alive after the program ended (killed); 0 unless something went wrong

    @property
    def success(self) -> bool:
        return self.status == "ok"


def allow_unsafe(allowed: bool = True):
    global _unsafe_allowed
    _unsafe_allowed = allowed


def bwrap_path() -> str | None:
    return os.environ.get("NANOCHAT_BWRAP") or shutil.which("bwrap")


# ---- what the program sees
@lru_cache(maxsize=1)
def _site_packages() -> list[str]:
    import site
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


@lru_cache(maxsize=1)
def visible_paths() -> tuple[list[str], list[tuple[str, str]]]:
    """(read-only directories and files, (symlink target, link) pairs) the program sees of the host."""
    read, links = ["/usr"], []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            read.append(top)
    pythons = []
    for path in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))):
        for p in {os.path.abspath(path), os.path.realpath(path)}:
            if not any(p == d or p.startswith(d + os.sep) for d in pythons + ["/usr"]):
                pythons.append(p)
    read += pythons + [p for p in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime") if os.path.exists(p)]
    return read, links


@lru_cache(maxsize=1)
def _kernel_bpf() -> bytes:
    with tempfile.TemporaryFile() as f:
        guard.seccomp_filter(1, unsafe=False).export_bpf(f)
        f.seek(0)
        return f.read()


@lru_cache(maxsize=1)
def _tmpfs_tools() -> tuple[str, str, str, str] | None:
    """(unshare, sh, mount, an empty host directory for mount points that only the call's own namespaces use) to cap
    the tmpfs in files too (bubblewrap's --tmpfs takes only a size) and stage what HOST_UID cannot reach, or None."""
    tools = [shutil.which("unshare"), "/bin/sh" if os.path.exists("/bin/sh") else None, shutil.which("mount")]
    if None in tools:
        return None
    base = tempfile.mkdtemp(prefix="nanochat_sandbox_mnt_")
    os.chmod(base, 0o755)  # (HOST_UID's bubblewrap walks through it to its mount points)
    os.mkdir(os.path.join(base, "tmp"))
    atexit.register(lambda: shutil.rmtree(base, ignore_errors=True))
    return (*tools, base)


_inode_cap = [True]  # cleared by kernel_sandbox() where the capped tmpfs cannot be mounted


def _tmpfs_mount(mount, disk, files, target, owner=None) -> str:
    owned = f",uid={owner},gid={owner}" if owner is not None else ""
    return f"{mount} -t tmpfs -o size={int(disk)},nr_inodes={int(files)},mode=0700{owned} nanochat-sandbox {target}"


def _reachable(path: str, uid: int) -> bool:
    """Whether `uid` (in no group) can reach and read `path` by its mode bits alone (no capabilities)."""
    def allows(p, rwx):  # the owner's bits for the owner, the others' for everyone else
        st = os.stat(p)
        return (st.st_mode >> 6 if st.st_uid == uid else st.st_mode) & rwx == rwx

    return all(allows(d, 0o1) for d in Path(path).parents) and allows(path, 0o5 if os.path.isdir(path) else 0o4)


def _kernel_argv(code, disk, files, info_fd, fds) -> list[str]:
    """bubblewrap's command line (its files are memfds, appended to `fds`) after a prefix that mounts the capped tmpfs
    and, for a root caller (as host root the sandbox would own the device nodes bound in and escape RLIMIT_NPROC),
    re-binds each path HOST_UID cannot reach (this Python under a 0700 /root) and drops to HOST_UID."""
    def data(name, content) -> str:
        fd = os.memfd_create(name, 0)  # not close-on-exec: bubblewrap reads it
        fds.append(fd)
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
        return str(fd)

    read, links = visible_paths()
    root, tools = os.geteuid() == 0, _tmpfs_tools()
    if tools is None and root:
        raise RuntimeError("sandbox: as root, the sandbox needs util-linux's unshare and mount (to run as an "
                           "unprivileged uid)")
    unshare, sh, mount, base = tools or (None,) * 4  # (no tools: neither capped nor root)
    capped = tools is not None and _inode_cap[0]
    sources, steps, drop = [bwrap_path(), *read], [], []
    if capped:
        steps.append(_tmpfs_mount(mount, disk, files, os.path.join(base, "tmp"), HOST_UID if root else None))
    if root:
        for i, path in enumerate(sources):
            if not _reachable(path, HOST_UID):
                stage = os.path.join(base, f"ro{i}")
                if os.path.isdir(path):
                    os.makedirs(stage, exist_ok=True)
                else:
                    open(stage, "a").close()
                steps.append(f"{mount} --bind {shlex.quote(path)} {stage}")
                sources[i] = stage
        drop = [unshare, "--setuid", str(HOST_UID), "--setgid", str(HOST_UID), "--"]
    namespaces = ["--mount", "--propagation", "private"] if root else ["--user", "--map-root-user", "--mount"]
    prefix = [unshare, *namespaces, "--", sh, "-c", " && ".join(steps) + ' && exec "$0" "$@"'] if steps else []
    argv = [*prefix, *drop, sources[0], "--unshare-all", "--unshare-user", "--die-with-parent", "--as-pid-1",
            "--new-session", "--clearenv", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox"]
    for key, value in (("PATH", "/usr/bin:/bin"), ("HOME", "/tmp"), ("TMPDIR", "/tmp"), ("LANG", "C.UTF-8")):
        argv += ["--setenv", key, value]
    # the tmpfs first: a Python installed under /tmp (a CI runner's venv) is bound on top of it, not hidden by it
    argv += ["--bind", os.path.join(base, "tmp"), "/tmp"] if capped else ["--size", str(disk), "--tmpfs", "/tmp"]
    for source, path in zip(sources[1:], read):
        argv += ["--ro-bind", source, path]
    for target, link in links:
        argv += ["--symlink", target, link]
    for path, text in _ETC.items():
        argv += ["--perms", "0444", "--ro-bind-data", data(path, text.encode()), path]
    program = data("program.py", code.encode("utf-8", errors="replace"))
    return argv + ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                   "--perms", "0444", "--ro-bind-data", program, "/sandbox/program.py", "--chdir", "/tmp",
                   "--info-fd", str(info_fd), "--seccomp", data("seccomp", _kernel_bpf()), "--remount-ro", "/", "--"]


# ---- one call
def _read_until_done(proc, cap, timeout, ready_r):
    """(stdout, stderr: at most `cap` bytes each, ready, timed_out, capped); the timeout runs from ready."""
    sel = selectors.DefaultSelector()
    out = {"stdout": bytearray(), "stderr": bytearray()}
    for fd, name in ((proc.stdout.fileno(), "stdout"), (proc.stderr.fileno(), "stderr"), (ready_r, "ready")):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    ready, timed_out, capped = False, False, False
    deadline, exited_at = time.monotonic() + SETUP_SECONDS, None
    while sel.get_map() and not capped:
        now = time.monotonic()
        if now >= deadline:
            timed_out = ready  # (not ready by the deadline: the set-up hung, reported as refused)
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 2.0:
            break  # the process is gone; nothing alive should still hold the pipes
        for key, _ in sel.select(timeout=min(deadline - now, 0.25)):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
            elif key.data == "ready":
                ready, deadline = True, time.monotonic() + timeout
            else:
                out[key.data] += chunk
                capped = capped or len(out[key.data]) > cap
    sel.close()
    stdout, stderr = (out[name][:cap].decode("utf-8", errors="replace") for name in ("stdout", "stderr"))
    return stdout, stderr, ready, timed_out, capped


def _kill_leftovers(match) -> int:
    """Waits up to 0.5 s for the processes `match` picks to go, kills what is left, returns how many were left. Once the
    kernel has released a process's memory (no VmSize), the rest of its exit (a second or two) runs no user code."""
    def processes():
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            with suppress(OSError):
                if match(entry) and "VmSize:" in Path(f"/proc/{entry}/status").read_text():
                    found.append(int(entry))
        return found

    deadline = time.monotonic() + 0.5
    while (alive := processes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    count, deadline = len(alive), time.monotonic() + 2.0
    while alive and time.monotonic() < deadline:
        for pid in alive:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
        alive = processes()
    return count


def _classify(rc, stderr, ready, timed_out, capped, timeout, kernel):
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if not ready:
        reason = next((line for line in reversed(lines) if line.startswith(("sandbox:", "bwrap:"))), last)
        return "refused", f"the sandbox could not start the program: {reason or f'exit code {rc}'}"
    if capped:
        return "output-cap", "the output passed its cap; the program was stopped"
    if timed_out:
        return "timeout", f"timed out after {timeout:g}s"
    if rc == 0:
        return "ok", None
    if "MemoryError" in last or "Cannot allocate memory" in last:
        return "memory", last
    sig = -rc if rc < 0 else (rc - 128 if kernel and rc > 128 and "Traceback" not in stderr else None)
    if sig == signal.SIGXCPU:
        return "timeout", f"CPU time limit ({int(timeout) + 1}s)"
    if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and "memory" in stderr.lower():
        return "memory", last
    if sig:
        name = {s.value: s.name for s in signal.Signals}.get(sig, str(sig))
        return "error", last if last.startswith("sandbox:") else f"killed by {name}"
    return "error", last or f"exit code {rc}"


def _pids_cgroup(limit: int) -> str | None:
    """For a root caller, a pids cgroup of the call's own (v1, or v2 with its pids controller on) capped at `limit`."""
    if os.geteuid() != 0:
        return None
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        with suppress(OSError):
            if root == "/sys/fs/cgroup" and "pids" not in Path(root, "cgroup.subtree_control").read_text().split():
                continue
            path = tempfile.mkdtemp(prefix=f"nanochat_sandbox_{os.getpid()}_", dir=root)  # (named by its caller)
            Path(path, "pids.max").write_text(str(limit))
            return path


def _run(code, timeout, memory, output, disk, kernel, audit_hook, report=False, files=10_000) -> ExecutionResult:
    start = time.time()
    ready_r, ready_w = os.pipe()  # (pass_fds makes the write ends inheritable in the child)
    fds, workdir, info_r = [ready_w], None, None  # fds: the child's, closed here once it has them
    cgroup = _pids_cgroup(THREADS + 1 + kernel)  # (+ the interpreter's main thread, and bubblewrap's process)
    try:
        if kernel:
            info_r, info_w = os.pipe()
            fds.append(info_w)
            argv = _kernel_argv(code, disk, files, info_w, fds)
            cwd, sandbox_cwd, program = "/", "/tmp", "/sandbox/program.py"
            read = ["/"]  # everything the mount namespace shows
        else:
            workdir = tempfile.mkdtemp(prefix="nanochat_sandbox_")
            program = os.path.join(workdir, "program.py")
            Path(program).write_text(code, encoding="utf-8", errors="replace")
            argv, cwd, sandbox_cwd = [], workdir, workdir
            read = visible_paths()[0] + list(_ETC) + ["/dev/urandom", "/dev/random"]  # the system paths only
        cfg = {"timeout": timeout, "memory": memory, "disk": disk, "threads": THREADS, "files": 256,
               "workdir": sandbox_cwd, "program": program, "read": read, "unsafe": not kernel,
               "audit_hook": audit_hook, "report": report, "ready_fd": ready_w, "site": _site_packages()}
        argv += [sys.executable, "-I", "-S", "-u", "-c", _GUARD, marshal.dumps(cfg).hex()]
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
        if cgroup:  # a shell joins the cgroup, then becomes the sandbox (no Python between fork and exec)
            argv = ["/bin/sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"', *argv]
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=fds, start_new_session=True)
        for fd in fds:
            os.close(fd)
        fds = []
        try:
            stdout, stderr, ready, timed_out, capped = _read_until_done(proc, output, timeout, ready_r)
        finally:
            child, namespace = _read_info(info_r, proc.pid) if kernel else (None, None)
            if proc.poll() is None:  # stopped early: the namespace's pid 1 first (the kernel kills all it holds)
                if child:
                    os.kill(child, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if kernel:
            leftover = _kill_leftovers(lambda p: os.readlink(f"/proc/{p}/ns/pid") == namespace) if namespace else 0
        else:
            leftover = _kill_leftovers(lambda p: int(_stat(p)[3]) == proc.pid)
        status, error = _classify(proc.returncode, stderr, ready, timed_out, capped, timeout, kernel)
        return ExecutionResult(status, stdout, stderr, error, None if timed_out or capped else proc.returncode,
                               time.time() - start, ("kernel" if kernel else "unsafe") if ready else None, leftover)
    finally:
        for fd in {ready_r, info_r, *fds} - {None}:
            with suppress(OSError):
                os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        for _ in range(50 if cgroup else 0):  # the cgroup goes once the killed processes are reaped
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.01)


def _stat(pid) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces): state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _read_info(fd, bwrap_pid) -> tuple[int | None, str | None]:
    """bubblewrap's report (the sandbox's host pid if it is bubblewrap's child, its PID namespace as ns/pid names it),
    nothing if that namespace is ours: the caller's kills cannot be pointed elsewhere (the program never holds it)."""
    os.set_blocking(fd, False)
    data = b""
    with suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    try:
        info = json.JSONDecoder().raw_decode(data.decode())[0]
        pid, namespace = int(info["child-pid"]), int(info["pid-namespace"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, None
    if namespace == os.stat("/proc/self/ns/pid").st_ino:
        return None, None
    with suppress(OSError, IndexError, ValueError):  # (else already gone)
        if int(_stat(pid)[1]) == bwrap_pid:
            return pid, f"pid:[{namespace}]"
    return None, f"pid:[{namespace}]"


# ---- which mode this machine gets
def _diagnosis(stderr: str) -> str:
    """Why the kernel sandbox did not start here (bubblewrap's or the guard's `stderr`), and the fix."""
    def read(path):
        with suppress(OSError):
            return Path(path).read_text().strip()

    if "seccomp" in stderr:
        return (f"the seccomp filter could not be built or loaded ({stderr.strip().splitlines()[-1]}). Fix: "
                "`pip install pyseccomp` and the libseccomp2 package (`sudo apt-get install libseccomp2`).")
    bwrap_lines = [line for line in stderr.splitlines() if line.startswith("bwrap:")]
    if not bwrap_lines:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
        return f"the sandbox's set-up failed inside the sandbox ({last})."
    fixes = [fix for path, bad, fix in (
        ("kernel/unprivileged_userns_clone", "0", "`sudo sysctl -w kernel.unprivileged_userns_clone=1`"),
        ("user/max_user_namespaces", "0", "`sudo sysctl -w user.max_user_namespaces=15000`"),
        ("kernel/apparmor_restrict_unprivileged_userns", "1",
         "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile that lets "
         "/usr/bin/bwrap create user namespaces (Ubuntu 24.04: install apparmor-profiles and load "
         "/usr/share/apparmor/extra-profiles/bwrap-userns-restrict)"),
    ) if read("/proc/sys/" + path) == bad]
    namespace_words = ("uid map", "namespace", "No permissions", "Operation not permitted", "unshare", "setns")
    if not fixes and not any(word in line for line in bwrap_lines for word in namespace_words):
        return f"bubblewrap failed ({bwrap_lines[-1]})."
    if not fixes:
        fixes.append("inside a container, allow user namespaces (Docker: `--security-opt seccomp=unconfined "
                     "--security-opt apparmor=unconfined`, or run on the host)")
    return f"the kernel refused the sandbox's namespaces ({bwrap_lines[-1]}). Fix: " + "; or ".join(fixes) + "."


@lru_cache(maxsize=1)
def kernel_sandbox() -> tuple[bool, str]:
    """(available, why not), found by running a trivial program in kernel mode."""
    if bwrap_path() is None or not os.path.exists(bwrap_path()):
        return False, ("bubblewrap is not installed. Fix: `sudo apt-get install bubblewrap` (Debian/Ubuntu), "
                       "`sudo dnf install bubblewrap` (Fedora), `sudo pacman -S bubblewrap` (Arch).")
    try:
        _kernel_bpf()
    except Exception as e:  # noqa: BLE001 - no pyseccomp, or no libseccomp
        return False, _diagnosis(f"sandbox: could not apply seccomp: {type(e).__name__}: {e}")
    if os.geteuid() == 0 and _tmpfs_tools() is None:
        return False, ("as root, the sandbox drops to an unprivileged uid with util-linux's unshare and mount, and "
                       "one is missing here: install util-linux, or run as an unprivileged user.")
    result = _run("pass", 10.0, 512 * 2**20, 2**16, 2**20, kernel=True, audit_hook=True)
    if result.status != "ok" and _inode_cap[0]:  # without our own tmpfs (no unshare or mount here): size cap only
        _inode_cap[0] = False
        result = _run("pass", 10.0, 512 * 2**20, 2**16, 2**20, kernel=True, audit_hook=True)
    if result.status == "ok":
        return True, ""
    _inode_cap[0] = True
    return False, _diagnosis(result.stderr)


def sandbox_mode() -> str:
    """"kernel" | "unsafe" (the kernel sandbox is unavailable and the user opted in) | "unavailable"."""
    if kernel_sandbox()[0]:
        return "kernel"
    return "unsafe" if _unsafe_allowed or os.environ.get(UNSAFE_ENV, "") not in ("", "0") else "unavailable"


def describe() -> str:  # one line for start-up messages: the mode and what it covers
    mode, abi = sandbox_mode(), guard.landlock_abi()
    landlock = f"Landlock ABI {abi}" if abi > 0 else "no Landlock in this kernel"
    if mode == "kernel":
        return (f"sandbox: kernel mode (bubblewrap: user, mount, pid, net, ipc, uts namespaces; read-only system; "
                f"capped tmpfs; seccomp; {landlock}; rlimits; audit hook)")
    if mode == "unsafe":
        return (f"sandbox: UNSAFE mode, opted in (no namespaces from bubblewrap: seccomp, {landlock}, rlimits, "
                "capabilities dropped, audit hook; the host's processes are visible): " + kernel_sandbox()[1])
    return "sandbox: UNAVAILABLE, model code will not run: " + kernel_sandbox()[1]


def require(unsafe: bool = False, who: str = "this run") -> str:
    """For commands that run model code: prints the mode and returns it, or exits with the fix where it is refused."""
    if unsafe:
        allow_unsafe()
    print(describe(), file=sys.stderr, flush=True)
    if sandbox_mode() == "unavailable":
        raise SystemExit(f"{who} runs model-written code, and the sandbox is unavailable here: {kernel_sandbox()[1]}\n"
                         f"Fix that, or pass --unsafe-sandbox ({UNSAFE_ENV}=1) to run it with the weaker unsafe "
                         "sandbox (what it does not cover: nanochat_jax/sandbox/execution.py).")
    return sandbox_mode()


_announced = set()


def _announce(mode):
    if mode in _announced or mode == "kernel":
        return
    _announced.add(mode)
    if mode == "unavailable":
        text = (f"SANDBOX UNAVAILABLE: model-written code is refused (status 'refused').\n{kernel_sandbox()[1]}\n"
                "To run it anyway with the weaker unsafe sandbox (see nanochat_jax/sandbox/execution.py for what it "
                f"does not cover): --unsafe-sandbox, or {UNSAFE_ENV}=1.")
    else:
        text = f"UNSAFE SANDBOX (opted in): {describe()}"
    print(f"{'=' * 100}\n{text}\n{'=' * 100}", file=sys.stderr)


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 512 * 2**20,
                 max_output_bytes: int = 2**20, max_disk_bytes: int = 64 * 2**20, max_files: int = 10_000,
                 audit_hook: bool = True) -> ExecutionResult:
    """Runs `code` in the sandbox; never raises for what the program did. audit_hook=False: the kernel layers alone."""
    mode = sandbox_mode()
    _announce(mode)
    if mode == "unavailable":
        return ExecutionResult("refused", "", "", "sandbox unavailable: " + kernel_sandbox()[1], None, 0.0)
    try:
        return _run(code, timeout, max_memory_bytes, max_output_bytes, max_disk_bytes, mode == "kernel", audit_hook,
                    files=max_files)
    except Exception as e:  # noqa: BLE001 - the caller's own trouble (no descriptors left, a bad argument): a result
        return ExecutionResult("refused", "", "", f"the sandbox could not start: {type(e).__name__}: {e}", None, 0.0)


# ---- python -m nanochat_jax.sandbox --check
_PROBE = r'''
import json, os, resource, socket
facts = {"uid": os.getuid(), "pid": os.getpid()}
def fact(name, fn):
    try:
        facts[name] = fn()
    except OSError as e:
        facts[name] = "refused: " + (os.strerror(e.errno) if e.errno else str(e))
fact("hostname", socket.gethostname)
fact("namespaces", lambda: {n: os.readlink(f"/proc/self/ns/{n}") for n in ("user", "mnt", "pid", "net", "ipc", "uts")})
fact("interfaces", lambda: ", ".join(sorted(l.split(":")[0].strip()
                                            for l in open("/proc/self/net/dev").readlines()[2:])))
fact("status", lambda: {l.split(":")[0]: l.split(":")[1].strip() for l in open("/proc/self/status")})
fact("processes", lambda: len([p for p in os.listdir("/proc") if p.isdigit()]))
fact("system", lambda: open("/usr/nanochat_probe", "w") and "WRITABLE")
st = os.statvfs(os.getcwd())
facts["workdir"] = [os.getcwd(), st.f_blocks * st.f_frsize, st.f_files]
facts["rlimits"] = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n))[1]
                    for n in ("CPU", "AS", "FSIZE", "NPROC", "NOFILE", "CORE")}
print(json.dumps(facts))
'''


def _mib(n):
    return "unlimited" if n < 0 else f"{n / 2**20:g} MiB"


def check(unsafe: bool = False) -> int:
    """Prints the mode and each layer as seen from inside a sandboxed program; 0 when model code can run."""
    if unsafe:
        allow_unsafe()
    mode = sandbox_mode()
    print(describe())
    if mode == "unavailable":
        print(f"(opt in to unsafe mode with --unsafe-sandbox or {UNSAFE_ENV}=1)")
        return 1
    kernel = mode == "kernel"
    if kernel:
        version = subprocess.run([bwrap_path(), "--version"], capture_output=True, text=True, timeout=30).stdout
        print(f"  bubblewrap          {version.strip()} ({bwrap_path()})")
    result = _run(_PROBE, 10.0, 512 * 2**20, 2**20, 64 * 2**20, kernel, False, report=True)
    if result.status != "ok":
        print(f"the probe failed: {result.status}: {result.error}\n{result.stderr}")
        return 1
    facts = json.loads(result.stdout)
    layers = ast.literal_eval(next(line.split(" ", 1)[1] for line in result.stderr.splitlines()
                                   if line.startswith("sandbox-layers ")))
    status = facts["status"] if isinstance(facts["status"], dict) else {}
    if isinstance(facts["namespaces"], dict):
        fresh = [n for n, link in facts["namespaces"].items() if link != os.readlink(f"/proc/self/ns/{n}")]
        namespaces = ", ".join(fresh) + " new" if fresh else "none new (the host's)"
    else:
        namespaces = f"cannot tell ({facts['namespaces']})"
    limits, host_uid = facts["rlimits"], HOST_UID if kernel and os.geteuid() == 0 else os.getuid()
    rows = [("namespaces", namespaces),
            ("identity", f"uid {facts['uid']} (on the host: {host_uid}), pid {facts['pid']}, host name "
                         f"{facts['hostname']!r}, effective capabilities {status.get('CapEff', '?')}"),
            ("processes it sees", facts["processes"]), ("network", f"interfaces: {facts['interfaces']}"),
            ("system files", facts["system"]),
            ("writable", f"{facts['workdir'][0]} ({_mib(facts['workdir'][1])} and "
                         f"{facts['workdir'][2] if _inode_cap[0] else 'uncapped'} files in all)" if kernel
             else f"{facts['workdir'][0]} (a host directory: files capped, the total not)"),
            ("seccomp", f"mode {status['Seccomp']} (2 = filter), {status['Seccomp_filters']} filter(s)"
                        if "Seccomp" in status else layers.get("seccomp", "off") + " (the guard loaded it)"),
            ("landlock", layers.get("landlock", "off")),
            ("rlimits", f"cpu {limits['CPU']} s, address space {_mib(limits['AS'])}, file size {_mib(limits['FSIZE'])}"
                        f", threads {limits['NPROC']}, open files {limits['NOFILE']}, core {limits['CORE']}"),
            ("audit hook", "on in every call (a second layer; this probe runs without it)")]
    if not kernel:
        rows.insert(1, ("user+net namespaces", layers.get("user+net namespaces", "off")))
    for name, value in rows:
        print(f"  {name:<20}{value}")
    times = sorted(_run("pass", 10.0, 512 * 2**20, 2**16, 2**20, kernel, True).duration for _ in range(5))
    print(f"  round trip          {1000 * times[2]:.0f} ms for a trivial program (median of 5)")
    return 0
