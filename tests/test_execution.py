"""The code sandbox. Every escape attempt is judged from outside the sandbox (files, the caller's limits, priority
and affinity, other processes, the network), in kernel mode with and without the audit hook (the kernel layers must
hold alone), and where it applies in unsafe mode too."""
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nanochat_jax.sandbox import execution
from nanochat_jax.sandbox.execution import STATUSES, execute_code

HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed (.ci/run installs it)")
# a host file and directory the program can see in every mode: this Python's prefix is visible (read-only)
# (one per pytest-xdist worker: the workers share the prefix, and one's teardown must not remove the other's)
VISIBLE_DIR = os.path.join(sys.prefix, f"nanochat_sandbox_target_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
VISIBLE_FILE = os.path.join(VISIBLE_DIR, "target.txt")


@pytest.fixture(autouse=True, scope="module")
def visible_target():
    if not os.access(sys.prefix, os.W_OK):  # (an unprivileged caller: the one test that needs it skips)
        yield
        return
    os.makedirs(VISIBLE_DIR, exist_ok=True)
    with open(VISIBLE_FILE, "w") as f:
        f.write("the sandbox may read this, never change it\n")
    os.chmod(VISIBLE_FILE, 0o644)
    yield
    shutil.rmtree(VISIBLE_DIR, ignore_errors=True)


def _use_unsafe(monkeypatch):
    monkeypatch.setattr(execution, "sandbox_mode", lambda: "unsafe")
    monkeypatch.setattr(execution, "_announce", lambda mode: None)


@pytest.fixture(params=["kernel", "kernel-nohook", "unsafe", "unsafe-nohook"])
def run(request, monkeypatch):
    """execute_code in one mode; every result must have a known status, the mode asked for, and nothing left."""
    mode, hook = request.param.split("-")[0], not request.param.endswith("nohook")
    if mode == "kernel" and not HAVE_BWRAP:
        pytest.skip("bubblewrap is not installed (.ci/run installs it)")
    if mode == "unsafe":
        _use_unsafe(monkeypatch)

    def go(code, **kwargs):
        result = execute_code(textwrap.dedent(code), audit_hook=hook, **kwargs)
        assert result.status in STATUSES and result.mode == mode and result.leftover == 0, result
        return result
    go.mode = mode
    return go


def snapshot(path):
    st = os.lstat(path)
    xattrs = os.listxattr(path) if hasattr(os, "listxattr") else []
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, sorted(xattrs)


def lingering(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in open(f"/proc/{pid}/cmdline").read().replace("\0", " "):
                found.append(int(pid))
        except OSError:
            pass
    return found


# ---- behaviour
@needs_bwrap
def test_kernel_mode_is_the_default_where_bubblewrap_is_installed():
    available, why = execution.kernel_sandbox()
    assert available, why
    assert execution.sandbox_mode() == "kernel" and execute_code("pass").mode == "kernel"


def test_ok_error_and_statuses(run):
    ok = run("import math\nprint(math.factorial(5))")
    assert ok.status == "ok" and ok.success and ok.stdout == "120\n" and ok.returncode == 0
    err = run("def f():\n    return 1 / 0\nf()")
    assert err.status == "error" and err.error == "ZeroDivisionError: division by zero" and "Traceback" in err.stderr
    assert run("raise SystemExit(3)").returncode == 3


def test_timeout_memory_and_output_caps(run):
    slow = run("import time\nprint('started')\nwhile True: time.sleep(0.01)", timeout=1.0)
    assert slow.status == "timeout" and slow.stdout == "started\n" and slow.duration < 30
    spin = run("while True: pass", timeout=1.0)
    assert spin.status == "timeout"
    assert run("x = bytearray(2 * 1024**3)", max_memory_bytes=256 * 2**20).status == "memory"
    bomb = run("x = []\nwhile True: x.append(' ' * 10**6)", max_memory_bytes=256 * 2**20, timeout=10)
    assert bomb.status == "memory", bomb
    flood = run("print('x' * 10**7)", max_output_bytes=2**16)
    assert flood.status == "output-cap" and len(flood.stdout) == 2**16
    errflood = run("import sys\nwhile True: sys.stderr.write('e' * 4096)", max_output_bytes=2**16)
    assert errflood.status == "output-cap" and len(errflood.stderr) == 2**16


def test_environment_is_scrubbed_and_nothing_is_left(run, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_SECRET", "hunter2")
    result = run("import os\nopen('f.txt', 'w').write('hi')\nprint(open('f.txt').read(), os.getcwd())\n"
                 "print(sorted(os.environ))")
    assert result.status == "ok" and "hunter2" not in result.stdout and "NANOCHAT_SECRET" not in result.stdout
    workdir = result.stdout.split()[1]
    assert workdir.startswith("/") and not os.path.exists(os.path.join(workdir, "f.txt"))


@pytest.mark.parametrize("code,message", [
    ("import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)", "socket"),
    ("import socket; s = socket.socket(); s.connect(('127.0.0.1', 9))", "network sockets"),
    ("open('/tmp/../etc/nanochat_sandbox_escape.txt', 'w')", "outside the working directory"),
    ("import os; os.remove('/etc/hostname')", "outside the working directory"),
    ("import os; os.fork()", "os.fork"),
    ("import os; os.system('true')", "os.system"),
    ("import os\nwhile True: os.fork()", "os.fork"),
    ("import pty; pty.spawn('/bin/sh')", "pty"),  # (no pty devices, else os.fork refused)
    ("import subprocess; subprocess.run(['true'])", "subprocess"),  # (_posixsubprocess or Popen refused)
    ("import ctypes", "ctypes"),
    ("import os, signal; os.kill(1, signal.SIGTERM)", "os.kill"),
])
@needs_bwrap
def test_the_audit_hook_names_what_it_refuses(code, message):
    result = execute_code(code)
    assert result.status == "error" and (message in result.error or "os.fork" in result.error), result


# ---- the attack classes, judged from outside
def test_a_patched_hook_opens_nothing(run, tmp_path):
    """The hook's closure (reached through an exception's frames) and the path helpers it calls are replaced;
    the writes that follow still do not reach the host."""
    if not os.path.exists(VISIBLE_FILE):
        pytest.skip(f"needs a writable sys.prefix ({sys.prefix}) for a file the sandbox can see")
    outside, before = tmp_path / "escaped.txt", snapshot(VISIBLE_FILE)
    run(f"""
        import os, posixpath
        try:
            os.system("true")
        except PermissionError as e:
            tb = e.__traceback__
            while tb.tb_next:
                tb = tb.tb_next
            inside = tb.tb_frame.f_locals.get("inside")
            for cell in inside.__closure__ if inside else ():
                if isinstance(cell.cell_contents, str):
                    cell.cell_contents = "/"
        except OSError:
            pass
        posixpath._joinrealpath = lambda *a, **k: (os.getcwd(), True)
        for path, mode in (({str(outside)!r}, "w"), ({VISIBLE_FILE!r}, "a"), ({VISIBLE_DIR!r} + "/nanochat_x", "w")):
            try:
                open(path, mode).close()
                print("opened", path)
            except OSError as e:
                print("refused", path, e)
    """)
    assert not outside.exists() and not os.path.exists(VISIBLE_DIR + "/nanochat_x")
    assert snapshot(VISIBLE_FILE) == before


def test_native_code_under_another_name_starts_nothing(run, tmp_path):
    """A refused native module loaded under a dotted alias (and sys.audit replaced, which subprocess calls), a
    copy of _ctypes in the program's own directory, and libc through ctypes: no process starts, none outlives the
    call, nothing reaches the host."""
    marker, outside = "37.251", tmp_path / "native.txt"
    run(f"""
        import glob, importlib.util, os, shutil, sys
        dynload = os.path.join(os.path.dirname(os.__file__), "lib-dynload")
        def alias(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        cmd = ["/bin/sh", "-c", "touch {outside}; sleep {marker}"]
        try:
            sys.modules["_posixsubprocess"] = alias("x._posixsubprocess", glob.glob(dynload + "/_posixsubprocess*.so")[0])
            sys.audit = lambda *args: None
            import subprocess
            subprocess.Popen(cmd, start_new_session=True)
            print("spawned")
        except Exception as e:
            print("refused popen", repr(e))
        try:
            shutil.copy(glob.glob(dynload + "/_ctypes*.so")[0], "mine.so")
            sys.modules["_ctypes"] = alias("y._ctypes", "mine.so")
            ctypes = alias("y.ctypes", os.path.join(os.path.dirname(os.__file__), "ctypes", "__init__.py"))
            libc = ctypes.CDLL(None, use_errno=True)
            print("system", libc.system(" ".join(cmd[:2] + ["'" + cmd[2] + "'"]).encode()))
            print("fork", libc.fork(), "vfork-clone", libc.syscall(56, 0x4111, 0, 0, 0, 0))
        except Exception as e:
            print("refused ctypes", repr(e))
        try:
            pid = os.fork()
            if pid == 0:
                os.setsid()
                os.execv("/bin/sleep", ["sleep", "{marker}"])
        except Exception as e:
            print("refused fork", repr(e))
        try:  # (in kernel mode an exec replaces the program inside the same sandbox; its shell cannot fork)
            os.execv("/bin/sh", ["sh", "-c", "touch {outside}; sleep {marker} & sleep {marker}"])
        except Exception as e:
            print("refused exec", repr(e))
    """, timeout=3)
    time.sleep(0.2)
    assert lingering(f"sleep {marker}") == [] and not outside.exists()


def test_paths_checked_one_way_and_resolved_another(run):
    """dir_fd= creation, descriptor-based chmod/utime/chown/truncate and xattrs on a host file the program can see:
    the file and its directory are unchanged."""
    before, listing = snapshot(VISIBLE_FILE), set(os.listdir(VISIBLE_DIR))
    size = os.path.getsize(VISIBLE_FILE)
    result = run(f"""
        import os
        attempts = {{
            "dir_fd open": lambda: os.open("nanochat_a", os.O_WRONLY | os.O_CREAT, dir_fd=d),
            "dir_fd mkdir": lambda: os.mkdir("nanochat_b", dir_fd=d),
            "dir_fd symlink": lambda: os.symlink("/", "nanochat_c", dir_fd=d),
            "fchmod": lambda: os.fchmod(f, 0o777),
            "utime(fd)": lambda: os.utime(f, (0, 0)),
            "fchown": lambda: os.fchown(f, 1234, 1234),
            "chmod": lambda: os.chmod({VISIBLE_FILE!r}, 0o777),
            "truncate": lambda: os.truncate({VISIBLE_FILE!r}, {size}),
            "setxattr": lambda: os.setxattr(f, "user.nanochat", b"1"),
            "setxattr path": lambda: os.setxattr({VISIBLE_FILE!r}, "user.nanochat", b"1"),
        }}
        d = os.open({VISIBLE_DIR!r}, os.O_RDONLY | os.O_DIRECTORY)
        f = os.open({VISIBLE_FILE!r}, os.O_RDONLY)
        for name, attempt in attempts.items():
            try:
                attempt()
                print("DONE", name)
            except OSError as e:
                print("refused", name, e.strerror)
    """)
    assert snapshot(VISIBLE_FILE) == before and set(os.listdir(VISIBLE_DIR)) == listing, result.stdout
    assert "DONE" not in result.stdout.replace("DONE dir_fd", "")  # (dir_fd calls may land in the sandbox's view)


def test_the_caller_cannot_be_limited_reniced_pinned_or_signalled(run):
    helper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    me = os.getpid()
    limits = {r: resource_limit(me, r) for r in ("NOFILE", "CPU", "AS", "NPROC")}
    nice, affinity = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0)
    try:
        result = run(f"""
            import os, resource, signal
            attempts = {{
                "prlimit nofile": lambda: resource.prlimit({me}, resource.RLIMIT_NOFILE, (3, 3)),
                "prlimit cpu": lambda: resource.prlimit({me}, resource.RLIMIT_CPU, (1, 1)),
                "prlimit as": lambda: resource.prlimit({me}, resource.RLIMIT_AS, (2**20, 2**20)),
                "setpriority pid": lambda: os.setpriority(os.PRIO_PROCESS, {me}, 19),
                "setpriority user": lambda: os.setpriority(os.PRIO_USER, 0, 19),
                "setpriority pgrp": lambda: os.setpriority(os.PRIO_PGRP, 0, 19),
                "affinity": lambda: os.sched_setaffinity({me}, {{0}}),
                "scheduler": lambda: os.sched_setscheduler({me}, os.SCHED_IDLE, os.sched_param(0)),
                "stop caller": lambda: os.kill({me}, signal.SIGSTOP),
                "kill helper": lambda: os.kill({helper.pid}, signal.SIGKILL),
                "kill helper group": lambda: os.killpg({helper.pid}, signal.SIGKILL),
                "pidfd": lambda: signal.pidfd_send_signal(os.pidfd_open({helper.pid}), signal.SIGKILL),
            }}
            for name, attempt in attempts.items():
                try:
                    attempt()
                    print("DONE", name)
                except (OSError, AttributeError) as e:
                    print("refused", name, e)
        """)
        assert {r: resource_limit(me, r) for r in limits} == limits
        assert os.getpriority(os.PRIO_PROCESS, 0) == nice and os.sched_getaffinity(0) == affinity
        assert helper.poll() is None and open(f"/proc/{helper.pid}/stat").read().split(")")[1].split()[0] != "T"
        assert "DONE" not in result.stdout, result.stdout
    finally:
        helper.kill()
        helper.wait()


def test_the_host_device_nodes_keep_their_modes_and_times(run):
    """Kernel mode binds the host's own /dev/null, /dev/full, ... into the sandbox; a root caller owns them, so only
    the refused chmod and utime families keep their modes and times the host's (in every mode)."""
    nodes = ["/dev/null", "/dev/full", "/dev/zero", "/dev/urandom"]
    before = {path: snapshot(path) for path in nodes}
    result = run(f"""
        import os
        for path in {nodes!r} + ["/tmp"]:
            mode = os.stat(path).st_mode & 0o7777  # (the same mode and the time now: harmless should it succeed)
            for name, attempt in (("utime", lambda: os.utime(path)), ("chmod", lambda: os.chmod(path, mode)),
                                  ("lchmod", lambda: os.chmod(path, mode, follow_symlinks=False))):
                try:
                    attempt()
                    print("DONE", name, path)
                except (OSError, NotImplementedError) as e:
                    print("refused", name, path, e)
        with open("/dev/zero", "rb") as f:  # still usable
            print("read", f.read(2))
    """)
    assert {path: snapshot(path) for path in nodes} == before
    assert "DONE" not in result.stdout and result.stdout.strip().endswith("read b'\\x00\\x00'"), \
        result.stdout + result.stderr


def test_the_sandbox_runs_as_an_unprivileged_host_uid(run):
    """Seen from the host while it runs, every process of the program has the caller's uid, or for a root caller
    an unprivileged one (execution.HOST_UID) with no groups; none holds a capability."""
    if run.mode != "kernel":
        pytest.skip("unsafe mode runs as its caller (capabilities dropped)")
    found = []

    def ours(pid):  # a descendant of this test process
        while pid > 1:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if pid == os.getpid():
                return True
        return False

    def look():
        namespace = os.readlink("/proc/self/ns/pid")
        for _ in range(100):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    # (bubblewrap itself, before it execs the program, holds capabilities in its own user
                    # namespace for a few ms: the program's processes are those it has become or started)
                    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                    program = os.path.basename(argv0) != b"bwrap"
                    if os.readlink(f"/proc/{pid}/ns/pid") != namespace and ours(int(pid)) and program:
                        found.append(Path(f"/proc/{pid}/status").read_text())
                except (OSError, ValueError):
                    pass
            if found:
                return
            time.sleep(0.05)

    import threading
    watcher = threading.Thread(target=look)
    watcher.start()
    result = run("import time\ntime.sleep(6)", timeout=20)
    watcher.join()
    assert found, result
    fields = dict(line.split(":", 1) for line in found[0].splitlines())
    want = execution.HOST_UID if os.geteuid() == 0 else os.getuid()
    assert fields["Uid"].split() == [str(want)] * 4 and fields["Gid"].split()[0] == str(
        execution.HOST_UID if os.geteuid() == 0 else os.getgid()), fields
    assert fields["Groups"].split() == ([] if os.geteuid() == 0 else fields["Groups"].split())
    assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 0, fields


def test_no_lock_or_lease_on_a_host_file(run):
    """A host file the program can read (the interpreter itself): no flock, POSIX or OFD lock, nor lease, that
    would block the host's processes that open or lock it while the call runs. The caller can still lock it."""
    import fcntl
    result = run("""
        import fcntl, struct, sys
        host_file = open(sys.executable, "rb")
        fd = host_file.fileno()
        flock = struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0)
        attempts = {"flock": lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB),
                    "lockf": lambda: fcntl.fcntl(fd, fcntl.F_SETLK, flock),
                    "lockf wait": lambda: fcntl.fcntl(fd, fcntl.F_SETLKW, flock),
                    "ofd lock": lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock),
                    "lease": lambda: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)}
        for name, attempt in attempts.items():
            try:
                attempt()
                print("DONE", name)
            except PermissionError as e:  # (seccomp's EPERM: not a bad descriptor or an unsupported call)
                print("refused", name, e)
    """)
    assert result.stdout.count("refused") == 5 and "DONE" not in result.stdout, result.stdout + result.stderr
    with open(sys.executable, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # nothing holds it


def resource_limit(pid, name):
    import resource
    return resource.prlimit(pid, getattr(resource, "RLIMIT_" + name))


def test_the_caller_does_not_trust_files_the_program_controls(run):
    """Output comes through the caller's pipes: the program replacing files, redirecting its descriptors or
    writing without end cannot crash the call or make it read without bound."""
    result = run("""
        import os, sys
        for name in (".stdout", ".stderr", "stdout", "output"):
            try:
                os.symlink("/dev/zero", name)
            except OSError:
                pass
        os.mkdir(".out")
        os.dup2(os.open("/dev/zero", os.O_RDONLY), 2)
        with open("/dev/zero", "rb") as zero:
            while True:
                sys.stdout.buffer.write(zero.read(65536))
    """, max_output_bytes=2**18)
    assert result.status == "output-cap" and len(result.stdout) == 2**18
    closed = run("import os\nos.close(1)\nos.close(2)\nprint('gone')")
    assert closed.status == "error" and closed.stdout == ""


def test_the_network_reaches_nothing(run):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    server.settimeout(0.5)
    udp.settimeout(0.5)
    tcp_port, udp_port = server.getsockname()[1], udp.getsockname()[1]
    try:
        result = run(f"""
            import socket
            for name, attempt in {{
                "tcp": lambda: socket.create_connection(("127.0.0.1", {tcp_port}), timeout=2),
                "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {udp_port})),
                "dns": lambda: socket.getaddrinfo("example.com", 80),
                "netlink": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0),
                "packet": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0),
                "vsock": lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM),
            }}.items():
                try:
                    attempt()
                    print("DONE", name)
                except OSError as e:
                    print("refused", name, e)
        """)
        with pytest.raises(socket.timeout):
            server.accept()
        with pytest.raises(socket.timeout):
            udp.recvfrom(16)
        assert "DONE tcp" not in result.stdout and "DONE netlink" not in result.stdout
        assert "DONE vsock" not in result.stdout and "DONE packet" not in result.stdout
    finally:
        server.close()
        udp.close()


@needs_bwrap
def test_kernel_mode_sees_only_itself():
    result = execute_code("""
import os, socket
print(sorted(p for p in os.listdir('/proc') if p.isdigit()), os.getuid(), socket.gethostname())
print(sorted(l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]))
print(os.path.exists('/root/.ssh'), os.path.exists('/etc/shadow'), os.path.exists(os.path.expanduser('~/.cache')))
open('/etc/passwd', 'a')
""", audit_hook=False)
    assert result.mode == "kernel"
    procs, interfaces, secrets = result.stdout.splitlines()
    assert procs == "['1'] 1000 sandbox" and interfaces == "['lo']"  # its own pid 1, nothing else
    assert secrets == "False False False"
    assert "Read-only file system" in result.error or "Permission denied" in result.error  # (mount, Landlock)


@needs_bwrap
def test_the_disk_is_capped_in_total():
    result = execute_code("""
import os
written = 0
try:
    for i in range(1000):
        with open(f"f{i}", "wb") as f:
            f.write(b"x" * 2**20)
        written += 2**20
except OSError as e:
    print(written, e.strerror)
""", max_disk_bytes=4 * 2**20, audit_hook=False)
    written, error = result.stdout.split(" ", 1)
    assert int(written) <= 4 * 2**20 and error.strip() == "No space left on device", result


@needs_bwrap
def test_the_thread_cap_holds_whoever_calls(run):
    """Small stacks, 400 threads: at most the cap start. RLIMIT_NPROC binds the sandbox's uid, unprivileged on the
    host whoever calls (root is exempt from it: a root caller's sandbox runs as execution.HOST_UID); a root caller's
    call also runs in a pids cgroup of its own where one can be made (cgroup v1's pids hierarchy or v2 with the
    controller enabled), removed after the call."""
    result = run("""
        import threading, time
        threading.stack_size(64 * 1024)
        started = 0
        try:
            for _ in range(400):
                threading.Thread(target=time.sleep, args=(3,), daemon=True).start()
                started += 1
        except RuntimeError as e:
            print("capped:", e)
        print(started)
    """, timeout=20)
    assert "capped" in result.stdout and int(result.stdout.split()[-1]) <= execution.THREADS, result.stdout
    mine = f"nanochat_sandbox_{os.getpid()}_"  # (another pytest worker's calls make cgroups of their own meanwhile)
    assert not [d for d in os.listdir("/sys/fs/cgroup/pids") if d.startswith(mine)] \
        if os.path.isdir("/sys/fs/cgroup/pids") else True  # each call's cgroup is removed after it


def test_a_fork_bomb_and_threads():
    bomb = execute_code("import os\nwhile True: os.fork()", audit_hook=False)
    assert bomb.status == "error" and "Operation not permitted" in bomb.error and bomb.leftover == 0
    threads = execute_code("import threading\nts = [threading.Thread(target=sum, args=([1],)) for _ in range(8)]\n"
                           "[t.start() for t in ts]\n[t.join() for t in ts]\nprint('ok')", audit_hook=False)
    assert threads.stdout == "ok\n"


# ---- where the kernel refuses namespaces
@pytest.fixture
def refusing_bwrap(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NANOCHAT_BWRAP", str(fake))
    monkeypatch.delenv(execution.UNSAFE_ENV, raising=False)
    execution.kernel_sandbox.cache_clear()
    monkeypatch.setattr(execution, "_announced", set())
    yield
    execution.allow_unsafe(False)
    execution.kernel_sandbox.cache_clear()


def test_without_namespaces_model_code_is_refused_loudly_once(refusing_bwrap, capsys):
    assert execution.sandbox_mode() == "unavailable"
    first, second = execute_code("print(1)"), execute_code("print(2)")
    assert first.status == second.status == "refused" and first.mode is None and first.stdout == ""
    assert "uid map" in first.error and "Fix:" in first.error
    err = capsys.readouterr().err
    assert err.count("SANDBOX UNAVAILABLE") == 1 and "--unsafe-sandbox" in err
    assert "UNAVAILABLE" in execution.describe()


def test_unsafe_mode_is_an_explicit_opt_in_and_still_refuses(refusing_bwrap, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET", "hunter2")
    execution.allow_unsafe()
    assert execution.sandbox_mode() == "unsafe" and "UNSAFE" in execution.describe()
    hostname, before = socket.gethostname(), snapshot(VISIBLE_FILE)
    result = execute_code(f"""
import os, socket
for name, attempt in {{
    "fchown": lambda: os.fchown(os.open({VISIBLE_FILE!r}, os.O_RDONLY), 1234, 1234),
    "sethostname": lambda: socket.sethostname("pwned"),
    "lookup": lambda: socket.getaddrinfo("example.com", 80),
    "read secret": lambda: open("/etc/shadow").read(),
    "write outside": lambda: open({VISIBLE_DIR!r} + "/nanochat_x", "w"),
}}.items():
    try:
        attempt()
        print("DONE", name)
    except OSError as e:
        print("refused", name)
print(sorted(os.environ))
""", audit_hook=False)
    assert result.mode == "unsafe" and "DONE" not in result.stdout and "hunter2" not in result.stdout, result
    assert socket.gethostname() == hostname and snapshot(VISIBLE_FILE) == before
    assert capsys.readouterr().err.count("UNSAFE SANDBOX") == 1


def test_check_prints_the_layers():
    out = subprocess.run([sys.executable, "-m", "nanochat_jax.sandbox", "--check"], capture_output=True,
                         text=True, timeout=300)
    if HAVE_BWRAP:
        assert out.returncode == 0, out.stderr
        for layer in ("namespaces", "user, mnt, pid, net, ipc, uts new", "seccomp", "mode 2", "landlock", "rlimits",
                      "round trip"):
            assert layer in out.stdout, out.stdout
    else:
        assert out.returncode == 1 and "UNAVAILABLE" in out.stdout


@needs_bwrap
def test_humaneval_scoring_survives_hostile_completions():
    from nanochat_jax.tasks.humaneval import HumanEval
    task = object.__new__(HumanEval)  # (evaluate needs no rows)
    conversation = {"messages": [{"role": "user", "content": "def add(a, b):\n"}], "entry_point": "add",
                    "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    good = "def add(a, b):\n    return a + b\n"
    hostile = ["import os\nos.symlink('/dev/zero', '.stdout')\nprint('x' * 10**8)\n" + good,
               "import os\nos.close(1)\nos.close(2)\n" + good.replace("a + b", "a - b"),
               "while True: pass\n",
               "import sys\nsys.setrecursionlimit(10**6)\ndef add(a, b):\n    return add(a, b)\n",
               "\0\ud800 not even python"]
    assert task.evaluate(conversation, good) is True
    assert [task.evaluate(conversation, c) for c in hostile] == [False] * len(hostile)


@needs_bwrap
def test_the_number_of_files_is_capped_too():
    if execution._tmpfs_tools() is None:
        pytest.skip("no util-linux unshare/mount here: only the size is capped")
    result = execute_code("""
import os
n = 0
try:
    while True:
        os.close(os.open(f"f{n}", os.O_CREAT | os.O_WRONLY))
        n += 1
except OSError as e:
    print(n, e.strerror)
""", max_files=500, audit_hook=False)
    count, error = result.stdout.split(" ", 1)
    assert int(count) < 500 and error.strip() == "No space left on device", result


@needs_bwrap
def test_where_the_capped_tmpfs_cannot_be_mounted_the_size_cap_still_holds(monkeypatch):
    monkeypatch.setattr(execution, "_tmpfs_mount", lambda *args: "/bin/false")  # (a kernel that refuses the mount)
    monkeypatch.setattr(execution, "_inode_cap", [True])
    execution.kernel_sandbox.cache_clear()
    try:
        assert execution.kernel_sandbox() == (True, "") and execution._inode_cap == [False]
        result = execute_code("open('big', 'wb').write(b'x' * 2**21)", max_disk_bytes=2**20, audit_hook=False)
        assert result.status == "error" and ("No space left" in result.error or "too large" in result.error)
    finally:
        execution.kernel_sandbox.cache_clear()


# ---- the same attacks from an unprivileged caller
CLASSES = "host_uid or device_nodes or lock_or_lease or thread_cap or fork_bomb or sees_only_itself or is_capped"


def _unprivileged_view(paths, stash) -> str:
    """A shell script (for a private mount namespace of root's) that makes `paths` reachable by any uid without
    changing the host: each directory that others cannot enter above one of them (a 0700 /root) is covered by an
    empty 0755 tmpfs into which the paths are bound back."""
    blocked = {}
    for path in paths:
        parts = os.path.realpath(path).split(os.sep)
        for i in range(2, len(parts)):
            top = os.sep.join(parts[:i])
            if not os.stat(top).st_mode & 0o001:
                blocked.setdefault(top, []).append(os.path.realpath(path))
                break
    steps = []
    for n, (top, inner) in enumerate(blocked.items()):
        for m, path in enumerate(inner):
            steps += [f"mkdir -p {stash}/{n}_{m}", f"mount --bind {path} {stash}/{n}_{m}"]
        steps.append(f"mount -t tmpfs -o mode=0755 nanochat-view {top}")
        for m, path in enumerate(inner):
            steps += [f"mkdir -p {path}", f"mount --bind {stash}/{n}_{m} {path}"]
    return " && ".join(steps + ['exec "$0" "$@"'])


@needs_bwrap
def test_the_attacks_fail_for_an_unprivileged_caller_too(tmp_path):
    """This module's attack classes, run again by pytest as an unprivileged uid (when the suite runs as root, as on
    CI): the same assertions must hold for a caller whose sandbox maps to its own uid and for whom RLIMIT_NPROC
    binds. The interpreter is made reachable for that uid in a private mount namespace; nothing of the host changes."""
    if os.geteuid() != 0:
        pytest.skip("this run is an unprivileged caller's already: every test here is that caller's")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [sys.base_prefix, sys.prefix, here, *execution._site_packages()]
    uid = 54321  # (no such user: nothing of the host belongs to it)
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _unprivileged_view(paths, tmp_path),
            "unshare", "--setuid", str(uid), "--setgid", str(uid), "--", sys.executable, "-m", "pytest", "-q",
            "-p", "no:cacheprovider", "-k", CLASSES, os.path.abspath(__file__)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NANOCHAT_BASE_DIR"))}
    env |= {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(argv, cwd="/tmp", env=env, capture_output=True, text=True, timeout=600)
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0 and " passed" in done.stdout and "failed" not in done.stdout, tail
