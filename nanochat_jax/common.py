"""Small helpers shared by every stage: joining a multi-process run (and leaving it when a peer dies), the base
directory, logging on process 0, the default compute dtype."""
import atexit
import contextlib
import os
import socket
import sys
import threading
import time

import jax
import jax.numpy as jnp
from jax._src.distributed import global_state  # (not jax.process_index(): no device work from a helper thread)


def init_distributed() -> bool:
    """Join a multi-process run (True) if NANOCHAT_MULTIHOST=1 or JAX_COORDINATOR_ADDRESS is set; before device work."""
    if os.environ.get("NANOCHAT_MULTIHOST") != "1" and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    from jax._src import clusters
    count, index, ids = (os.environ.get(f"JAX_{name}") for name in ("NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICE_IDS"))
    address, count, index, ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        os.environ.get("JAX_COORDINATOR_ADDRESS"), None if count is None else int(count),
        None if index is None else int(index), None if ids is None else [int(i) for i in ids.split(",")], None, 300)
    timeout = float(os.environ.get("NANOCHAT_PEER_TIMEOUT", "60"))
    # JAX's client aborts with a C++ stack when it loses the coordinator (this jaxlib's callback for that aborts too:
    # std::bad_cast), so a worker's goes through a relay of ours: it sees the closed socket first, leaves in one line.
    client_address = address if index == 0 or address is None else _coordinator_relay(address)
    jax.distributed.initialize(client_address, count, index, ids, heartbeat_timeout_seconds=int(2 * timeout + 30),
                               coordinator_bind_address=os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")
                               or (None if address is None else "[::]:" + address.rsplit(":", 1)[1]))
    _ARMED.set()
    start_peer_watchdog(timeout)
    return True


_ARMED = threading.Event()  # set while this process is in a run (a lost coordinator is then news); cleared at exit


def _coordinator_relay(address: str) -> str:
    """A relay 127.0.0.1 -> the coordinator at `address` (returns its own address); leaves the run when that closes."""
    host, port = address.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(src, dst, from_coordinator, closed):
        with contextlib.suppress(OSError):  # a failed recv or send closes the connection like an empty recv
            while data := src.recv(1 << 16):
                dst.sendall(data)
        if from_coordinator and _ARMED.is_set() and not closed.is_set():
            _leave_run("lost the coordinator, process 0 (its connection closed)")
        closed.set()
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def accept():
        while True:
            ours, _ = listener.accept()
            try:
                theirs = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
                theirs.settimeout(None)
            except OSError:  # (not up yet: JAX's client connects again)
                ours.close()
                continue
            closed = threading.Event()
            for src, dst, side in ((ours, theirs, False), (theirs, ours, True)):
                threading.Thread(target=pump, args=(src, dst, side, closed), daemon=True,
                                 name="nanochat-coordinator-relay").start()

    threading.Thread(target=accept, daemon=True, name="nanochat-coordinator-relay").start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def single_host_only(entry_point: str):
    """Refuse a multi-process launch of a one-host entry point (N copies would all write the same results)."""
    if os.environ.get("NANOCHAT_MULTIHOST") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        raise SystemExit(f"{entry_point} runs on one host: start it on one worker (e.g. --worker=0) without "
                         "NANOCHAT_MULTIHOST / JAX_COORDINATOR_ADDRESS; it uses that host's chips")


PEER_LOST_EXIT_CODE = 75


def _leave_run(reason: str):
    print(f"nanochat-jax process {global_state.process_id} of {global_state.num_processes}: {reason}; stopping this "
          "process too. Start every process again with --resume to continue from the last checkpoint.", file=sys.stderr,
          flush=True)
    os._exit(PEER_LOST_EXIT_CODE)


