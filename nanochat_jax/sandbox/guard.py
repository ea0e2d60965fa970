"""The first lines of every sandboxed interpreter: the kernel layers it applies to itself, then the program.

execution.py runs this text as `python -I -S -u -c <text> <config>` (a marshal-encoded dict in hex) in bubblewrap
(kernel mode) or directly (unsafe mode), where the project is not visible: it imports only the standard library (and
pyseccomp). main() applies the layers in order; limits, Landlock domains and seccomp filters cannot be lifted by the
process that received them, and a layer that fails stops here (exit code SETUP_FAILED) before the program runs.
"""
import ctypes
import marshal
import os
import resource
import struct
import sys

SETUP_FAILED = 125
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def fail(layer, error):
    print(f"sandbox: could not apply {layer}: {error}", file=sys.stderr, flush=True)
    os._exit(SETUP_FAILED)


def apply(layer, fn, *args, errors=Exception):
    try:
        return fn(*args)
    except errors as e:  # a layer that cannot be applied stops the run
        fail(layer, e)


def checked(result, call):
    """A libc call's result; an OSError naming the call where it failed (returned -1)."""
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{call}: " + os.strerror(ctypes.get_errno()))
    return result


def set_limits(cfg):
    cpu = int(cfg["timeout"]) + 1  # SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for which, limit in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_FSIZE, cfg["disk"]),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, cfg["threads"]),
                         (resource.RLIMIT_NOFILE, cfg["files"])):
        resource.setrlimit(which, (limit, limit))


def drop_capabilities():
    """Unsafe mode as root: empties every capability set and locks the securebits so nothing regains them."""
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (fails quietly past the last capability)
    libc.prctl(28, 0x2f, 0, 0, 0)  # PR_SET_SECUREBITS: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2, all empty
    checked(libc.capset(ctypes.byref(header), data), "capset")
    if any(line.split()[1].strip("0") for line in open("/proc/self/status") if line.startswith(("CapEff", "CapPrm"))):
        raise OSError("capabilities remain after capset")


LANDLOCK_FS = [1 << i for i in range(13)]  # EXECUTE .. MAKE_SYM (ABI 1)
LANDLOCK_FS_BY_ABI = {2: 1 << 13, 3: 1 << 14, 5: 1 << 15}  # REFER, TRUNCATE, IOCTL_DEV
LANDLOCK_FILE_RIGHTS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)  # what a rule on a file may hold
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3


def landlock_abi() -> int:
    return libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION


