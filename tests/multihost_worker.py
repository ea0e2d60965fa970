"""One process of a multi-process run on this machine, for tests/test_multihost.py (not a test itself).

    python tests/multihost_worker.py train <checkpoint dir>     # 2 steps on a fixed global batch, then a checkpoint
    python tests/multihost_worker.py restore <checkpoint dir>   # load it onto this run's mesh
    python tests/multihost_worker.py resume <checkpoint dir>    # the whole training state, this process's data position
    python tests/multihost_worker.py die-after-step <dir>       # process $DIE_PROCESS (1) kills itself after a step

Process count, id and coordinator come from JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_COORDINATOR_ADDRESS (unset:
one process). Prints one JSON line: the losses and a checksum of the parameters.
"""
import json
import os
import signal
import sys

import jax
import numpy as np
from flax import nnx

from nanochat_jax.training.checkpoint import Checkpointer
from nanochat_jax.common import init_distributed
from nanochat_jax.data.dataloader import to_global_array
from nanochat_jax.model.gpt import GPT, GPTConfig
from nanochat_jax.training.optim import build_optimizer
from nanochat_jax.model.sharding import make_mesh
from nanochat_jax.training.trainer import Trainer, TrainState

CONFIG = GPTConfig(sequence_len=16, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
GLOBAL_ROWS = 8


def local_rows(sharding, global_batch):
    """This process's part of the global batch: the rows its devices hold."""
    rows = sorted({i for idx in sharding.addressable_devices_indices_map(global_batch.shape).values()
                   for i in range(*idx[1].indices(global_batch.shape[1]))})
    return global_batch[:, rows[0]:rows[-1] + 1]


def checksum(params) -> float:
    from jax.experimental import multihost_utils
    full = multihost_utils.process_allgather(params, tiled=True)  # every process sees every shard
    return float(sum(np.abs(np.asarray(leaf, np.float64)).sum() for leaf in jax.tree.leaves(full)))


def main(mode: str, directory: str):
    init_distributed()
    make_model = lambda: GPT(CONFIG, rngs=nnx.Rngs(0))  # noqa: E731
    trainer = Trainer.create(make_model, build_optimizer(CONFIG.n_embd), make_mesh("data:2,fsdp:2"))
    checkpointer = Checkpointer(directory, async_save=False)
    if mode == "restore":
        state, _ = checkpointer.restore({"params": trainer.abstract_params})
        print(json.dumps({"checksum": checksum(state["params"])}), flush=True)
        return
    if mode == "resume":
        class Position:
            def set_state(self, state):
                self.state = state
        position = Position()
        state = checkpointer.restore_training(2, trainer.abstract_params, trainer.abstract_opt_state, position)
        print(json.dumps({"checksum": checksum(state.params), "position": position.state, "step": state.step}),
              flush=True)
        return
    state = trainer.init_state(make_model)
    params, opt_state = state.params, state.opt_state
    tokens = np.random.default_rng(0).integers(0, 100, (1, GLOBAL_ROWS, CONFIG.sequence_len + 1)).astype(np.int32)
    sharding = trainer.batch_sharding()
    batch = {"inputs": local_rows(sharding, tokens[..., :-1]), "targets": local_rows(sharding, tokens[..., 1:])}
    losses = []
    for step in range(2 if mode == "train" else 10_000):
        global_batch = {name: to_global_array(rows, sharding) for name, rows in batch.items()}
        params, opt_state, out = trainer.run_step(params, opt_state, global_batch, 1.0, 0.9)
        losses.append(float(out["loss"]))
        if mode == "die-after-step" and jax.process_index() == int(os.environ.get("DIE_PROCESS", "1")):
            print(f"process {jax.process_index()}: killing itself", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    # each process's data position is its own (here: which process it is and the rows it fed)
    checkpointer.save_training(TrainState(params, opt_state, 2), {"process": jax.process_index(),
                                                                 "rows": int(batch["inputs"].shape[1])}, {})
    checkpointer.wait()
    print(json.dumps({"losses": losses, "checksum": checksum(params), "rows": int(batch["inputs"].shape[1])}),
          flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
