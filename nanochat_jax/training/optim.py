"""nanochat's optimizer as an optax transformation: Muon for the block matrices, AdamW for the embeddings, lm_head
and scalars, global-norm clipping first, the schedules as injected hyperparameters (never a recompile). MODERN_MUON
adds MuonEq, Polar Express, Muon+, NorMuon, cautious decay. Our kernels are [in, out]: nanochat's rows are our cols."""
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax.recipes import RECIPES

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025) for 5 steps, safety factor 2e-2, cushion 2: one (a, b, c) per step, as nanochat's
POLAR_EXPRESS_COEFFS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def orthogonalize(g, steps: int = 5, dtype=jnp.bfloat16, polar_express: bool = False):
    """Newton-Schulz towards U V^T of g = U S V^T (singular values land in about [0.5, 1.5]; Polar Express's, after
    dividing by 1.01 x the norm, closer to 1). In bf16 (the iteration is approximate anyway), on the smaller Gram."""
    if g.shape[-2] > g.shape[-1]:
        return orthogonalize(g.swapaxes(-1, -2), steps, dtype, polar_express).swapaxes(-1, -2)
    x = g.astype(dtype)
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=(-2, -1), keepdims=True)
    x = x / ((norm * 1.01 + 1e-6) if polar_express else (norm + 1e-7)).astype(dtype)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps] if polar_express else [NS_COEFFS] * steps:
        gram = x @ x.swapaxes(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


@dataclass(frozen=True)
class MuonVariant:
    """Which of nanochat's later Muon changes are on (all off: the classic Muon)."""
    polar_express: bool = False  # Polar Express coefficients instead of the fixed quintic
    row_equilibration: bool = False  # MuonEq: every output row scaled to the mean row norm first
    renormalize: bool = False  # Muon+: the orthogonalised update's Frobenius norm set to sqrt(min(m, n))
    normuon_beta2: float | None = None  # NorMuon: factored second moment per output row (or input column)
    cautious_weight_decay: bool = False  # decay only the weights whose update has their sign


MODERN_MUON = MuonVariant(polar_express=True, row_equilibration=True, renormalize=True, normuon_beta2=0.9,
                          cautious_weight_decay=True)
MUON_VARIANTS = {"classic": MuonVariant(), "modern": MODERN_MUON}  # by name, as recipes name them


class MuonState(NamedTuple):  # (the classic state, as checkpoints of earlier versions hold it)
    momentum: optax.Updates  # the momentum buffer, fp32, shaped like the params


class NorMuonState(NamedTuple):
    momentum: optax.Updates
    second_moment: optax.Updates  # NorMuon's factored second moment: [.., 1, out] or [.., in, 1] per kernel


def normuon_axis(shape) -> int:  # NorMuon averages over the inputs (per output), or the outputs if more inputs
    return -2 if shape[-1] >= shape[-2] else -1


def muon(learning_rate, momentum=0.95, ns_steps: int = 5, variant: MuonVariant = MuonVariant(),
         weight_decay=0.0, dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Muon (Nesterov momentum, orthogonalised, scaled by sqrt(max(1, fan_out / fan_in))) for kernels [fan_in, fan_out]
    (stacked ones [layers, fan_in, fan_out] each on its own); learning_rate, momentum, weight_decay may be traced."""

    def init(params):
        buf = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        if variant.normuon_beta2 is None:
            return MuonState(buf)
        moment = jax.tree.map(lambda p: jnp.zeros(p.shape[:-2] + (
            (1, p.shape[-1]) if normuon_axis(p.shape) == -2 else (p.shape[-2], 1)), jnp.float32), params)
        return NorMuonState(buf, moment)

    def kernel_update(g, moment, p):
        """One kernel's update (and NorMuon's new second moment; None without it) from its Nesterov gradient g."""
        lr = learning_rate * math.sqrt(max(1.0, g.shape[-1] / g.shape[-2]))  # fan_out / fan_in
        fro = lambda x: jnp.linalg.norm(x.astype(jnp.float32), axis=(-2, -1), keepdims=True)  # noqa: E731
        if variant.row_equilibration:  # nanochat's rows (our columns) to the mean row norm, in bf16 as nanochat
            x = g.astype(dtype)
            col = jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-2, keepdims=True), 1e-6)
            g = x * (fro(x) / math.sqrt(g.shape[-1]) / col).astype(x.dtype)
        u = orthogonalize(g, ns_steps, dtype, variant.polar_express).astype(jnp.float32)
        if variant.renormalize:
            u = u * (math.sqrt(min(u.shape[-2:])) / jnp.maximum(fro(u), 1e-6))
        if moment is not None:  # NorMuon: per-neuron variance normalisation that keeps the update's norm
            axis = normuon_axis(u.shape)
            v_mean = jnp.mean(u * u, axis=axis, keepdims=True)
            n = u.shape[axis]
            norm_before = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * n)
            moment = moment + (1 - variant.normuon_beta2) * (v_mean - moment)
            scale = jax.lax.rsqrt(jnp.maximum(moment, 1e-10))
            norm_after = jnp.sqrt(jnp.sum(v_mean * n * scale * scale, axis=(-2, -1), keepdims=True))
            u = u * (scale * norm_before / jnp.maximum(norm_after, 1e-10))
        if variant.cautious_weight_decay:
            return -lr * (u + weight_decay * p * ((u * p) >= 0)), moment
        return -lr * u, moment

    def update(grads, state, params=None):
        buf = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, state.momentum, grads)
        nesterov = jax.tree.map(lambda g, m: (1 - momentum) * g + momentum * m, grads, buf)
        g_leaves, treedef = jax.tree.flatten(nesterov)
        p_leaves = g_leaves if params is None else treedef.flatten_up_to(params)
        normuon = isinstance(state, NorMuonState)
        m_leaves = treedef.flatten_up_to(state.second_moment) if normuon else [None] * len(g_leaves)
        updates, moments = zip(*[kernel_update(g, m, p) for g, m, p in zip(g_leaves, m_leaves, p_leaves)])
        return treedef.unflatten(updates), NorMuonState(buf, treedef.unflatten(moments)) if normuon else MuonState(buf)

    return optax.GradientTransformation(init, update)


LABELS = {"h": "matrix", "wte": "embedding", "lm_head": "unembedding", "value_embeds": "value_embeds",
          "resid_lambdas": "resid", "x0_lambdas": "x0", "smear_gate": "smear", "smear_lambda": "smear",
          "backout_lambda": "smear"}


def param_label(path) -> str:
    return LABELS[path[0].key if hasattr(path[0], "key") else str(path[0])]


def build_optimizer(n_embd: int, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0,
                    grad_clip=1.0, recipe: str = "classic", scalar_lr=0.5, lr_scale=1.0,
                    lr_fraction=1.0, muon_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """The optimizer over our parameter tree (keyed as LABELS). lr_scale (modern batch scaling) scales every lr but the
    smear group's, lr_fraction (--init-lr-frac) all; muon_dtype: bf16 in classic nanochat, the compute dtype now."""
    width_scale = (n_embd / 768) ** -0.5  # the AdamW lrs were tuned at width 768
    flags = {"embedding_lr": embedding_lr, "unembedding_lr": unembedding_lr, "scalar_lr": scalar_lr}
    matrix_lr = matrix_lr * lr_scale * lr_fraction
    variant = MUON_VARIANTS[RECIPES[recipe].muon]

    def make(lr_multiplier, muon_momentum, wd_multiplier=None):
        def adamw(g):
            lr = flags[g.lr_flag] * lr_scale * g.lr if g.lr_flag else g.lr
            lr = lr * (width_scale if g.width_scaled else 1.0) * lr_fraction * lr_multiplier
            decay = weight_decay if g.weight_decay is None else g.weight_decay
            return optax.adamw(lr, b1=g.betas[0], b2=g.betas[1], eps=1e-10, weight_decay=decay)

        muon_wd = weight_decay * wd_multiplier if wd_multiplier is not None else 0.0
        transforms = {"matrix": muon(matrix_lr * lr_multiplier, muon_momentum, variant=variant, weight_decay=muon_wd,
                                     dtype=muon_dtype)} | {name: adamw(g) for name, g in RECIPES[recipe].adam.items()}
        partitioned = optax.partition(
            transforms, lambda params: jax.tree_util.tree_map_with_path(lambda path, _: param_label(path), params))
        return optax.chain(optax.clip_by_global_norm(grad_clip), partitioned) if grad_clip > 0 else partitioned

    modern = {"wd_multiplier": 1.0} if recipe == "modern" else {}
    return optax.inject_hyperparams(make)(lr_multiplier=1.0, muon_momentum=0.95, **modern)


REFERENCE_BATCH = 2 ** 19  # nanochat's measured best batch (tokens) for d12 at its horizon


def auto_batch(scaling_params: int, d12_scaling_params: int, target_param_data_ratio: float,
               weight_decay: float, batch: int | None = None) -> tuple[int, float, float]:
    """nanochat's modern sizing: (tokens per step, lr scale, Muon weight decay). The batch (unless given) grows as the
    horizon D^0.383 from 2^19 at d12 (the Power Lines fit); the decay keeps its timescale (x D_d12 / D)."""
    tokens, d12_tokens = target_param_data_ratio * scaling_params, target_param_data_ratio * d12_scaling_params
    if batch is None:
        batch = 2 ** round(math.log2(REFERENCE_BATCH * (tokens / d12_tokens) ** 0.383))
    scale = math.sqrt(batch / REFERENCE_BATCH)
    return batch, scale, weight_decay * scale * d12_tokens / tokens


def set_schedule(opt_state, lr_multiplier, muon_momentum, wd_multiplier=1.0):
    """A copy of opt_state with this step's schedule values (works inside jit: they are plain array leaves)."""
    values = {"lr_multiplier": lr_multiplier, "muon_momentum": muon_momentum, "wd_multiplier": wd_multiplier}
    return opt_state._replace(hyperparams={k: jnp.asarray(values[k], jnp.float32) for k in opt_state.hyperparams})


def lr_multiplier(step: int, num_iterations: int, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0) -> float:
    warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:  # 0.85 -> 0.95 over the first 300 steps
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def modern_muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:  # nanochat's current ramp
    warmdown = round(warmdown_ratio * num_iterations)
    if step < 400:
        return (1 - step / 400) * 0.85 + step / 400 * 0.97
    if step >= num_iterations - warmdown:
        progress = (step - (num_iterations - warmdown)) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


@dataclass(frozen=True)
class Schedule:
    """step -> (lr multiplier, Muon momentum, Muon weight-decay multiplier); momentum: a constant instead of a ramp."""
    num_iterations: int
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    momentum: float | None = None
    warmup_steps: int = 0
    modern: bool = False

    def __call__(self, step: int) -> tuple[float, float, float]:
        n = self.num_iterations
        lr = lr_multiplier(step, n, self.warmup_steps / n, self.warmdown_ratio, self.final_lr_frac)
        momentum = modern_muon_momentum(step, n, self.warmdown_ratio) if self.modern else muon_momentum(step)
        momentum = momentum if self.momentum is None else self.momentum
        return lr, momentum, 0.5 * (1 + math.cos(math.pi * step / n)) if self.modern else 1.0
