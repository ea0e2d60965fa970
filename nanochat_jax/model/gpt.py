"""The nanochat GPT in Flax NNX: the classic architecture (nanochat of December 2025) and, switched on by GPTConfig
fields, the modern one (its time-to-GPT-2 recipe); the config's recipe (recipes.py) decides the init and RoPE dtype.

Classic: token embedding -> RMSNorm -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> RMSNorm -> lm_head -> drop vocab
padding -> fp32 -> 15*tanh(x/15). Attention: RoPE (base 10000, split halves), RMS QK-norm, causal, GQA. MLP: 4x width,
relu^2. No biases, no norm weights, untied head. The modern switches (`modern_config` sets them all; README.md) act
where their fields are read. Parameters are fp32, [in, out] (torch's: [out, in]), with logical axis names (`axes=`)
for sharding.py; the blocks' are stacked on a leading 'layers' axis for one lax.scan over them.
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
from nanochat_jax.recipes import MODERN_SWITCHES, recipe as get_recipe

SOFTCAP = 15.0
ROPE_BASE = 10000.0
PAD_VOCAB_TO = 64
LOSS_CHUNK = 256  # sequence positions whose logits are materialised at once by the training loss
VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many channels of the block input
SMEAR_CHANNELS = 24  # the smear gate reads this many channels of the embedding
# What the backward pass keeps of each block (every policy gives the same numbers), named where made (checkpoint_name);
# the cheap elementwise rest (norms, RoPE, relu^2, residual adds) is recomputed: nothing kept in fp32 or twice.
MATMUL_OUTPUTS = ("q_proj", "k_proj", "v_proj", "attn_proj", "mlp_fc")  # (the MLP's output projection is not needed)
ATTENTION_OUTPUTS = ("attn_out", "attn_probs")  # the XLA path's output and softmax (fp32 [T, S])
# flash attention's residuals (cuDNN's output and softmax statistics; splash's), else its forward runs again (its
# output is not named too: a second copy in another layout would be kept beside the kernel's)
ATTENTION_KERNELS = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd", "pallas_call")
_policies = jax.checkpoint_policies
REMAT_POLICIES = {  # none: the matmuls and attention kept; dots: attention recomputed too; full: the whole block
    "none": _policies.save_from_both_policies(_policies.save_only_these_names(*MATMUL_OUTPUTS, *ATTENTION_OUTPUTS),
                                              lambda prim, *_, **__: prim.name in ATTENTION_KERNELS),
    "dots": _policies.save_only_these_names(*MATMUL_OUTPUTS),
    "full": _policies.nothing_saveable}


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (MQA when 1, MHA when n_head)
    n_embd: int = 768
    recipe: str = "classic"  # by name (recipes.RECIPES): the init and RoPE tables; training's optimizer and schedule
    rope_base: float = ROPE_BASE
    qk_scale: float = 1.0  # q and k times this after the QK-norm
    window_pattern: str | None = None  # e.g. "SSSL" tiled over the layers (see window_sizes); None: all see everything
    value_embeds: bool = False  # ve_layers() add a per-layer embedding of the tokens to v, gated per kv head
    residual_scalars: bool = False  # before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the embedding)
    smear: bool = False  # x[t] += smear_lambda * sigmoid(x[t, :24] @ smear_gate) * x[t-1] on the normed embedding
    backout: bool = False  # the residual after block n_layer // 2, times backout_lambda, subtracted before the norm

    def __post_init__(self):
        get_recipe(self.recipe)  # (a known name, or ValueError)
        pattern = self.window_pattern
        if pattern is not None and (not pattern or set(pattern.upper()) - set("SL")):
            raise ValueError(f"window_pattern {pattern!r}: use the letters S (short) and L (long)")
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
        """Per layer, how many earlier positions a query sees besides its own (None: all, without a window_pattern)."""
        if self.window_pattern is None:
            return [None] * self.n_layer
        short = -(-self.sequence_len // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [short if pattern[i % len(pattern)] == "S" else self.sequence_len for i in range(self.n_layer)]
        return sizes[:-1] + [self.sequence_len] if sizes else sizes

    def ve_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2] if self.value_embeds else []

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO

    def param_counts(self) -> dict[str, int]:
        """Parameters by group as nanochat counts them: padded vocab rows in, our zero ve_gates (no ve layer) out."""
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
        """What nanochat's modern recipe sizes its horizon and batch by: the block matrices and lm_head."""
        counts = self.param_counts()
        return counts["transformer_matrices"] + counts["lm_head"]

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x matmul params + 12 H Dh min(window, T) per layer of attention (PaLM app. B)."""
        matmul = self.scaling_params() + SMEAR_CHANNELS * self.smear
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
    """Init functions (key, shape) -> fp32 array: this one uniform in [low, high), `normal`'s N(0, std)."""
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, low, high)


