"""init_distributed: two processes on this machine join one JAX runtime through the JAX_* variables (what
NANOCHAT_MULTIHOST=1 relies on across hosts), and nothing happens without them."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("from nanochat_jax.common import init_distributed; import jax; joined = init_distributed(); "
         "print(joined, jax.process_count(), jax.process_index(), jax.device_count(), jax.local_device_count())")


def run_probe(extra_env: dict, count: int = 1) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_", "NANOCHAT_MULTIHOST"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=env | extra_env | {"JAX_PROCESS_ID": str(i)}
                              if count > 1 else env | extra_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for i in range(count)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip())
    return outs


def test_two_processes_join_one_runtime():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    outs = run_probe({"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}, count=2)
    assert sorted(outs) == ["True 2 0 2 1", "True 2 1 2 1"]


def test_single_process_needs_nothing():
    assert run_probe({}) == ["False 1 0 1 1"]
