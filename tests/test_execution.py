import os
import subprocess

import pytest

from nanochat_jax.execution import execute_code


def test_ok_and_error():
    ok = execute_code("import math\nprint(math.factorial(5))")
    assert ok.status == "ok" and ok.success and ok.stdout == "120\n" and ok.returncode == 0
    err = execute_code("def f():\n    return 1 / 0\nf()")
    assert err.status == "error" and err.error == "ZeroDivisionError: division by zero" and "Traceback" in err.stderr


def test_timeout_kills_the_process_group():
    result = execute_code("import time\nwhile True: time.sleep(0.01)", timeout=1.0)
    assert result.status == "timeout" and result.duration < 5


def test_memory_and_output_limits():
    assert execute_code("x = bytearray(2 * 1024**3)", max_memory_bytes=256 * 2**20).error == "MemoryError"
    bomb = execute_code("x = []\nwhile True: x.append(' ' * 10**6)", max_memory_bytes=256 * 2**20, timeout=10)
    assert bomb.status in ("error", "killed") and bomb.duration < 10
    flood = execute_code("print('x' * 10**7)", max_output_bytes=2**16)
    assert flood.status == "error" and len(flood.stdout) <= 2**16 and "File too large" in flood.error


@pytest.mark.parametrize("code,message", [
    ("import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)", "socket"),
    ("import socket; s = socket.socket(); s.connect(('127.0.0.1', 9))", "network sockets"),
    ("open('/tmp/nanochat_sandbox_escape.txt', 'w')", "outside the working directory"),
    ("import os; os.remove('/etc/hostname')", "outside the working directory"),
    ("import os; os.fork()", "os.fork"),
    ("import os; os.system('true')", "os.system"),
    ("import os\nwhile True: os.fork()", "os.fork"),  # fork bomb
    ("import pty; pty.spawn('/bin/sh')", "os.fork"),  # a shell
    ("import subprocess; subprocess.run(['true'])", "_posixsubprocess"),
    ("import ctypes", "ctypes"),
    ("import os, signal; os.kill(1, signal.SIGTERM)", "os.kill"),
])
def test_blocked(code, message):
    result = execute_code(code)
    assert result.status == "error" and message in result.error, result
    assert not os.path.exists("/tmp/nanochat_sandbox_escape.txt")


def test_working_directory_environment_and_cleanup(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET", "hunter2")
    result = execute_code("import os\nopen('f.txt', 'w').write('hi')\nprint(open('f.txt').read(), os.getcwd())\n"
                          "print(sorted(os.environ))")
    assert result.status == "ok" and "hunter2" not in result.stdout and "NANOCHAT_SECRET" not in result.stdout
    workdir = result.stdout.split()[1]
    assert workdir.startswith("/") and not os.path.exists(workdir)


def test_network_namespace_when_the_kernel_allows_it():
    if subprocess.run(["unshare", "--user", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("this kernel refuses unprivileged user namespaces; the audit hook alone blocks the network")
    result = execute_code("print(sorted(l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]))")
    assert result.stdout.strip() == "['lo']"  # a network namespace of its own, with only a (down) loopback


@pytest.mark.parametrize("code,message", [
    ("import sys, os\nsys.modules['__main__']._DENY = set()\nos.system('true')", "os.system"),  # hook state is private
    ("import os\nd = os.open('/tmp', os.O_RDONLY)\nos.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=d)", "directory"),
    ("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)", "pidfd"),
    ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)", "network sockets"),
    ("import gc\ngc.get_objects()", "gc.get_objects"),
])
def test_escape_attempts(code, message):
    result = execute_code(code)
    assert result.status == "error" and message in (result.error or ""), result
