"""The classic nanochat GPT in Flax NNX.

token embedding -> RMSNorm -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> RMSNorm -> lm_head -> drop vocab padding
-> fp32 -> 15*tanh(x/15). Attention: q/k/v/proj without biases, RoPE (base 10000, split halves) then RMS QK-norm,
causal, n_kv_head dividing n_head. MLP: 4x width, relu^2. No biases, no learnable norm weights, untied lm_head.

Parameters are fp32 and carry logical axis names (`axes=`) that nanochat_jax.sharding maps onto a mesh.
Weights are stored [in, out] (JAX's convention; torch's nn.Linear stores [out, in]).

The blocks' parameters are stacked on a leading 'layers' axis (model.h.attn.c_q.kernel is [n_layer, in, out]) and the
trunk is a lax.scan over them: one compiled block whatever the depth, so compile time stays flat. `remat` picks what
the backward pass keeps of each block: 'none' (everything), 'dots' (the matmul outputs; the rest is recomputed) or
'full' (only the block's input; the whole block is recomputed), trading compute for memory.
"""
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.attention import attention, xla_attention
from nanochat_jax.sharding import shard_rows

SOFTCAP = 15.0
ROPE_BASE = 10000.0
PAD_VOCAB_TO = 64
LOSS_CHUNK = 256  # sequence positions whose logits are materialised at once by the training loss
REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (MQA when 1, MHA when n_head)
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO

    def num_params(self) -> int:
        """All parameters, padded vocab rows included (what the optimizer updates)."""
        C, D = self.n_embd, self.head_dim
        attn = C * self.n_head * D + 2 * C * self.n_kv_head * D + self.n_head * D * C
        mlp = 2 * C * 4 * C
        return 2 * self.padded_vocab_size * C + self.n_layer * (attn + mlp)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x non-embedding params + 12 L H Dh T for attention (PaLM appendix B)."""
        non_embedding = self.num_params() - self.padded_vocab_size * self.n_embd
        return 6 * non_embedding + 12 * self.n_layer * self.n_head * self.head_dim * self.sequence_len


def config_from_depth(depth: int, vocab_size: int, sequence_len: int = 2048, n_kv_head: int | None = None) -> GPTConfig:
    """nanochat's sizing: width 64 x depth, head dim 128 (ceil division of the heads), MHA unless told otherwise."""
    n_embd = 64 * depth
    n_head = max(1, (n_embd + 127) // 128)
    if depth < 1 or n_embd % n_head:
        raise ValueError(f"depth {depth} gives width {n_embd}, which does not split into {n_head} equal heads of about "
                         "128: use an even depth (or 1, 3, 7, 15, 31)")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=n_embd)


def rms_norm(x):
    """Parameter-free RMSNorm, computed in fp32; eps as torch's F.rms_norm default (fp32 machine epsilon)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.finfo(jnp.float32).eps)
    return y.astype(x.dtype)


def rope_tables(positions_BT, head_dim: int):
    """cos, sin [B, T, head_dim/2] for the given positions. nanochat keeps its tables in bf16, so they are rounded
    through bf16 here too: imported weights then see the very same rotations."""
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs).astype(jnp.bfloat16), jnp.sin(freqs).astype(jnp.bfloat16)


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
    """Rotate the two halves of each head: (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos), nanochat's sign."""
    half = x_BTNH.shape[-1] // 2
    x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
    cos, sin = cos_BTh[:, :, None, :].astype(x_BTNH.dtype), sin_BTh[:, :, None, :].astype(x_BTNH.dtype)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


class Linear(nnx.Module):
    """Bias-free linear layer, kernel [in, out] ([layers, in, out] when `layers` are stacked), nanochat's init:
    N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))) or zeros (output projections and lm_head start at zero)."""

    def __init__(self, fan_in: int, fan_out: int, axes: tuple, *, rngs: nnx.Rngs, zero_init: bool = False,
                 layers: int | None = None):
        shape, axes = ((fan_in, fan_out), axes) if layers is None else ((layers, fan_in, fan_out), ("layers",) + axes)
        if zero_init:
            kernel = jnp.zeros(shape, jnp.float32)
        else:
            std = fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))
            kernel = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        self.kernel = nnx.Param(kernel, axes=axes)

    def __call__(self, x):
        return x @ self.kernel[...].astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, attn_impl: str | None = None, layers: int | None = None):
        C, D = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, D
        self.attn_impl = attn_impl
        self.c_q = Linear(C, config.n_head * D, ("embed", "heads"), rngs=rngs, layers=layers)
        self.c_k = Linear(C, config.n_kv_head * D, ("embed", "kv_heads"), rngs=rngs, layers=layers)
        self.c_v = Linear(C, config.n_kv_head * D, ("embed", "kv_heads"), rngs=rngs, layers=layers)
        self.c_proj = Linear(config.n_head * D, C, ("heads", "embed"), rngs=rngs, zero_init=True, layers=layers)

    def __call__(self, x_BTC, cos, sin, kv=None, pos_B=None, attend_len=None):
        """kv: None (training) or (k, v, layer): the whole cache, each [L, B, K, S, D], and this layer's index; the
        new keys/values are written at [layer, b, :, pos_B[b] .. pos_B[b]+T-1] and the updated cache is returned
        alongside the output. attend_len (static): the queries attend to the cache's first attend_len positions only
        (the caller keeps pos_B + T <= attend_len), so a decode step reads the filled part of the cache."""
        B, T, _ = x_BTC.shape
        q = self.c_q(x_BTC).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x_BTC).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x_BTC).reshape(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(apply_rope(q, cos, sin)), rms_norm(apply_rope(k, cos, sin))
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
            y = xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), pos_B, heads_first=True)  # (per-row offsets)
        else:
            y = attention(q, k, v, impl=self.attn_impl)
        return self.c_proj(y.reshape(B, T, -1)), kv


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        C = config.n_embd
        self.c_fc = Linear(C, 4 * C, ("embed", "mlp"), rngs=rngs, layers=layers)
        self.c_proj = Linear(4 * C, C, ("mlp", "embed"), rngs=rngs, zero_init=True, layers=layers)

    def __call__(self, x_BTC):
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x_BTC))))


