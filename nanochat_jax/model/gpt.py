"""The nanochat GPT in Flax NNX: the classic architecture (nanochat of December 2025) and, switched on by GPTConfig
fields, the modern one (nanochat's time-to-GPT-2 recipe). With every switch off the model is the classic one. The
config names its recipe (nanochat_jax/recipes.py), which decides the init and the RoPE tables' dtype; the switches
decide the architecture.

Classic: token embedding -> RMSNorm -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> RMSNorm -> lm_head -> drop vocab
padding -> fp32 -> 15*tanh(x/15). Attention: q/k/v/proj without biases, RoPE (base 10000, split halves) then RMS
QK-norm, causal, n_kv_head dividing n_head. MLP: 4x width, relu^2. No biases, no learnable norm weights, untied head.

The modern switches (`modern_config` sets them all, and the modern recipe):
- rope_base 100000; qk_scale 1.2 (q and k times 1.2 after the QK-norm);
- window_pattern, e.g. "SSSL" tiled over the layers: S layers see the last ceil(seq/4/128)*128 positions (and
  themselves), L layers the whole sequence; the last layer is always L;
- value_embeds: layers i with i % 2 == (n_layer-1) % 2 (the last always) add to v a per-layer embedding of the
  input tokens, gated per kv head by 3*sigmoid(x[..., :12] @ ve_gate);
- residual_scalars: before block i, x = resid_lambdas[i]*x + x0_lambdas[i]*x0 (x0: the normed embedding after smear);
- smear: x[t] += smear_lambda * sigmoid(x[t, :24] @ smear_gate) * x[t-1] on the normed embedding;
- backout: the residual after block n_layer//2, times backout_lambda, is subtracted before the final norm.

Parameters are fp32 and carry logical axis names (`axes=`) that nanochat_jax.model.sharding maps onto a mesh.
Weights are stored [in, out] (JAX's convention; torch's nn.Linear stores [out, in]).

The blocks' parameters are stacked on a leading 'layers' axis (model.h.attn.c_q.kernel is [n_layer, in, out]) and the
trunk is a lax.scan over them: one compiled block whatever the depth, so compile time stays flat. `remat` picks what
the backward pass keeps of each block (REMAT_POLICIES): 'none' (the matmul and attention outputs, in the compute
dtype; the elementwise rest is recomputed), 'dots' (the matmul outputs; attention is recomputed too) or 'full' (only
the block's input; the whole block is recomputed), trading compute for memory.
"""
import math
from functools import partial
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nanochat_jax.model.attention import attention, xla_attention
from nanochat_jax.model.fp8 import fp8_eligible, fp8_matmul
from nanochat_jax.model.sharding import shard_rows
from nanochat_jax.recipes import MODERN_SWITCHES
from nanochat_jax.recipes import recipe as get_recipe

SOFTCAP = 15.0
ROPE_BASE = 10000.0
PAD_VOCAB_TO = 64
LOSS_CHUNK = 256  # sequence positions whose logits are materialised at once by the training loss
# What the backward pass keeps of each block (every policy gives the same numbers; they differ in memory and in
# what is computed twice). The values are named where they are made (checkpoint_name); everything else, the cheap
# elementwise work of the norms, RoPE, relu^2 and the residual adds, is recomputed in the backward pass from these,
# so nothing is kept in fp32 or twice, and no mask of the MLP's width is stored.
MATMUL_OUTPUTS = ("q_proj", "k_proj", "v_proj", "attn_proj", "mlp_fc")  # (the MLP's output projection is not needed)
ATTENTION_OUTPUTS = ("attn_out", "attn_probs")  # the XLA path's output and softmax (fp32 [T, S])
# flash attention's residuals (cuDNN's output and softmax statistics; splash's): kept, else its forward runs again
# (its output is not named as well: a second copy of it, in another layout, would be kept beside the kernel's)
ATTENTION_KERNELS = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd", "pallas_call")


def _attention_kernel_outputs(prim, *_, **__) -> bool:
    return prim.name in ATTENTION_KERNELS


