"""FP8 training matmuls with tensorwise scaling (the modern recipe's optional --fp8, for H100/H200-class GPUs).

`fp8_matmul(x, w)` is x @ w with both operands quantised to float8_e4m3fn, one scale per tensor, and the backward
pass's incoming gradient to float8_e5m2: nanochat's torch._scaled_mm recipe, an FP8 GEMM on Hopper (emulated elsewhere:
the same numbers), scales over the global tensor (under data parallelism a max across devices; nanochat: per GPU).
"""
import jax
import jax.numpy as jnp

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def fp8_eligible(fan_in: int, fan_out: int) -> bool:  # nanochat's rule: dims divisible by 16, the smaller >= 128
    return fan_in % 16 == 0 and fan_out % 16 == 0 and min(fan_in, fan_out) >= 128


def quantize(x, dtype):
    """(fp8 values, inverse scale): x * scale rounded to `dtype` and saturated, scale = dtype max / max|x|."""
    x32 = x.astype(jnp.float32)
    fmax = float(jnp.finfo(dtype).max)
    scale = fmax / jnp.maximum(jnp.max(jnp.abs(x32)), 1e-12)
    return jnp.clip(x32 * scale, -fmax, fmax).astype(dtype), 1.0 / scale


def _scaled_dot(a_q, a_inv, b_q, b_inv, contract: tuple, out_dtype):
    """a_q . b_q contracted over `contract` (a's dims, b's dims), accumulated in fp32, then times both inverse scales:
    the form XLA's GPU compiler runs as one FP8 GEMM (it turns a dequantise-then-dot form back into a bf16 GEMM)."""
    y = jax.lax.dot_general(a_q, b_q, (contract, ((), ())), preferred_element_type=jnp.float32)
    return (y * (a_inv * b_inv)).astype(out_dtype)


@jax.custom_vjp
def fp8_matmul(x, w):
    """x [..., in] @ w [in, out] in FP8 (e4m3 forward, e5m2 gradients); returns x's dtype."""
    return _forward(x, w)[0]


def _forward(x, w):
    (xq, x_inv), (wq, w_inv) = quantize(x, E4M3), quantize(w, E4M3)
    y = _scaled_dot(xq, x_inv, wq, w_inv, ((x.ndim - 1,), (0,)), x.dtype)
    return y, (xq, x_inv, wq, w_inv, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _backward(saved, g):
    xq, x_inv, wq, w_inv, x_like, w_like = saved
    gq, g_inv = quantize(g, E5M2)
    dx = _scaled_dot(gq, g_inv, wq, w_inv, ((g.ndim - 1,), (1,)), x_like.dtype)  # g [..., out] . w [in, out]
    rows = tuple(range(g.ndim - 1))
    dw = _scaled_dot(xq, x_inv, gq, g_inv, (rows, rows), w_like.dtype)  # sum over rows of x [.., in] g [.., out]
    return dx, dw


fp8_matmul.defvjp(_forward, _backward)