class Block(nnx.Module):
    """One transformer block; with `layers`, the parameters of that many blocks stacked on a leading axis (call it on
    one layer's slice of its state, as GPT's scan does)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, attn_impl: str | None = None, layers: int | None = None):
        self.attn = CausalSelfAttention(config, rngs=rngs, attn_impl=attn_impl, layers=layers)
        self.mlp = MLP(config, rngs=rngs, layers=layers)

    def __call__(self, x, cos, sin, kv=None, pos_B=None, attend_len=None):
        y, kv = self.attn(rms_norm(x), cos, sin, kv, pos_B, attend_len)
        x = x + y
        return x + self.mlp(rms_norm(x)), kv


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attn_impl: str | None = None,
                 remat: str = "none"):
        """dtype: compute dtype (bf16 on GPU/TPU, fp32 on CPU); parameters are always fp32.
        attn_impl: None picks by backend, or 'xla' / 'cudnn' / 'splash' (see nanochat_jax.attention).
        remat: what the backward pass keeps of each block, one of REMAT_POLICIES."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.config, self.dtype, self.remat = config, dtype, remat
        Vp, C = config.padded_vocab_size, config.n_embd
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (Vp, C), jnp.float32), axes=("vocab", "embed"))
        self.h = Block(config, rngs=rngs, attn_impl=attn_impl, layers=config.n_layer)
        self.lm_head = Linear(C, Vp, ("embed", "vocab"), rngs=rngs, zero_init=True)

    def _trunk(self, idx_BT, positions_BT, cache=None, pos_B=None, attend_len=None):
        cos, sin = rope_tables(positions_BT, self.config.head_dim)
        x = shard_rows(rms_norm(jnp.take(self.wte[...], idx_BT, axis=0).astype(self.dtype)))
        block_def, stacked = nnx.split(self.h)

        if cache is not None and self.config.n_layer == 0:  # (a layerless probe of the compiler's cost model)
            return x, cache
        if cache is not None:  # decode and prefill: the whole cache rides in the carry, each layer writes its part
            def cached_layer(carry, params):
                x, k_all, v_all, i = carry
                x, (k_all, v_all) = nnx.merge(block_def, params)(x, cos, sin, (k_all, v_all, i), pos_B, attend_len)
                return (shard_rows(x), k_all, v_all, i + 1), None

            (x, k_all, v_all, _), _ = jax.lax.scan(cached_layer, (x, cache["k"], cache["v"], jnp.int32(0)), stacked)
            return x, {"k": k_all, "v": v_all}

        def layer(x, params):  # one block on its slice of the stacked parameters
            x, _ = nnx.merge(block_def, params)(x, cos, sin)
            return shard_rows(x), None

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        x, _ = jax.lax.scan(layer, x, stacked)
        return x, None

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
        {'k','v': [n_layer, B, n_kv_head, max_len, head_dim]}; returns (logits [B, T, vocab], updated cache).
        The caller keeps pos_B + T <= max_len (and <= attend_len: attention reads that many positions, default all)."""
        T = idx_BT.shape[1]
        positions = pos_B[:, None] + jnp.arange(T)[None, :]
        x, cache = self._trunk(idx_BT, positions, cache, pos_B, attend_len)
        return self._head(x), cache


def init_cache(config: GPTConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    """{'k', 'v'}: [n_layer, batch, n_kv_head, max_len, head_dim] each. Heads before positions: a decode step's
    attention is then a batched matrix-vector product over the cache as it lies (with positions before heads, XLA
    transposes every layer's slice first, which doubled the attention time of a CPU decode step at batch 8)."""
    shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


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