def start_peer_watchdog(timeout_s: float, interval_s: float = 1.0):
    """Each process bumps its counter in the coordinator's key-value store (counters, not clocks: hosts' clocks may
    differ); a peer's counter still for timeout_s, or a store not answering, makes this process leave the run."""
    client, me, n = global_state.client, jax.process_index(), jax.process_count()
    state = {"last_ok": time.monotonic()}
    stop = threading.Event()
    seen = {p: (None, time.monotonic()) for p in range(n)}  # process -> (last counter value, when it changed)

    def beat():
        count = 0
        while not stop.is_set():
            try:
                client.key_value_set(f"nanochat_alive/{me}", str(count), allow_overwrite=True)
                values = dict(client.key_value_dir_get("nanochat_alive/"))
            except Exception as e:  # the coordinator (process 0) is gone
                _leave_run(f"lost the coordinator, process 0 ({str(e).splitlines()[0][:200]})")
            now = state["last_ok"] = time.monotonic()
            for p in range(n):
                value = values.get(f"nanochat_alive/{p}")
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > timeout_s:
                    _leave_run(f"process {p} has not been heard from for {now - seen[p][1]:.0f}s")
            count += 1
            stop.wait(interval_s)

    def guard():  # a key-value call that hangs is a lost coordinator too
        while not stop.wait(interval_s):
            if time.monotonic() - state["last_ok"] > timeout_s:
                _leave_run(f"the coordinator, process 0, has not answered for {timeout_s:.0f}s")

    threads = [threading.Thread(target=t, daemon=True, name=f"nanochat-peer-{t.__name__}") for t in (beat, guard)]
    for thread in threads:
        thread.start()

    def quit_watching():  # at exit, before JAX shuts its client down (atexit runs last-registered first): a thread
        _ARMED.clear()  # still inside a key-value call while the interpreter finalizes aborts the process; and the
        stop.set()  # coordinator closing its connections after the shutdown barrier is no news
        for thread in threads:
            thread.join(timeout=10)
    atexit.register(quit_watching)


def run_entry_point(main):
    """main() with one line for a missing input (exit 1) or Ctrl-C (130); in a multi-process run any error leaves the
    run at once with one line (a lost peer shows up as a failed collective), not in JAX's shutdown barrier."""
    name = os.path.basename(sys.argv[0]) or "nanochat-jax"
    try:
        main()
    except FileNotFoundError as e:
        raise SystemExit(f"{name}: {e}") from None
    except KeyboardInterrupt:
        print(f"\n{name}: stopped (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if global_state.client is not None:  # (unwinding would wait in JAX's shutdown barrier, then abort in C++)
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            lost = any(word in first for word in ("Gloo", "Connection reset", "Connection closed", "peer"))
            _leave_run(("lost a peer in a collective: " if lost else "") + f"{type(e).__name__}: {first}")
        raise


def get_base_dir() -> str:
    """Where data, tokenizer and checkpoints live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat_jax."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat_jax")
    try:
        os.makedirs(base_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create the base directory {base_dir}: {e.strerror} (set NANOCHAT_BASE_DIR to a "
                         "writable directory)") from None
    return base_dir


def check_writable(directory: str, what: str, probe_bytes: int = 1 << 20):
    """SystemExit with one line, before any work, when a synced probe file cannot be written to `directory`."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_probe_{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * probe_bytes)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if os.path.exists(probe):
                os.remove(probe)
    except OSError as e:
        raise SystemExit(f"cannot write {what} to {directory}: {e.strerror or e} (a read-only or full filesystem? "
                         "set NANOCHAT_BASE_DIR to a writable directory with room)") from None


def use_compilation_cache():
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(get_base_dir(), "jax_cache"))


def print0(*args, **kwargs):  # (multi-host runs would otherwise print everything N times)
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def parse_dtype(name: str | None) -> jnp.dtype:
    """'bfloat16' | 'float32' | None (the backend's default) -> a jnp dtype, with a clear error for anything else."""
    if name is None:  # bf16 compute on accelerators; fp32 on CPU, where fp32 matmuls are faster than bf16
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    dtypes = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(dtypes)}")
    return dtypes[name]


def bucket(n: int, minimum: int = 16, maximum: int | None = None, step: int | None = None) -> int:
    """The power of two at or above n in [minimum, maximum] (padded sizes share programs); above `step`: a multiple."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    if step is not None and size > step:
        size = max(minimum, -(-n // step) * step)
    return size if maximum is None else min(size, maximum)


class CompileCount:
    """The programs XLA compiles (or reads from the cache) in a with-block, and their seconds, for evals to print."""
    def __enter__(self):
        self.programs, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event: str, seconds: float, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.programs, self.seconds = self.programs + 1, self.seconds + seconds

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def __str__(self) -> str:
        return f"{self.programs} programs compiled ({self.seconds:.1f}s)"


class DoesNotFit(Exception):
    """The compiler refused the program: it needs more memory than a chip has."""


def compile_timed(jitted, *args, **kwargs):
    """(compiled executable, seconds); DoesNotFit when the compiler runs out of device memory."""
    t0 = time.time()
    try:
        return jitted.lower(*args, **kwargs).compile(), time.time() - t0
    except Exception as e:  # XlaRuntimeError; its type moved between jax versions
        if "RESOURCE_EXHAUSTED" in str(e) or "exceeds available" in str(e):
            raise DoesNotFit(str(e).split("\n")[0][:500]) from None
        raise