def apply_landlock(cfg):
    """Returns the Landlock ABI applied, or 0 where the kernel has no Landlock."""
    abi = landlock_abi()
    if abi <= 0:
        return 0
    handled = sum(LANDLOCK_FS) + sum(bit for version, bit in LANDLOCK_FS_BY_ABI.items() if abi >= version)
    scoped = 0b11 if abi >= 6 else 0  # abstract Unix sockets and signals: only within the sandbox
    attr = struct.pack("=3Q", handled, 0, scoped)  # handled_access_fs, handled_access_net, scoped
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # the struct as this ABI knows it
    ruleset = checked(libc.syscall(444, attr, ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")

    def allow(path, rights):
        if not os.path.exists(path):
            return
        if not os.path.isdir(path):
            rights &= LANDLOCK_FILE_RIGHTS
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)  # (a failure below ends the interpreter: see apply)
        rule = struct.pack("=Qi", rights & handled, fd)  # LANDLOCK_RULE_PATH_BENEATH's (packed) access, fd
        checked(libc.syscall(445, ruleset, 1, rule, ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        os.close(fd)

    for path in cfg["read"]:
        allow(path, READ_FILE | READ_DIR | EXECUTE)
    for path in ("/dev/null", "/dev/zero", "/dev/full"):
        allow(path, LANDLOCK_FILE_RIGHTS & ~EXECUTE)
    allow(cfg["workdir"], handled)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (Landlock requires it; bubblewrap has set it already)
    checked(libc.syscall(446, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset)
    return abi


ALWAYS = """ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd pidfd_open pidfd_send_signal process_madvise
process_mrelease mount umount2 pivot_root chroot move_mount open_tree fsopen fsconfig fsmount fspick mount_setattr
unshare setns keyctl add_key request_key bpf perf_event_open userfaultfd fanotify_init io_uring_setup io_uring_enter
io_uring_register setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr chown fchown lchown fchownat
mknod mknodat kexec_load kexec_file_load init_module finit_module delete_module reboot swapon swapoff acct quotactl
quotactl_fd syslog settimeofday clock_settime clock_adjtime adjtimex sethostname setdomainname iopl ioperm
modify_ldt personality name_to_handle_at open_by_handle_at lookup_dcookie vhangup uselib nfsservctl fork vfork
memfd_create memfd_secret tkill flock""".split()
OWN_PROCESS_ONLY = ["prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr",
                    "migrate_pages", "move_pages"]  # argument 0 is a pid: only 0 (this process) is allowed
CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080]
NEWEST_KNOWN = 449  # syscalls numbered above this (the same numbers on every architecture) answer ENOSYS
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR = 0x40086602, 0x401C5820  # inode flags (append-only, noatime, ...)
# F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE (flock(2) is refused whole): a lock or lease on a host file
# the program can read (the interpreter's own) would block the host's processes that open or lock it during the call
FCNTL_LOCKS = (6, 7, 37, 38, 1024)
# no mode or time changes, in either mode: Landlock does not govern metadata, and kernel mode binds the host's own
# device nodes (/dev/null, /dev/full, ...) read-write into the sandbox, where a caller running as root is their owner
METADATA = "chmod fchmod fchmodat utime utimes utimensat futimesat".split()  # (fchmodat2: above NEWEST_KNOWN)


def seccomp_filter(own_pid, unsafe):
    """A pyseccomp SyscallFilter; own_pid: the process's pid as it sees itself (1 in kernel mode: its namespace's)."""
    import ctypes.util
    import errno
    find_library = ctypes.util.find_library  # pyseccomp looks its libraries up at import: skip ldconfig's subprocess
    ctypes.util.find_library = lambda name: {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}.get(name) or \
        find_library(name)
    try:
        import pyseccomp as sc
    finally:
        ctypes.util.find_library = find_library
    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)

    def refuse(name, *args, action=eperm):
        number = sc.resolve_syscall(sc.Arch.NATIVE, name) if isinstance(name, str) else name
        if number >= 0:  # names this architecture lacks (fork on arm64) are skipped
            f.add_rule(action, number, *args)

    for name in ALWAYS + METADATA:
        refuse(name)
    for name in OWN_PROCESS_ONLY:
        refuse(name, sc.Arg(0, sc.NE, 0))
    for name, who_process in (("setpriority", 0), ("ioprio_set", 1)):  # PRIO_PROCESS, IOPRIO_WHO_PROCESS ...
        refuse(name, sc.Arg(0, sc.NE, who_process))
        refuse(name, sc.Arg(1, sc.NE, 0))  # ... of this process only
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        refuse(name, sc.Arg(0, sc.NE, own_pid))  # signals to itself only
    refuse("clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # threads yes, processes no
    for bit in CLONE_NAMESPACES:
        refuse("clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    refuse("clone3", action=sc.ERRNO(errno.ENOSYS))  # its flags live in memory a filter cannot read; libc falls back
    for name in ("fcntl", "fcntl64"):
        for command in FCNTL_LOCKS:
            refuse(name, sc.Arg(1, sc.EQ, command))
    for request in (TIOCSTI, TIOCLINUX, FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR):
        refuse("ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    allowed = {1} if unsafe else {1, 2, 10}  # AF_UNIX, AF_INET, AF_INET6
    for name in ("socket", "socketpair"):
        refuse(name, sc.Arg(0, sc.GT, 10), action=sc.ERRNO(errno.EAFNOSUPPORT))
        for family in set(range(11)) - allowed:
            refuse(name, sc.Arg(0, sc.EQ, family), action=sc.ERRNO(errno.EAFNOSUPPORT))
    if unsafe:  # (kernel mode allows exec: with no new processes, it only replaces the program inside the same filter)
        refuse("socket", action=sc.ERRNO(errno.EACCES))  # not even a Unix socket to a path outside
        for name in ("execve", "execveat"):
            refuse(name)
    for number in range(NEWEST_KNOWN + 1, 600):
        refuse(number, action=sc.ERRNO(errno.ENOSYS))
    return f


def audit_hook(workdir):
    """The second layer: refuses, naming it, what the program should not try (the kernel layers hold without it)."""
    root = os.path.realpath(workdir)
    deny = frozenset("""os.system os.exec os.fork os.forkpty os.posix_spawn os.spawn subprocess.Popen os.kill os.killpg
        ctypes.dlopen ctypes.dlsym ctypes.cdata socket.connect socket.bind socket.getaddrinfo socket.gethostbyname
        socket.sendto socket.sendmsg sys.addaudithook gc.get_objects gc.get_referrers gc.get_referents os.setuid
        os.mkfifo os.mknod""".split())
    path_events = frozenset("""os.remove os.rename os.rmdir os.mkdir os.chmod os.chown os.symlink os.link os.truncate
        os.utime shutil.rmtree shutil.move shutil.copyfile os.chdir""".split())
    no_import = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "pyseccomp"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode, sep, path_types = os.path.realpath, os.fsdecode, os.sep, (str, bytes, os.PathLike)

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            real = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + sep)

    def hook(event, args):
        if event in deny:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "socket.__new__" and args[1] != 1:
            raise PermissionError("sandbox: network sockets are not allowed")
        if event == "import" and args[0].split(".")[0] in no_import:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and args[0] is not None and not inside(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & write_flags:
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
        if event in path_events and not all(inside(a) for a in args[:2] if isinstance(a, path_types)):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    for module in [m for m in sys.modules if m.split(".")[0] in no_import]:
        del sys.modules[module]  # a later import goes through the hook
    sys.addaudithook(hook)


def main():
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    sys.path.extend(p for p in cfg["site"] if p not in sys.path)  # (started with -S: no .pth processing)
    with open(cfg["program"], encoding="utf-8", errors="replace") as f:
        program = f.read()
    apply("rlimits", set_limits, cfg, errors=(OSError, ValueError))
    layers = {"rlimits": "on"}
    if cfg["unsafe"]:  # where the kernel allows it, a user namespace (no capabilities outside) with its own network
        failed = libc.unshare(0x10000000 | 0x40000000) != 0  # CLONE_NEWUSER | CLONE_NEWNET
        layers["user+net namespaces"] = "off: " + os.strerror(ctypes.get_errno()) if failed else "on"
        apply("capability drop", drop_capabilities, errors=OSError)
    abi = apply("landlock", apply_landlock, cfg)
    layers["landlock"] = f"ABI {abi}" if abi else "off: this kernel has no Landlock"
    if cfg["unsafe"]:
        apply("seccomp", lambda: seccomp_filter(os.getpid(), unsafe=True).load())
    elif not any(line.split() == ["Seccomp:", "2"] for line in open("/proc/self/status")):  # (loaded before Python)
        fail("seccomp", "bubblewrap did not load the filter")
    layers["seccomp"] = "on"
    if cfg["audit_hook"]:
        audit_hook(cfg["workdir"])
        layers["audit hook"] = "on"
    if cfg["report"]:
        print("sandbox-layers " + repr(layers), file=sys.stderr, flush=True)
    sys.argv = ["program.py"]
    os.write(cfg["ready_fd"], b"1")
    os.close(cfg["ready_fd"])
    for name in [n for n in globals() if not n.startswith("__")]:
        del globals()[name]  # the program starts with a clean __main__
    return program


if __name__ == "__main__":
    _program = main()
    exec(compile(_program, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