_policies = jax.checkpoint_policies
REMAT_POLICIES = {  # none: the matmuls and attention kept; dots: attention recomputed too; full: the whole block
    "none": _policies.save_from_both_policies(_policies.save_only_these_names(*MATMUL_OUTPUTS, *ATTENTION_OUTPUTS),
                                              _attention_kernel_outputs),
    "dots": _policies.save_only_these_names(*MATMUL_OUTPUTS),
    "full": _policies.nothing_saveable}


VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many channels of the block input
SMEAR_CHANNELS = 24  # the smear gate reads this many channels of the embedding


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (MQA when 1, MHA when n_head)
    n_embd: int = 768
    recipe: str = "classic"  # by name (recipes.RECIPES): the init and RoPE tables; training's optimizer and schedule
    # the modern recipe's switches (the defaults are the classic model; any of them can be set in either recipe)
    rope_base: float = ROPE_BASE
    qk_scale: float = 1.0
    window_pattern: str | None = None  # None: every layer sees the whole context (the classic model)
    value_embeds: bool = False
    residual_scalars: bool = False
    smear: bool = False
    backout: bool = False

    def __post_init__(self):
        get_recipe(self.recipe)  # (a known name, or ValueError)
        if self.window_pattern is not None and (not self.window_pattern or set(self.window_pattern.upper()) - set("SL")):
            raise ValueError(f"window_pattern {self.window_pattern!r}: use the letters S (short) and L (long)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def window_sizes(self) -> list[int | None]:
        """Per layer, how many earlier positions a query sees besides its own (nanochat's left window): the sequence
        length for L layers, ceil(sequence_len/4 / 128)*128 for S; the last layer is always L. None (no limit) in
        every layer without a window_pattern."""
        if self.window_pattern is None:
            return [None] * self.n_layer
        short = -(-self.sequence_len // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [short if pattern[i % len(pattern)] == "S" else self.sequence_len for i in range(self.n_layer)]
        return sizes[:-1] + [self.sequence_len] if sizes else sizes

    def ve_layers(self) -> list[int]:
        """The layers with a value embedding (none unless value_embeds)."""
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2] if self.value_embeds else []

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO

    def param_counts(self) -> dict[str, int]:
        """Parameters by group as nanochat counts them, padded vocab rows included (the layers without a value
        embedding hold a zero ve_gate here that nanochat does not have; it is not counted)."""
        C, D, K, Vp = self.n_embd, self.head_dim, self.n_kv_head, self.padded_vocab_size
        attn = C * self.n_head * D + 2 * C * K * D + self.n_head * D * C
        n_ve = len(self.ve_layers())
        return {"wte": Vp * C, "value_embeds": n_ve * Vp * K * D, "lm_head": Vp * C,
                "transformer_matrices": self.n_layer * (attn + 8 * C * C) + n_ve * VE_GATE_CHANNELS * K,
                "scalars": (2 * self.n_layer if self.residual_scalars else 0) + (SMEAR_CHANNELS + 1) * self.smear
                + self.backout}

    def num_params(self) -> int:
        return sum(self.param_counts().values())

    def scaling_params(self) -> int:
        """The parameters nanochat's modern recipe sizes its horizon and batch by: block matrices and lm_head."""
        counts = self.param_counts()
        return counts["transformer_matrices"] + counts["lm_head"]

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x matmul params (all but the embeddings and scalars) + 12 H Dh min(window, T)
        per layer for attention (PaLM appendix B)."""
        counts = self.param_counts()
        matmul = counts["transformer_matrices"] + counts["lm_head"] + SMEAR_CHANNELS * self.smear
        attn = sum(12 * self.n_head * self.head_dim * min(w or self.sequence_len, self.sequence_len)
                   for w in self.window_sizes())
        return 6 * matmul + attn


def config_from_meta(saved: dict) -> GPTConfig:
    """A config as a checkpoint's meta records it. Checkpoints written before the recipe was recorded by name were
    the modern recipe's exactly when some modern switch was on (the rule of that time, kept for them alone)."""
    if "recipe" not in saved:
        modern = any(saved.get(k, getattr(GPTConfig, k)) != getattr(GPTConfig, k) for k in MODERN_SWITCHES)
        saved = dict(saved, recipe="modern" if modern else "classic")
    return GPTConfig(**saved)


def config_from_depth(depth: int, vocab_size: int, sequence_len: int = 2048, n_kv_head: int | None = None,
                      recipe: str = "classic") -> GPTConfig:
    """nanochat's sizing: width 64 x depth, MHA unless told otherwise; the recipe's switches on. classic: head dim
    about 128 (ceil division of the heads); modern: the width rounded up to a multiple of 128, head dim exactly 128."""
    chosen = get_recipe(recipe)
    n_embd = -(-64 * depth // chosen.width_multiple) * chosen.width_multiple
    n_head = max(1, (n_embd + 127) // 128)
    if depth < 1 or n_embd % n_head:
        raise ValueError(f"depth {depth} gives width {n_embd}, which does not split into {n_head} equal heads of about "
                         "128: use an even depth (or 1, 3, 7, 15, 31)")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=n_embd, recipe=recipe, **chosen.switches)


def modern_config(config: GPTConfig, **overrides) -> GPTConfig:
    """`config` as the modern recipe's: every modern switch on (then `overrides`)."""
    return replace(config, **(MODERN_SWITCHES | {"recipe": "modern"} | overrides))


def rms_norm(x):
    """Parameter-free RMSNorm, computed in fp32; eps as torch's F.rms_norm default (fp32 machine epsilon)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.finfo(jnp.float32).eps)
    return y.astype(x.dtype)


def rope_tables(positions_BT, head_dim: int, base: float = ROPE_BASE, dtype=jnp.bfloat16):
    """cos, sin [B, T, head_dim/2] for the given positions, rounded through `dtype` as nanochat stores them (classic:
    always bf16; modern: the compute dtype), so imported weights see the very same rotations."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
    """Rotate the two halves of each head: (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos), nanochat's sign."""
    half = x_BTNH.shape[-1] // 2
    x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
    cos, sin = cos_BTh[:, :, None, :].astype(x_BTNH.dtype), sin_BTh[:, :, None, :].astype(x_BTNH.dtype)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def uniform(low: float, high: float):
    """An init function (key, shape) -> fp32 array, uniform in [low, high)."""
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, low, high)


class Linear(nnx.Module):
    """Bias-free linear layer, kernel [in, out] ([layers, in, out] when `layers` are stacked). Classic init:
    N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))) or zeros (output projections and lm_head start at zero);
    `init` (key, shape) -> array overrides it (the modern recipe's)."""

    def __init__(self, fan_in: int, fan_out: int, axes: tuple, *, rngs: nnx.Rngs, zero_init: bool = False,
                 layers: int | None = None, init=None, fp8: bool = False):
        self.fp8 = fp8 and fp8_eligible(fan_in, fan_out)  # FP8 matmuls (nanochat_jax.model.fp8) where nanochat uses them
        shape, axes = ((fan_in, fan_out), axes) if layers is None else ((layers, fan_in, fan_out), ("layers",) + axes)
        if zero_init:
            kernel = jnp.zeros(shape, jnp.float32)
        elif init is not None:
            kernel = init(rngs.params(), shape)
        else:
            std = fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))
            kernel = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        self.kernel = nnx.Param(kernel, axes=axes)

    def __call__(self, x):
        if self.fp8:
            return fp8_matmul(x, self.kernel[...].astype(x.dtype))
        return x @ self.kernel[...].astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, attn_impl: str | None = None, layers: int | None = None,
                 fp8: bool = False):
        C, D = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, D
        self.attn_impl, self.qk_scale = attn_impl, config.qk_scale
        # the distinct left windows, static: (None,) without a window pattern
        self.windows = (tuple(sorted(set(config.window_sizes()))) if config.window_pattern else ()) or (None,)
        s = math.sqrt(3.0 / C)  # the modern init: uniform with the classic std
        init = uniform(-s, s) if get_recipe(config.recipe).uniform_init else None
        self.c_q = Linear(C, config.n_head * D, ("embed", "heads"), rngs=rngs, layers=layers, init=init, fp8=fp8)
        self.c_k = Linear(C, config.n_kv_head * D, ("embed", "kv_heads"), rngs=rngs, layers=layers, init=init, fp8=fp8)
        self.c_v = Linear(C, config.n_kv_head * D, ("embed", "kv_heads"), rngs=rngs, layers=layers, init=init, fp8=fp8)
        self.c_proj = Linear(config.n_head * D, C, ("heads", "embed"), rngs=rngs, zero_init=True, layers=layers, fp8=fp8)
        if config.value_embeds:  # (zeroed afterwards in the layers without a value embedding: see GPT)
            self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head, (None, "kv_heads"), rngs=rngs, layers=layers,
                                  init=uniform(0.0, 0.02))

    def __call__(self, x_BTC, cos, sin, kv=None, pos_B=None, attend_len=None, ve_BTE=None, window=None):
        """kv: None (training) or (k, v, layer): the whole cache, each [L, B, K, S, D], and this layer's index; the
        new keys/values are written at [layer, b, :, pos_B[b] .. pos_B[b]+T-1] and the updated cache is returned
        alongside the output. attend_len (static): the queries attend to the cache's first attend_len positions only
        (the caller keeps pos_B + T <= attend_len), so a decode step reads the filled part of the cache.
        ve_BTE: this layer's value embedding of the tokens (zeros in a layer without one); window: this layer's
        left window (a traced scalar, one of self.windows), None for full causal attention."""
        B, T, _ = x_BTC.shape
        q = checkpoint_name(self.c_q(x_BTC), "q_proj").reshape(B, T, self.n_head, self.head_dim)
        k = checkpoint_name(self.c_k(x_BTC), "k_proj").reshape(B, T, self.n_kv_head, self.head_dim)
        v = checkpoint_name(self.c_v(x_BTC), "v_proj").reshape(B, T, self.n_kv_head, self.head_dim)
        if ve_BTE is not None:  # value residual: gate in (0, 3) per kv head
            gate_BTK = 3 * jax.nn.sigmoid(self.ve_gate(x_BTC[..., :VE_GATE_CHANNELS]))
            v = v + gate_BTK[..., None] * ve_BTE.reshape(v.shape).astype(v.dtype)
        q, k = rms_norm(apply_rope(q, cos, sin)), rms_norm(apply_rope(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        if kv is not None:
            # a scatter of the T new positions into the cache the layer scan carries: XLA updates it in place, so a
            # step writes B x T positions, not a new copy of the whole cache (as a scan's stacked outputs would be)
            k_all, v_all, layer = kv
            rows_B1, cols_BT = jnp.arange(B)[:, None], pos_B[:, None] + jnp.arange(T)[None, :]
            k_all = k_all.at[layer, rows_B1, :, cols_BT].set(k.astype(k_all.dtype))  # (indexed dims first: [B,T,K,D])
            v_all = v_all.at[layer, rows_B1, :, cols_BT].set(v.astype(v_all.dtype))
            kv = (k_all, v_all)
            S = k_all.shape[3] if attend_len is None else attend_len
            k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)[:, :, :S]
            v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)[:, :, :S]
            y = xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), pos_B, heads_first=True,  # (per-row offsets)
                              window=None if self.windows == (None,) else window)
        elif window is None or len(self.windows) == 1:
            y = attention(q, k, v, impl=self.attn_impl, window=self._static(self.windows[0], T))
        else:  # layers differ in window: one branch per distinct window, each with its window static
            branches = [partial(attention, impl=self.attn_impl, window=self._static(w, T)) for w in self.windows]
            y = jax.lax.switch(jnp.searchsorted(jnp.asarray(self.windows), window), branches, q, k, v)
        return checkpoint_name(self.c_proj(y.reshape(B, T, -1)), "attn_proj"), kv

    @staticmethod
    def _static(window: int, T: int):
        return None if window is None or window >= T - 1 else window  # one that covers the sequence: plain causal


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, layers: int | None = None, fp8: bool = False):
        C = config.n_embd
        s = 0.4 * math.sqrt(3.0 / C)  # the modern init: 0.4 x the attention's
        self.c_fc = Linear(C, 4 * C, ("embed", "mlp"), rngs=rngs, layers=layers,
                           init=uniform(-s, s) if get_recipe(config.recipe).uniform_init else None, fp8=fp8)
        self.c_proj = Linear(4 * C, C, ("mlp", "embed"), rngs=rngs, zero_init=True, layers=layers, fp8=fp8)

    def __call__(self, x_BTC):
        return self.c_proj(jnp.square(jax.nn.relu(checkpoint_name(self.c_fc(x_BTC), "mlp_fc"))))