def normal(std: float):
    return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def matrix_init(config: GPTConfig, scale: float = 1.0):
    """The modern recipe's block matrices: uniform with the classic std x scale; None (Linear's classic init) else."""
    s = scale * math.sqrt(3.0 / config.n_embd)
    return uniform(-s, s) if get_recipe(config.recipe).uniform_init else None


class Linear(nnx.Module):
    """Bias-free, kernel [in, out] ([layers, in, out] stacked); nanochat's classic init unless zero_init or `init`."""

    def __init__(self, fan_in: int, fan_out: int, axes: tuple, *, rngs: nnx.Rngs, zero_init: bool = False,
                 layers: int | None = None, init=None, fp8: bool = False):
        self.fp8 = fp8 and fp8_eligible(fan_in, fan_out)  # FP8 matmuls (see fp8.py) where nanochat uses them
        shape, axes = ((fan_in, fan_out), axes) if layers is None else ((layers, fan_in, fan_out), ("layers",) + axes)
        init = init or normal(fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in)))
        kernel = jnp.zeros(shape, jnp.float32) if zero_init else init(rngs.params(), shape)
        self.kernel = nnx.Param(kernel, axes=axes)

    def __call__(self, x):
        kernel = self.kernel[...].astype(x.dtype)
        return fp8_matmul(x, kernel) if self.fp8 else x @ kernel


