"""Several processes on this machine as the hosts of one run (2 CPU devices each): training on a global batch
assembled from process-local rows equals one process, checkpoints move between process counts, and a process that
dies ends the others with a clear message instead of a hang."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from nanochat_jax.common import PEER_LOST_EXIT_CODE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")


def launch(mode: str, directory, processes: int, devices_per_process: int, extra_env: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_", "NANOCHAT_MULTIHOST"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(extra_env or {}),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    if processes > 1:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            env |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{s.getsockname()[1]}", "JAX_NUM_PROCESSES": str(processes)}
    return [subprocess.Popen([sys.executable, WORKER, mode, str(directory)], env=env | {"JAX_PROCESS_ID": str(i)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            for i in range(processes)]


def results(procs, timeout=300) -> list[dict]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_two_processes_equal_one_and_checkpoints_move_between_them(tmp_path):
    two = results(launch("train", tmp_path / "two", processes=2, devices_per_process=2))
    one = results(launch("train", tmp_path / "one", processes=1, devices_per_process=4))[0]
    assert [r["rows"] for r in two] == [4, 4] and one["rows"] == 8  # each process fed only its own rows
    for r in two:
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert r["checksum"] == pytest.approx(one["checksum"], rel=1e-5)
    # written by two processes, restored by one; written by one, restored by two
    assert results(launch("restore", tmp_path / "two", 1, 4))[0]["checksum"] == pytest.approx(two[0]["checksum"],
                                                                                               rel=1e-6)
    for r in results(launch("restore", tmp_path / "one", 2, 2)):
        assert r["checksum"] == pytest.approx(one["checksum"], rel=1e-6)
    # a resume: every process gets the whole training state back, and its own data position
    resumed = results(launch("resume", tmp_path / "two", 2, 2))
    assert [r["position"] for r in resumed] == [{"process": 0, "rows": 4}, {"process": 1, "rows": 4}]
    assert all(r["step"] == 2 and r["checksum"] == pytest.approx(two[0]["checksum"], rel=1e-6) for r in resumed)
    (one_process,) = launch("resume", tmp_path / "two", 1, 4)  # two positions cannot be split over one process
    _, err = one_process.communicate(timeout=300)
    assert one_process.returncode != 0 and "holds the data positions of 2 processes" in err


@pytest.mark.parametrize("dies", [1, 0])  # a worker, and the coordinator
def test_a_dead_process_ends_the_others_with_a_clear_error(tmp_path, dies):
    start = time.monotonic()
    procs = launch("die-after-step", tmp_path / "dead", processes=2, devices_per_process=2,
                   extra_env={"NANOCHAT_PEER_TIMEOUT": "5", "DIE_PROCESS": str(dies)})
    survivor = procs[1 - dies]
    try:
        _, err = survivor.communicate(timeout=240)
    finally:
        for p in procs:
            p.kill()
    assert survivor.returncode == PEER_LOST_EXIT_CODE and "--resume" in err, err[-3000:]
    if dies == 1:  # the watchdog notices the silent peer and says so
        assert "process 1 has not been heard from" in err, err[-3000:]
    else:  # the coordinator's socket closes: the relay to it notices first, before JAX's client would abort
        assert "lost the coordinator, process 0" in err and "Check failure" not in err, err[-3000:]
    assert time.monotonic() - start < 240


@pytest.mark.parametrize("module", ["evals.chat", "train.rl"])
def test_single_host_entry_points_refuse_a_multi_host_launch(module):
    result = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"NANOCHAT_MULTIHOST": "1"})
    assert result.returncode != 0 and "runs on one host" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("dies", [1, 0])  # a worker, and the coordinator
def test_train_base_ends_at_once_when_a_peer_is_lost_in_a_collective(tmp_path, dies):
    """Through train.base itself: SIGKILL one of two processes mid-run. The survivor ends within seconds (not after
    JAX's shutdown barrier waits out the dead peer, then aborts) with one line, exit code 75 and the --resume
    advice: at once when its next collective fails (entry points' run_entry_point), else when the watchdog has not
    heard from the peer for NANOCHAT_PEER_TIMEOUT (10 s here). When the coordinator dies, the worker's relay to it
    sees its socket close before JAX's client can (which would abort with a C++ stack)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import make_text
    (tmp_path / "base_data").mkdir()
    for i in range(3):
        docs = [make_text(60, seed=10 * i + j) for j in range(40)]
        pq.write_table(pa.table({"text": docs}), tmp_path / "base_data" / f"shard_{i:05d}.parquet", row_group_size=8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_", "NANOCHAT_MULTIHOST"))}
    env |= {"JAX_PLATFORMS": "cpu", "NANOCHAT_BASE_DIR": str(tmp_path), "NANOCHAT_PEER_TIMEOUT": "10"}
    subprocess.run([sys.executable, "-m", "tokenizer.train", "--vocab-size", "300", "--max-chars", "50000"], cwd=REPO,
                   env=env, check=True, capture_output=True, timeout=300)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        env |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{s.getsockname()[1]}", "JAX_NUM_PROCESSES": "2",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    argv = [sys.executable, "-m", "train.base", "--depth", "1", "--max-seq-len", "32", "--device-batch-size", "1",
            "--total-batch-size", "128", "--num-iterations", "100000", "--eval-every", "-1", "--sample-every", "-1"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=env | {"JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline, line = time.monotonic() + 300, ""
        while "step 00005" not in line and time.monotonic() < deadline and procs[0].poll() is None:
            line = procs[0].stdout.readline()  # (process 0 logs the steps)
        assert "step 00005" in line, procs[0].communicate()[1][-3000:]
        procs[dies].kill()
        killed = time.monotonic()
        _, err = procs[1 - dies].communicate(timeout=120)
        ended = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    assert ended < 30, ended
    last = err.strip().splitlines()[-1]
    assert procs[1 - dies].returncode == PEER_LOST_EXIT_CODE, err[-3000:]
    assert last.startswith(f"nanochat-jax process {1 - dies} of 2: ") and "--resume" in last, err[-3000:]
    assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
    # named: the silent peer (watchdog), the coordinator (its relay), or a collective that lost its peer
    assert ("lost the coordinator" if dies == 0 else "process 1") in last or "lost a peer in a collective" in last, last
