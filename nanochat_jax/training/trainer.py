"""One training step and its state, shared by every training stage (base, mid, SFT, RL).

A batch: "inputs", "targets" [accum, rows, T] (target -1: ignored), RL's "weights" [accum, rows]. A micro-step's loss:
sum(weight x token loss) / the targets of the whole global micro-batch (nanochat: each rank's own mean)."""
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.model import sharding
from nanochat_jax.training.optim import set_schedule
from nanochat_jax.common import compile_timed

# bf16 dense peak per device (no sparsity), for MFU; None where it means nothing (CPU)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def peak_flops_per_device() -> float | None:
    return next((flops for name, flops in PEAK_FLOPS.items() if name in jax.devices()[0].device_kind), None)


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)


def _shard_like_params(opt_state, params, replicated):
    """The abstract opt_state with shardings: a leaf whose key path ends with a parameter's path (Adam moments, Muon
    momentum) and has its shape gets that parameter's sharding; counters and hyperparameters are replicated."""
    flat_params = {_path_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        keys = _path_keys(path)
        like = next((flat_params[keys[i:]] for i in range(len(keys)) if keys[i:] in flat_params
                     and flat_params[keys[i:]].shape == leaf.shape), None)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated if like is None else like.sharding)

    return jax.tree_util.tree_map_with_path(pick, opt_state)


@dataclass
class LoopState:
    """What the training loop carries from step to step besides the arrays (saved in each checkpoint's meta)."""
    total_time: float = 0.0  # seconds spent in training steps, the first (compiling) step left out
    min_val_bpb: float | None = None
    last_eval: dict = field(default_factory=dict)  # the latest evaluation's metrics


@dataclass
class TrainState:
    """A run at one step: params (a pure dict of fp32 arrays) and optax state on the mesh, and the loop's totals."""
    params: Any
    opt_state: Any
    step: int = 0  # optimizer steps taken
    loop: LoopState = field(default_factory=LoopState)


@dataclass
class Trainer:
    graphdef: Any
    tx: optax.GradientTransformation
    mesh: Any
    params_sharding: Any  # pure dict of NamedSharding
    opt_sharding: Any
    abstract_params: Any  # pure dict of ShapeDtypeStruct (with shardings): the restore target
    abstract_opt_state: Any
    compiled_steps: dict = field(default_factory=dict)  # batch shapes -> executables compiled ahead (compile_step)
    eval_graphdef: Any = None  # the model evaluation and sampling use (None: graphdef; differs under --fp8)

    @classmethod
    def create(cls, make_model: Callable[[], nnx.Module], tx, mesh, make_eval_model=None) -> "Trainer":
        graphdef, abstract_params = sharding.abstract_params(make_model, mesh, sharding.RULES)
        # the optimizer's moments follow OPT_STATE_RULES (split over every device), not the parameters' RULES
        _, opt_like_params = sharding.abstract_params(make_model, mesh, sharding.OPT_STATE_RULES)
        abstract_opt = _shard_like_params(jax.eval_shape(tx.init, abstract_params), opt_like_params,
                                          NamedSharding(mesh, P()))
        eval_graphdef = None if make_eval_model is None else nnx.graphdef(nnx.eval_shape(make_eval_model))
        return cls(graphdef, tx, mesh, sharding.shardings_of(abstract_params), sharding.shardings_of(abstract_opt),
                   abstract_params, abstract_opt, eval_graphdef=eval_graphdef)

    def init_state(self, make_model) -> "TrainState":  # step 0 of a new run: fresh params, created in their shards
        return self.start_from(sharding.create_sharded(make_model, self.mesh, sharding.RULES)[1])

    def start_from(self, params) -> "TrainState":  # step 0 from existing params (the stage before), a fresh optimizer
        return TrainState(params, jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params))

    def model(self, params) -> nnx.Module:  # what evaluation, sampling and the engine take; no copy
        return nnx.merge(self.eval_graphdef or self.graphdef, params)

    def batch_sharding(self) -> NamedSharding:  # [accum, rows, ...]: rows split over the mesh
        return NamedSharding(self.mesh, P(None, sharding.BATCH_AXES))

    @cached_property
    def step(self):  # jitted, the arguments as below -> (params, opt_state, metrics)
        def step(params, opt_state, batch, lr_multiplier, muon_momentum, wd_multiplier):
            def accumulate(grad_sum, micro):
                loss, grads = jax.value_and_grad(lambda p: micro_loss(nnx.merge(self.graphdef, p), micro))(params)
                return jax.tree.map(jnp.add, grad_sum, grads), loss

            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):  # kernels in shard_map (splash) see the mesh
                # lax.scan, not a Python loop: one compiled body and one set of gradient buffers whatever the count
                grads, losses = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch)
                grads = jax.tree.map(lambda g: g / losses.shape[0], grads)
                opt_state = set_schedule(opt_state, lr_multiplier, muon_momentum, wd_multiplier)  # traced: no recompile
                updates, opt_state = self.tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
                return params, opt_state, {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads),
                                           "num_tokens": jnp.sum(batch["targets"] >= 0)}

        in_shardings = (self.params_sharding, self.opt_sharding, self.batch_sharding(), None, None, None)
        return jax.jit(step, in_shardings=in_shardings,
                       out_shardings=(self.params_sharding, self.opt_sharding, None), donate_argnums=(0, 1))

    def compile_step(self, rows: int, seq_len: int, accum: int):
        """Compile ahead for [accum, rows, seq_len] global batches, kept for run_step; may raise common.DoesNotFit."""
        args = self.step_args(rows, seq_len, accum)
        compiled, seconds = compile_timed(self.step, *args)
        self.compiled_steps[_batch_key(args[2])] = compiled
        return compiled, seconds

    def step_args(self, rows: int, seq_len: int, accum: int = 1):  # the step's abstract arguments
        batch = {name: jax.ShapeDtypeStruct((accum, rows, seq_len), jnp.int32, sharding=self.batch_sharding())
                 for name in ("inputs", "targets")}
        return self.abstract_params, self.abstract_opt_state, batch, *[jax.ShapeDtypeStruct((), jnp.float32)] * 3

    def run_step(self, params, opt_state, batch, lr_multiplier, muon_momentum, wd_multiplier=1.0):
        """Trainer.step, through the executable compile_step made for this batch shape when there is one."""
        step = self.compiled_steps.get(_batch_key(batch), self.step)
        return step(params, opt_state, batch, *map(jnp.float32, (lr_multiplier, muon_momentum, wd_multiplier)))


def _batch_key(batch: dict) -> tuple:
    return tuple(sorted((name, tuple(a.shape), str(a.dtype)) for name, a in batch.items()))


def micro_loss(model, micro: dict):
    if "weights" not in micro:
        return model(micro["inputs"], micro["targets"])
    token_loss = model(micro["inputs"], micro["targets"], loss_reduction="none")
    count = jnp.maximum(jnp.sum(micro["targets"] >= 0), 1)
    return jnp.sum(token_loss * micro["weights"][:, None]) / count
