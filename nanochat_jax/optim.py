"""nanochat's optimizer as an optax transformation: Muon for the matrices inside the blocks, AdamW for the embedding
and lm_head, global-norm clipping first, and the schedules as injected hyperparameters (values, not constants, so a
new learning rate or momentum never recompiles the step).

Muon (Keller Jordan's): Nesterov momentum, then the update is replaced by an approximately orthogonal matrix from five
quintic Newton-Schulz steps in bf16, scaled by sqrt(max(1, fan_out/fan_in)). Our kernels are [in, out] (torch's
weights are [out, in]), so nanochat's rows/cols are our cols/rows.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g, steps: int = 5, dtype=jnp.bfloat16):
    """Newton-Schulz iteration towards U V^T of g = U S V^T (singular values land roughly in [0.5, 1.5]).
    Runs in bf16 (fast, and accurate enough: the iteration is only approximate anyway) on the orientation whose
    Gram matrix is the smaller one."""
    a, b, c = NS_COEFFS
    x = g.astype(dtype)
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.swapaxes(-1, -2)
    x = x / (jnp.linalg.norm(x.astype(jnp.float32), axis=(-2, -1), keepdims=True) + 1e-7).astype(dtype)
    for _ in range(steps):
        gram = x @ x.swapaxes(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.swapaxes(-1, -2)
    return x


class MuonState(NamedTuple):
    momentum: optax.Updates  # the momentum buffer, fp32, shaped like the params


def muon(learning_rate, momentum=0.95, ns_steps: int = 5) -> optax.GradientTransformation:
    """Muon for 2D kernels [fan_in, fan_out]. learning_rate and momentum may be traced scalars."""

    def init(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))

    def update(grads, state, params=None):
        buf = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, state.momentum, grads)
        nesterov = jax.tree.map(lambda g, m: (1 - momentum) * g + momentum * m, grads, buf)

        def step(g):
            scale = math.sqrt(max(1.0, g.shape[-1] / g.shape[-2]))  # fan_out / fan_in
            return (-learning_rate * scale) * orthogonalize(g, ns_steps).astype(jnp.float32)

        return jax.tree.map(step, nesterov), MuonState(buf)

    return optax.GradientTransformation(init, update)


def param_label(path) -> str:
    top = path[0].key if hasattr(path[0], "key") else str(path[0])
    return {"h": "matrix", "wte": "embedding", "lm_head": "unembedding"}[top]


def build_optimizer(n_embd: int, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0,
                    grad_clip=1.0) -> optax.GradientTransformation:
    """The whole optimizer over our parameter tree (pure dict: 'wte', 'h', 'lm_head'). Its state carries two
    hyperparameters set every step: lr_multiplier (scales every group's learning rate) and muon_momentum."""
    adam_scale = (n_embd / 768) ** -0.5  # the AdamW lrs were tuned at width 768

    def make(lr_multiplier, muon_momentum):
        def adamw(lr):
            return optax.adamw(lr * adam_scale * lr_multiplier, b1=0.8, b2=0.95, eps=1e-10, weight_decay=weight_decay)

        groups = optax.partition(
            {"matrix": muon(matrix_lr * lr_multiplier, muon_momentum), "embedding": adamw(embedding_lr),
             "unembedding": adamw(unembedding_lr)},
            lambda params: jax.tree_util.tree_map_with_path(lambda path, _: param_label(path), params))
        return optax.chain(optax.clip_by_global_norm(grad_clip), groups) if grad_clip > 0 else groups

    return optax.inject_hyperparams(make)(lr_multiplier=1.0, muon_momentum=0.95)


def set_schedule(opt_state, lr_multiplier, muon_momentum):
    """A copy of opt_state with this step's schedule values (works inside jit: they are plain array leaves)."""
    hyperparams = dict(opt_state.hyperparams, lr_multiplier=jnp.asarray(lr_multiplier, jnp.float32),
                       muon_momentum=jnp.asarray(muon_momentum, jnp.float32))
    return opt_state._replace(hyperparams=hyperparams)


def lr_multiplier(step: int, num_iterations: int, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0) -> float:
    """nanochat's schedule: linear warmup (none by default), flat, then linear warmdown to final_lr_frac."""
    warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 -> 0.95 linearly over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


@dataclass(frozen=True)
class Schedule:
    """A stage's schedule: step -> (learning-rate multiplier, Muon momentum). momentum None: muon_momentum's ramp
    (pretraining and midtraining), else that constant (SFT and RL: 0.95)."""
    num_iterations: int
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    momentum: float | None = None

    def __call__(self, step: int) -> tuple[float, float]:
        lr = lr_multiplier(step, self.num_iterations, self.warmup_ratio, self.warmdown_ratio, self.final_lr_frac)
        return lr, muon_momentum(step) if self.momentum is None else self.momentum