def _static_window(window: int | None, T: int):
    return None if window is None or window >= T - 1 else window  # one that covers the sequence: plain causal


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, linear, attn_impl: str | None = None):  # linear: Block's Linear factory
        C, D, N, K = config.n_embd, config.head_dim, config.n_head, config.n_kv_head
        self.head_dim, self.attn_impl, self.qk_scale = D, attn_impl, config.qk_scale
        self.windows = tuple(sorted(set(config.window_sizes()))) or (None,)  # the distinct left windows, static
        init = matrix_init(config)
        self.c_q = linear(C, N * D, ("embed", "heads"), init=init)
        self.c_k = linear(C, K * D, ("embed", "kv_heads"), init=init)
        self.c_v = linear(C, K * D, ("embed", "kv_heads"), init=init)
        self.c_proj = linear(N * D, C, ("heads", "embed"), zero_init=True)
        if config.value_embeds:  # (zeroed afterwards in the layers without a value embedding: see GPT)
            self.ve_gate = linear(VE_GATE_CHANNELS, K, (None, "kv_heads"), init=uniform(0.0, 0.02))

    def __call__(self, x_BTC, cos, sin, kv=None, pos_B=None, attend_len=None, ve_BTE=None, window=None):
        """kv: None (training) or (k, v, layer): the whole cache, each [L, B, K, S, D], and this layer's index; the new
        keys/values go to [layer, b, :, pos_B[b] ..], the cache is returned too, and attention reads its first
        attend_len (static) positions. ve_BTE: this layer's value embedding (or zeros); window: traced or None."""
        B, T, _ = x_BTC.shape
        q, k, v = (checkpoint_name(proj(x_BTC), name).reshape(B, T, -1, self.head_dim)  # [B, T, heads, D]
                   for proj, name in ((self.c_q, "q_proj"), (self.c_k, "k_proj"), (self.c_v, "v_proj")))
        if ve_BTE is not None:  # value residual: gate in (0, 3) per kv head
            gate_BTK = 3 * jax.nn.sigmoid(self.ve_gate(x_BTC[..., :VE_GATE_CHANNELS]))
            v = v + gate_BTK[..., None] * ve_BTE.reshape(v.shape).astype(v.dtype)
        q, k = rms_norm(apply_rope(q, cos, sin)), rms_norm(apply_rope(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        if kv is not None:
            # a scatter of the T new positions into the cache the layer scan carries: XLA updates it in place, so a
            # step writes B x T positions, not a new copy of the whole cache (as a scan's stacked outputs would be)
            *whole, layer = kv  # the caches of k and v
            rows_B1, cols_BT = jnp.arange(B)[:, None], pos_B[:, None] + jnp.arange(T)[None, :]
            # (indexed dims first: the new entries are [B, T, K, D])
            kv = tuple(c.at[layer, rows_B1, :, cols_BT].set(new.astype(c.dtype)) for c, new in zip(whole, (k, v)))
            S = kv[0].shape[3] if attend_len is None else attend_len
            k, v = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False)[:, :, :S].astype(q.dtype) for c in kv)
            y = xla_attention(q, k, v, pos_B, heads_first=True, window=window)  # (per-row offsets)
        elif window is None or len(self.windows) == 1:
            y = attention(q, k, v, impl=self.attn_impl, window=_static_window(self.windows[0], T))
        else:  # layers differ in window: one branch per distinct window, each with its window static
            branches = [partial(attention, impl=self.attn_impl, window=_static_window(w, T)) for w in self.windows]
            y = jax.lax.switch(jnp.searchsorted(jnp.asarray(self.windows), window), branches, q, k, v)
        return checkpoint_name(self.c_proj(y.reshape(B, T, -1)), "attn_proj"), kv


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, linear):
        C = config.n_embd
        self.c_fc = linear(C, 4 * C, ("embed", "mlp"), init=matrix_init(config, 0.4))
        self.c_proj = linear(4 * C, C, ("mlp", "embed"), zero_init=True)

    def __call__(self, x_BTC):  # (on rows [B*T, C]: on [B, T, C] XLA:CPU transposes the gradients, a slower step)
        x_NC = x_BTC.reshape(-1, x_BTC.shape[-1])
        return self.c_proj(jnp.square(jax.nn.relu(checkpoint_name(self.c_fc(x_NC), "mlp_fc")))).reshape(x_BTC.shape)


