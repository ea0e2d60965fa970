"""Causal self-attention for training, prefill and cached decoding: `attention(q, k, v, q_offset=None, impl=None,
window=None)`, q [B, T, N, D], k and v [B, S, K, D], K dividing N (GQA). Query i of row b sits at position
p = q_offset[b] + i and sees keys 0 .. p, or with a left `window` w only p - w .. p (nanochat's sliding window);
q_offset=None: plain causal, T == S. Paths, by backend unless `impl` says: "cudnn" (NVIDIA GPUs, bf16/fp16; its causal
mask is top-left aligned: no q_offset), "splash" (Pallas on TPU, interpret mode elsewhere; no q_offset, T a multiple
of 128), "xla" (an explicit fp32 softmax on every backend: the reference, and the decode path with per-row offsets).
"""
from functools import lru_cache

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from nanochat_jax.model.sharding import axes_size, context_batch_axes, target_platform

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides T is the kernel's tile


def splash_block(T: int) -> int | None:
    return next((b for b in SPLASH_BLOCKS if T % b == 0), None)


def choose_impl(dtype, has_offset: bool, impl: str | None = None, seq_len: int | None = None) -> str:
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}: expected one of {IMPLEMENTATIONS}")
    tiles = seq_len is not None and splash_block(seq_len) is not None
    # decode: a mask with per-row offsets, which cuDNN's and splash's causal masks cannot express; a length splash
    # cannot tile (short eval rows): exact, only the memory differs
    if has_offset or (impl == "splash" and not tiles):
        return "xla"
    if impl is not None:
        return impl
    backend = target_platform()
    if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "splash" if backend == "tpu" and tiles else "xla"


def attention(q_BTNH, k_BSKH, v_BSKH, q_offset_B=None, impl: str | None = None, window: int | None = None):
    """window: a static left window (None: none); every path takes one."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K != 0:
        raise ValueError(f"n_kv_head ({K}) must divide n_head ({N})")
    if q_offset_B is None and S != T:
        raise ValueError(f"causal attention without an offset needs as many keys as queries, got T={T}, S={S}")
    chosen = choose_impl(q_BTNH.dtype, q_offset_B is not None, impl, T)
    if chosen == "cudnn":
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True, implementation="cudnn",
                                            local_window_size=None if window is None else (window, 0))
    if chosen == "splash":
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, window)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_offset_B, window=window)


CAUSAL_BLOCK = 256  # query rows per block of the blockwise causal path (512: the d4 CPU step at 512 ~3% slower)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, q_offset_B=None, heads_first: bool = False, window=None):
    """heads_first: k and v are [B, K, S, H] (the KV cache's layout). window: static, or traced (the decode path's
    per-layer one). Long causal sequences (no offset, T a multiple of CAUSAL_BLOCK above it) go block by block."""
    T = q_BTNH.shape[1]
    if q_offset_B is None and not heads_first and T > CAUSAL_BLOCK and T % CAUSAL_BLOCK == 0:
        return blockwise_causal(q_BTNH, k_BSKH, v_BSKH, window=window)
    return _masked_attention(q_BTNH, k_BSKH, v_BSKH, q_offset_B, heads_first, window)


def blockwise_causal(q_BTNH, k_BTKH, v_BTKH, window: int | None = None):
    """Causal attention CAUSAL_BLOCK queries at a time, each block against the keys up to its end only (with a static
    window, from its first query's window start on): half the work of the [T, T] scores, the same numbers."""
    B, T = q_BTNH.shape[:2]
    block = CAUSAL_BLOCK
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)  # once, not per block
    outs = []
    for end in range(block, T + 1, block):
        start = max(0, end - block - window) if isinstance(window, int) else 0
        outs.append(_masked_attention(q_BTNH[:, end - block:end], k_BKTH[:, :, start:end], v_BKTH[:, :, start:end],
                                      jnp.full((B,), end - block), heads_first=True, window=window, k_start=start))
    return jnp.concatenate(outs, axis=1)


def _masked_attention(q_BTNH, k_BSKH, v_BSKH, q_offset_B=None, heads_first: bool = False, window=None,
                      k_start: int = 0):
    """k_start: the position of the first key given (the keys are k_start .. k_start + S - 1)."""
    B, T, N, H = q_BTNH.shape
    S, K = (k_BSKH.shape[2], k_BSKH.shape[1]) if heads_first else (k_BSKH.shape[1], k_BSKH.shape[2])
    kv = "bksh" if heads_first else "bskh"
    offset_B = jnp.zeros((B,), jnp.int32) if q_offset_B is None else jnp.broadcast_to(q_offset_B, (B,))
    q_pos_BT = offset_B[:, None] + jnp.arange(T)[None, :]
    k_pos_S = k_start + jnp.arange(S)
    visible_BTS = k_pos_S[None, None, :] <= q_pos_BT[:, :, None]
    if window is not None:
        visible_BTS &= q_pos_BT[:, :, None] - k_pos_S[None, None, :] <= window
    # group the query heads that share a kv head instead of repeating k and v
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum(f"btkgh,{kv}->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * (H ** -0.5)
    scores = jnp.where(visible_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = checkpoint_name(jax.nn.softmax(scores, axis=-1), "attn_probs").astype(v_BSKH.dtype)
    out_BTKGH = checkpoint_name(jnp.einsum(f"bkgts,{kv}->btkgh", probs, v_BSKH), "attn_out")
    return out_BTKGH.reshape(B, T, N, H)


@lru_cache(maxsize=None)
def _splash_kernel(group: int, T: int, interpret: bool, window: int | None = None):
    """The MQA splash kernel (q [G, T, D], k and v [T, D]): causal, or with a window a local mask (window, 0)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    b = splash_block(T)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    one = sm.CausalMask((T, T)) if window is None else sm.LocalMask((T, T), window_size=(window, 0), offset=0)
    mask = sm.MultiHeadMask([one] * group)
    with jax.ensure_compile_time_eval():  # its mask tables are concrete arrays, cached across traces
        return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BTNH, k_BTKH, v_BTKH, window: int | None = None):
    """Splash attention, each device on its own rows of the context mesh's batch axes (the compiler cannot partition
    a Pallas kernel); without a mesh, or with rows that do not split evenly, on the whole batch."""
    # made outside shard_map: its mask tables are arrays that must not belong to one manual shard
    kernel = _splash_kernel(q_BTNH.shape[2] // k_BTKH.shape[2], q_BTNH.shape[1], target_platform() != "tpu", window)

    def local(q_BTNH, k_BTKH, v_BTKH):  # on arrays this device holds whole: one MQA kernel per kv head, over rows
        B, T, N, H = q_BTNH.shape
        K = k_BTKH.shape[2]
        q_BKGTH = (q_BTNH * H ** -0.5).astype(q_BTNH.dtype).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
        k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        out_BKGTH = jax.vmap(jax.vmap(kernel))(q_BKGTH, k_BKTH, v_BKTH)
        return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)

    mesh, axes = jax.sharding.get_abstract_mesh(), context_batch_axes()
    if (n_shards := axes_size(mesh, axes)) == 1 or q_BTNH.shape[0] % n_shards:
        return local(q_BTNH, k_BTKH, v_BTKH)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes),) * 3, out_specs=P(axes), check_vma=False)(
        q_BTNH, k_BTKH, v_BTKH)
