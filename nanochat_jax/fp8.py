"""FP8 training matmuls with tensorwise scaling (the modern recipe's optional --fp8, for H100/H200-class GPUs).

`fp8_matmul(x, w)` computes x @ w with both operands quantised to float8_e4m3fn, each with one scale for the whole
tensor (max |value| maps to the format's largest number), and in the backward pass the incoming gradient quantised
to float8_e5m2 (more range, less precision) for both gradient matmuls: the recipe nanochat runs through
torch._scaled_mm. It is written as quantise-dequantise around ordinary dots, the form XLA's GPU compiler rewrites
into cuBLASLt FP8 GEMMs (on other backends it is emulated: the same numbers, no speedup). Only the layers nanochat
converts use it: dims divisible by 16, the smaller one at least 128 (`fp8_eligible`); evaluation runs without it.
"""
import jax
import jax.numpy as jnp

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def fp8_eligible(fan_in: int, fan_out: int) -> bool:
    return fan_in % 16 == 0 and fan_out % 16 == 0 and min(fan_in, fan_out) >= 128


def quantize(x, dtype):
    """(fp8 values, inverse scale): x * scale rounded to `dtype` and saturated, scale = dtype max / max|x|."""
    x32 = x.astype(jnp.float32)
    fmax = float(jnp.finfo(dtype).max)
    scale = fmax / jnp.maximum(jnp.max(jnp.abs(x32)), 1e-12)
    return jnp.clip(x32 * scale, -fmax, fmax).astype(dtype), 1.0 / scale


def _dequantize(q, inv_scale, dtype):
    return (q.astype(jnp.float32) * inv_scale).astype(dtype)


@jax.custom_vjp
def fp8_matmul(x, w):
    """x [..., in] @ w [in, out] in FP8 (e4m3 forward, e5m2 gradients); returns x's dtype."""
    return _forward(x, w)[0]


def _forward(x, w):
    xq, x_inv = quantize(x, E4M3)
    wq, w_inv = quantize(w, E4M3)
    y = _dequantize(xq, x_inv, x.dtype) @ _dequantize(wq, w_inv, x.dtype)
    return y, (xq, x_inv, wq, w_inv, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _backward(saved, g):
    xq, x_inv, wq, w_inv, x_like, w_like = saved
    gq, g_inv = quantize(g, E5M2)
    g_dq = _dequantize(gq, g_inv, g.dtype)
    dx = g_dq @ _dequantize(wq, w_inv, g.dtype).T
    x_dq = _dequantize(xq, x_inv, g.dtype)
    dw = jnp.einsum("...i,...o->io", x_dq, g_dq, preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


fp8_matmul.defvjp(_forward, _backward)