class Block(nnx.Module):
    """One transformer block; with `layers`, that many blocks' parameters stacked (GPT's scan calls it per slice)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, attn_impl: str | None = None, layers: int | None = None,
                 fp8: bool = False):
        linear = partial(Linear, rngs=rngs, layers=layers, fp8=fp8)
        self.attn = CausalSelfAttention(config, linear, attn_impl)
        self.mlp = MLP(config, linear)

    def __call__(self, x, cos, sin, kv=None, pos_B=None, attend_len=None, ve=None, window=None):
        y, kv = self.attn(rms_norm(x), cos, sin, kv, pos_B, attend_len, ve, window)
        x = x + y
        return x + self.mlp(rms_norm(x)), kv


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attn_impl: str | None = None,
                 remat: str = "none", fp8: bool = False):
        """dtype: the compute dtype (bf16 on GPU/TPU, fp32 on CPU); attn_impl: None (by backend) or attention.py's."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.config, self.dtype, self.remat = config, dtype, remat
        Vp, C, L = config.padded_vocab_size, config.n_embd, config.n_layer
        modern = get_recipe(config.recipe).uniform_init
        wte = jax.random.normal(rngs.params(), (Vp, C), jnp.float32)
        self.wte = nnx.Param(0.8 * wte if modern else wte, axes=("vocab", "embed"))
        self.h = Block(config, rngs=rngs, attn_impl=attn_impl, layers=L, fp8=fp8)
        self.lm_head = Linear(C, Vp, ("embed", "vocab"), rngs=rngs, fp8=fp8, zero_init=not modern,
                              init=normal(0.001) if modern else None)  # modern: a small random head, not zeros
        if ve_layers := config.ve_layers():
            s, kv_dim = math.sqrt(3.0 / C), config.n_kv_head * config.head_dim
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
        if ve_layers := c.ve_layers():
            out["ve_index"] = jnp.asarray([ve_layers.index(i) if i in ve_layers else 0 for i in range(L)], jnp.int32)
            out["has_ve"] = jnp.asarray([i in ve_layers for i in range(L)], self.dtype)
        return out

    def _embed(self, idx_BT):
        return rms_norm(jnp.take(self.wte[...], idx_BT, axis=0).astype(self.dtype))

    def _trunk(self, idx_BT, cache=None, pos_B=None, attend_len=None):
        """The blocks' output for the tokens at positions 0 .. T-1, or pos_B[b] .. pos_B[b]+T-1 with a cache."""
        c, (B, T) = self.config, idx_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if pos_B is None else pos_B[:, None] + jnp.arange(T)
        cos, sin = rope_tables(positions_BT, c.head_dim, c.rope_base,
                               jnp.bfloat16 if get_recipe(c.recipe).bf16_rope else self.dtype)
        x = shard_rows(self._embed(idx_BT))
        if c.smear:
            if cache is None:  # the previous position's embedding, from the same rows
                prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
            else:  # the token before each row's first new one is in the cache's token record
                tokens = cache["tokens"]
                first_prev = tokens[0, jnp.arange(B), jnp.maximum(pos_B - 1, 0)]
                prev = self._embed(jnp.concatenate([first_prev[:, None], idx_BT[:, :-1]], axis=1))
                cache = dict(cache, tokens=tokens.at[0, jnp.arange(B)[:, None], positions_BT].set(idx_BT))
            gate_BT1 = self.smear_lambda[...].astype(x.dtype) * jax.nn.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x = x + jnp.where((positions_BT > 0)[..., None], gate_BT1 * prev, 0).astype(x.dtype)
        if cache is not None and c.n_layer == 0:  # (a layerless probe of the compiler's cost model)
            return x, cache
        x0 = x
        block_def, stacked = nnx.split(self.h)

        def layer(carry, xs):  # one block on its slice of the stacked parameters; the cache (if any) in the carry
            x, x_mid, kv = carry
            params, extra = xs
            if c.residual_scalars:
                x = extra["resid"].astype(x.dtype) * x + extra["x0"].astype(x.dtype) * x0
            ve = None
            if c.ve_layers():  # one gather from the stacked tables (zeros in layers without one)
                ve = self.value_embeds[...][extra["ve_index"], idx_BT].astype(x.dtype) * extra["has_ve"]
            kv = None if kv is None else (*kv, extra["layer"])
            x, kv = nnx.merge(block_def, params)(x, cos, sin, kv, pos_B, attend_len, ve, extra.get("window"))
            if c.backout:  # the residual after the middle block, carried to the end
                x_mid = jnp.where(extra["layer"] == c.n_layer // 2, x, x_mid)
            return (shard_rows(x), x_mid, kv), None

        if cache is None:  # training: what the backward pass keeps of each block
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        carry = (x, jnp.zeros_like(x) if c.backout else None, None if cache is None else (cache["k"], cache["v"]))
        (x, x_mid, kv), _ = jax.lax.scan(layer, carry, (stacked, self._per_layer()))
        if cache is not None:  # each layer wrote its part of the whole cache
            cache = dict(cache, k=kv[0], v=kv[1])
        if c.backout:
            x = x - self.backout_lambda[...].astype(x.dtype) * x_mid
        return x, cache

    def _head(self, x):
        logits = shard_rows(self.lm_head(rms_norm(x))[..., : self.config.vocab_size].astype(jnp.float32))
        return SOFTCAP * jnp.tanh(logits / SOFTCAP)

    def __call__(self, idx_BT, targets_BT=None, loss_reduction: str = "mean"):
        """Logits [B, T, vocab_size] in fp32, or with targets the cross-entropy (targets of -1 ignored; see _reduce)."""
        x, _ = self._trunk(idx_BT)
        if targets_BT is None:
            return self._head(x)
        return _reduce(self._chunked_token_loss(x, targets_BT), targets_BT, loss_reduction)

    def _chunked_token_loss(self, x_BTC, targets_BT):
        """Per-token cross-entropy [B, T], LOSS_CHUNK positions at a time, recomputed in the backward pass: one
        chunk's fp32 logits in memory, not the sequence's (4.3 GB for 8 rows of 2048 at vocab 65,536)."""
        B, T, C = x_BTC.shape
        chunk = next(c for c in range(min(LOSS_CHUNK, T), 0, -1) if T % c == 0)
        x_NBcC = x_BTC.reshape(B, T // chunk, chunk, C).swapaxes(0, 1)
        t_NBc = targets_BT.reshape(B, T // chunk, chunk).swapaxes(0, 1)

        def one_chunk(xt):  # (its rows flattened: on [B, c, C] XLA:CPU transposes the logits' gradient, 3x slower)
            x_BcC, t_Bc = xt
            return cross_entropy(self._head(x_BcC.reshape(-1, C)), t_Bc.reshape(-1), "none").reshape(t_Bc.shape)

        return jax.lax.map(jax.checkpoint(one_chunk), (x_NBcC, t_NBc)).swapaxes(0, 1).reshape(B, T)

    def logits_at(self, idx_BT, at_B):
        """The logits at positions at_B of each row ([B] -> [B, vocab], [B, S] -> [B, S, vocab]): the head and its
        softmax run on those positions only."""
        x, _ = self._trunk(idx_BT)
        rows = jnp.arange(idx_BT.shape[0]).reshape((-1,) + (1,) * (at_B.ndim - 1))
        return self._head(x[rows, at_B])

    def forward_cached(self, idx_BT, cache, pos_B, attend_len: int | None = None):
        """T new tokens per row from positions pos_B [B] -> (logits [B, T, vocab], cache); the caller keeps pos_B + T
        <= max_len (and <= attend_len: attention reads that many positions of init_cache's cache, default all)."""
        x, cache = self._trunk(idx_BT, cache, pos_B, attend_len)
        return self._head(x), cache


def init_cache(config: GPTConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    """{'k', 'v'}: [n_layer, batch, n_kv_head, max_len, head_dim], heads before positions (else XLA transposes each
    layer's slice for a decode step's attention: twice the CPU time); with smear also 'tokens' [1, batch, max_len]."""
    shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if config.smear:
        cache["tokens"] = jnp.zeros((1, batch_size, max_len), jnp.int32)
    return cache


def _reduce(loss_BT, targets_BT, reduction: str):
    """'none': the per-token loss [B, T] (0 where ignored); 'mean': its mean over the counted (not -1) targets."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"loss_reduction must be 'mean' or 'none', got {reduction!r}")
    return loss_BT if reduction == "none" else loss_BT.sum() / jnp.maximum(jnp.sum(targets_BT != -1), 1)


def cross_entropy(logits_BTV, targets_BT, reduction: str = "mean"):
    valid = targets_BT != -1
    logz = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BTV, jnp.where(valid, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return _reduce(jnp.where(valid, logz - target_logit, 0.0), targets_BT, reduction)