class Block(nnx.Module):
    """One transformer block; with `layers`, the parameters of that many blocks stacked on a leading axis (call it on
    one layer's slice of its state, as GPT's scan does)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, attn_impl: str | None = None, layers: int | None = None,
                 fp8: bool = False):
        self.attn = CausalSelfAttention(config, rngs=rngs, attn_impl=attn_impl, layers=layers, fp8=fp8)
        self.mlp = MLP(config, rngs=rngs, layers=layers, fp8=fp8)

    def __call__(self, x, cos, sin, kv=None, pos_B=None, attend_len=None, ve=None, window=None):
        y, kv = self.attn(rms_norm(x), cos, sin, kv, pos_B, attend_len, ve, window)
        x = x + y
        return x + self.mlp(rms_norm(x)), kv


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attn_impl: str | None = None,
                 remat: str = "none", fp8: bool = False):
        """dtype: compute dtype (bf16 on GPU/TPU, fp32 on CPU); parameters are always fp32.
        attn_impl: None picks by backend, or 'xla' / 'cudnn' / 'splash' (see nanochat_jax.model.attention).
        remat: what the backward pass keeps of each block, one of REMAT_POLICIES.
        fp8: FP8 matmuls in the layers nanochat converts (projections, MLP, lm_head; see nanochat_jax.model.fp8)."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.config, self.dtype, self.remat = config, dtype, remat
        Vp, C, L, modern = config.padded_vocab_size, config.n_embd, config.n_layer, get_recipe(config.recipe).uniform_init
        wte = jax.random.normal(rngs.params(), (Vp, C), jnp.float32)
        self.wte = nnx.Param(0.8 * wte if modern else wte, axes=("vocab", "embed"))
        self.h = Block(config, rngs=rngs, attn_impl=attn_impl, layers=L, fp8=fp8)
        if modern:  # nanochat's current init: a small random head instead of zeros
            self.lm_head = Linear(C, Vp, ("embed", "vocab"), rngs=rngs, fp8=fp8,
                                  init=lambda key, shape: 0.001 * jax.random.normal(key, shape, jnp.float32))
        else:
            self.lm_head = Linear(C, Vp, ("embed", "vocab"), rngs=rngs, zero_init=True, fp8=fp8)
        ve_layers = config.ve_layers()
        if ve_layers:
            s = math.sqrt(3.0 / C)
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nnx.Param(uniform(-s, s)(rngs.params(), (len(ve_layers), Vp, kv_dim)),
                                          axes=(None, "vocab", "embed"))
            has_ve = jnp.asarray([i in ve_layers for i in range(L)], jnp.float32)
            self.h.attn.ve_gate.kernel[...] = self.h.attn.ve_gate.kernel[...] * has_ve[:, None, None]
        if config.residual_scalars:
            frac = jnp.arange(L, dtype=jnp.float32) / max(L - 1, 1)
            self.resid_lambdas = nnx.Param(1.15 - 0.10 * frac, axes=("layers",))
            self.x0_lambdas = nnx.Param(0.20 - 0.15 * frac, axes=("layers",))
        if config.smear:
            self.smear_gate = Linear(SMEAR_CHANNELS, 1, (None, None), rngs=rngs, init=uniform(0.0, 0.02))
            self.smear_lambda = nnx.Param(jnp.zeros((1,), jnp.float32), axes=(None,))
        if config.backout:
            self.backout_lambda = nnx.Param(jnp.full((1,), 0.2, jnp.float32), axes=(None,))

    def _per_layer(self) -> dict:
        """What the layer scan reads besides the block parameters, one entry per layer (only the switches on)."""
        c, L = self.config, self.config.n_layer
        out = {"layer": jnp.arange(L, dtype=jnp.int32)}
        if c.window_pattern:
            out["window"] = jnp.asarray(c.window_sizes(), jnp.int32)
        if c.residual_scalars:
            out["resid"], out["x0"] = self.resid_lambdas[...], self.x0_lambdas[...]
        if c.value_embeds:
            ve_layers = c.ve_layers()
            out["ve_index"] = jnp.asarray([ve_layers.index(i) if i in ve_layers else 0 for i in range(L)], jnp.int32)
            out["has_ve"] = jnp.asarray([i in ve_layers for i in range(L)], self.dtype)
        return out

    def _smear(self, x_BTC, prev_BTC, has_prev_BT):
        """x[t] + smear_lambda * sigmoid(smear_gate(x[t, :24])) * prev[t] where t has a previous token."""
        gate_BT1 = self.smear_lambda[...].astype(x_BTC.dtype) * jax.nn.sigmoid(
            self.smear_gate(x_BTC[..., :SMEAR_CHANNELS]))
        return x_BTC + jnp.where(has_prev_BT[..., None], gate_BT1 * prev_BTC, 0).astype(x_BTC.dtype)

    def _embed(self, idx_BT):
        return rms_norm(jnp.take(self.wte[...], idx_BT, axis=0).astype(self.dtype))

    def _trunk(self, idx_BT, positions_BT, cache=None, pos_B=None, attend_len=None):
        c = self.config
        cos, sin = rope_tables(positions_BT, c.head_dim, c.rope_base,
                               jnp.bfloat16 if get_recipe(c.recipe).bf16_rope else self.dtype)
        x = shard_rows(self._embed(idx_BT))
        if c.smear:
            if cache is None:  # the previous position's embedding, from the same rows
                prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
            else:  # the token before each row's first new one is in the cache's token record
                tokens = cache["tokens"]
                first_prev = tokens[0, jnp.arange(idx_BT.shape[0]), jnp.maximum(pos_B - 1, 0)]
                prev = self._embed(jnp.concatenate([first_prev[:, None], idx_BT[:, :-1]], axis=1))
                cols_BT = pos_B[:, None] + jnp.arange(idx_BT.shape[1])[None, :]
                cache = dict(cache, tokens=tokens.at[0, jnp.arange(idx_BT.shape[0])[:, None], cols_BT].set(idx_BT))
            x = self._smear(x, prev, positions_BT > 0)
        x0 = x
        block_def, stacked = nnx.split(self.h)
        per_layer = self._per_layer()
        mid = c.n_layer // 2

        def run_block(x, params, extra, kv=None):
            """One layer: the residual scalars, its value embedding, the block; -> (x, kv)."""
            if c.residual_scalars:
                x = extra["resid"].astype(x.dtype) * x + extra["x0"].astype(x.dtype) * x0
            ve = None
            if c.ve_layers():  # one gather from the stacked tables (zeros in layers without one)
                ve = self.value_embeds[...][extra["ve_index"], idx_BT].astype(x.dtype) * extra["has_ve"]
            return nnx.merge(block_def, params)(x, cos, sin, kv, pos_B, attend_len, ve, extra.get("window"))

        def backed_out(x_mid, extra, x_new):  # the residual after the middle block, carried to the end
            return jnp.where(extra["layer"] == mid, x_new, x_mid) if c.backout else x_mid

        if cache is not None and c.n_layer == 0:  # (a layerless probe of the compiler's cost model)
            return x, cache

        def layer(carry, xs):  # one block on its slice of the stacked parameters; the cache (if any) in the carry
            x, x_mid, kv = carry
            params, extra = xs
            x, kv = run_block(x, params, extra, None if kv is None else (*kv, extra["layer"]))
            return (shard_rows(x), backed_out(x_mid, extra, x), kv), None

        if cache is None:  # training: what the backward pass keeps of each block
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        carry = (x, jnp.zeros_like(x) if c.backout else None, None if cache is None else (cache["k"], cache["v"]))
        (x, x_mid, kv), _ = jax.lax.scan(layer, carry, (stacked, per_layer))
        if cache is not None:  # each layer wrote its part of the whole cache
            cache = dict(cache, k=kv[0], v=kv[1])
        if c.backout:
            x = x - self.backout_lambda[...].astype(x.dtype) * x_mid
        return x, cache

    def _head(self, x):
        logits = shard_rows(self.lm_head(rms_norm(x))[..., : self.config.vocab_size].astype(jnp.float32))
        return SOFTCAP * jnp.tanh(logits / SOFTCAP)

    def __call__(self, idx_BT, targets_BT=None, loss_reduction: str = "mean"):
        """Logits [B, T, vocab_size] in fp32, or with targets the cross-entropy (targets of -1 ignored):
        loss_reduction 'mean' (over the counted tokens) or 'none' (per token [B, T], 0 where ignored)."""
        B, T = idx_BT.shape
        x, _ = self._trunk(idx_BT, jnp.broadcast_to(jnp.arange(T), (B, T)))
        if targets_BT is None:
            return self._head(x)
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
        loss_BT = self._chunked_token_loss(x, targets_BT)
        if loss_reduction == "none":
            return loss_BT
        return loss_BT.sum() / jnp.maximum(jnp.sum(targets_BT != -1), 1)

    def _chunked_token_loss(self, x_BTC, targets_BT):
        """Per-token cross-entropy [B, T], the head and loss run LOSS_CHUNK positions at a time and recomputed in
        the backward pass: only one chunk's fp32 logits [B, chunk, vocab] is ever in memory (the whole sequence's
        would be 4.3 GB for 8 rows of 2048 at vocab 65,536), for one more head matmul per step."""
        B, T, C = x_BTC.shape
        chunk = next(c for c in range(min(LOSS_CHUNK, T), 0, -1) if T % c == 0)
        x_NBcC = x_BTC.reshape(B, T // chunk, chunk, C).swapaxes(0, 1)
        t_NBc = targets_BT.reshape(B, T // chunk, chunk).swapaxes(0, 1)
        one_chunk = jax.checkpoint(lambda xt: cross_entropy(self._head(xt[0]), xt[1], "none"))
        return jax.lax.map(one_chunk, (x_NBcC, t_NBc)).swapaxes(0, 1).reshape(B, T)

    def logits_at(self, idx_BT, at_B):
        """The logits [B, vocab_size] at one position per row (the head runs on those positions only)."""
        B, T = idx_BT.shape
        x, _ = self._trunk(idx_BT, jnp.broadcast_to(jnp.arange(T), (B, T)))
        return self._head(x[jnp.arange(B), at_B])

    def forward_cached(self, idx_BT, cache, pos_B, attend_len: int | None = None):
        """Run T new tokens per row starting at positions pos_B [B] against a KV cache
        (init_cache's); returns (logits [B, T, vocab], updated cache).
        The caller keeps pos_B + T <= max_len (and <= attend_len: attention reads that many positions, default all)."""
        T = idx_BT.shape[1]
        positions = pos_B[:, None] + jnp.arange(T)[None, :]
        x, cache = self._trunk(idx_BT, positions, cache, pos_B, attend_len)
        return self._head(x), cache


def init_cache(config: GPTConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    """{'k', 'v'}: [n_layer, batch, n_kv_head, max_len, head_dim] each. Heads before positions: a decode step's
    attention is then a batched matrix-vector product over the cache as it lies (with positions before heads, XLA
    transposes every layer's slice first, which doubled the attention time of a CPU decode step at batch 8).
    With smear, also 'tokens' [1, batch, max_len]: the token at each position (smear reads the one before a row's
    next token); every entry has the rows on axis 1."""
    shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if config.smear:
        cache["tokens"] = jnp.zeros((1, batch_size, max_len), jnp.int32)
    return cache


def cross_entropy(logits_BTV, targets_BT, reduction: str = "mean"):
    if reduction not in ("mean", "none"):
        raise ValueError(f"loss_reduction must be 'mean' or 'none', got {reduction!r}")
    valid = targets_BT != -1
    safe_targets = jnp.where(valid, targets_BT, 0)
    logz = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BTV, safe_targets[..., None], axis=-1)[..., 0]
    loss_BT = jnp.where(valid, logz - target_logit, 0.0)
    if reduction == "none":
        return loss_BT
    return loss_BT.sum() / jnp.maximum(valid.sum(), 1)
