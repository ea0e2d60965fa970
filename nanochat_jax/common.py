"""Small helpers shared by every stage: the base directory, logging on process 0, the default compute dtype."""
import os

import jax
import jax.numpy as jnp


def init_distributed() -> bool:
    """Join a multi-process run (the hosts of a TPU slice, or GPU nodes) when NANOCHAT_MULTIHOST=1 or
    JAX_COORDINATOR_ADDRESS is set; returns whether it did. jax.distributed.initialize() then finds the coordinator,
    process count and id from the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes), or from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. Call it first, before anything touches a device. One process on one host
    needs none of it."""
    if os.environ.get("NANOCHAT_MULTIHOST") != "1" and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=None if count is None else int(count),
                               process_id=None if index is None else int(index))
    return True


def get_base_dir() -> str:
    """Where data, tokenizer and checkpoints live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat_jax."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat_jax")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def print0(*args, **kwargs):
    """print on the first process only (multi-host runs would otherwise print everything N times)."""
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def default_dtype() -> jnp.dtype:
    """bf16 compute on accelerators; fp32 on CPU, where fp32 matmuls are faster than bf16."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def parse_dtype(name: str | None) -> jnp.dtype:
    """'bfloat16' | 'float32' | None (backend default) -> a jnp dtype, with a clear error for anything else."""
    if name is None:
        return default_dtype()
    dtypes = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(dtypes)}")
    return dtypes[name]
