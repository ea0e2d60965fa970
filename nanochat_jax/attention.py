"""Causal self-attention in one place, for training, prefill and cached decoding.

`attention(q, k, v, q_offset=None, impl=None)` takes q [B, T, N, D] and k, v [B, S, K, D] with K dividing N
(MQA/GQA; MHA when K == N). Query i of row b sits at position q_offset[b] + i and sees keys 0 .. q_offset[b] + i.
q_offset=None means plain causal attention with T == S (training, or a prefill that starts at position 0).

Paths, chosen by backend unless `impl` overrides:
- "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), cuDNN flash attention on NVIDIA GPUs. It needs
  bf16/fp16 inputs, and its causal mask is top-left aligned, so it serves the q_offset=None case only.
- "xla": an explicit einsum softmax in fp32. Every backend can run it; it is the reference and the decode path.
"""
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def choose_impl(dtype, has_offset: bool, impl: str | None = None) -> str:
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}: expected one of {IMPLEMENTATIONS}")
    if has_offset:
        return "xla"  # decode: a mask with per-row offsets, which cuDNN's causal mask cannot express
    if impl is not None:
        return impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def attention(q_BTNH, k_BSKH, v_BSKH, q_offset_B=None, impl: str | None = None):
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K != 0:
        raise ValueError(f"n_kv_head ({K}) must divide n_head ({N})")
    if q_offset_B is None and S != T:
        raise ValueError(f"causal attention without an offset needs as many keys as queries, got T={T}, S={S}")
    if choose_impl(q_BTNH.dtype, q_offset_B is not None, impl) == "cudnn":
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True, implementation="cudnn")

    offset_B = jnp.zeros((B,), jnp.int32) if q_offset_B is None else jnp.broadcast_to(q_offset_B, (B,))
    q_pos_BT = offset_B[:, None] + jnp.arange(T)[None, :]
    visible_BTS = jnp.arange(S)[None, None, :] <= q_pos_BT[:, :, None]
    # group the query heads that share a kv head instead of repeating k and v
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    scores = jnp.where(visible_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)
