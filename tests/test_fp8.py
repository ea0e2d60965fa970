"""FP8 matmuls (nanochat_jax.model.fp8) against exact float64 matmuls: e4m3 operands with tensorwise scales forward, e5m2
gradients backward, and a model that trains with them."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.model.fp8 import E4M3, E5M2, fp8_eligible, fp8_matmul, quantize
from nanochat_jax.model.gpt import GPT, config_from_depth


def test_quantize_scales_the_largest_value_to_the_format_max():
    x = jnp.asarray([[0.5, -2.0], [1e-3, 0.25]], jnp.float32)
    q, inv = quantize(x, E4M3)
    assert q.dtype == E4M3 and float(q.astype(jnp.float32).min()) == -448.0
    np.testing.assert_allclose(np.asarray(q.astype(jnp.float32) * inv), np.asarray(x), rtol=2 ** -3)
    q, inv = quantize(jnp.zeros((2, 2)), E5M2)  # all zeros: no division by zero
    assert not np.any(np.asarray(q.astype(jnp.float32))) and np.isfinite(float(inv))
    assert fp8_eligible(128, 512) and not fp8_eligible(12, 128) and not fp8_eligible(136, 100)


def test_fp8_matmul_and_its_gradients():
    rng = np.random.default_rng(0)
    x, w, g = rng.standard_normal((4, 8, 128)), rng.standard_normal((128, 256)) * 0.1, rng.standard_normal((4, 8, 256))
    y, pullback = jax.vjp(fp8_matmul, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = pullback(jnp.asarray(g, jnp.float32))
    exact = {"y": x @ w, "dx": g @ w.T, "dw": np.einsum("bti,bto->io", x, g)}
    # e4m3 keeps 3 mantissa bits (relative rounding 2^-4 per operand), e5m2 2 bits: errors average out in the sums
    for name, got, tol in (("y", y, 0.05), ("dx", dx, 0.1), ("dw", dw, 0.1)):
        got = np.asarray(got, np.float64)
        assert got.shape == exact[name].shape
        err = np.linalg.norm(got - exact[name]) / np.linalg.norm(exact[name])
        assert 1e-4 < err < tol, (name, err)  # not exact (it is quantised), but close


def test_a_model_trains_with_fp8():
    cfg = config_from_depth(2, 256, 32, recipe="modern")  # width 128: every projection is FP8-eligible
    fp8, plain = (GPT(cfg, rngs=nnx.Rngs(0), fp8=f) for f in (True, False))
    assert fp8.h.mlp.c_fc.fp8 and fp8.lm_head.fp8 and not fp8.h.attn.ve_gate.fp8 and not plain.h.mlp.c_fc.fp8
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32)))
    graphdef, params = nnx.split(fp8)
    loss_fn = jax.jit(lambda p: nnx.merge(graphdef, p)(idx[:, :-1], idx[:, 1:]))
    ref_fn = jax.jit(lambda p: nnx.merge(nnx.graphdef(plain), p)(idx[:, :-1], idx[:, 1:]))
    assert abs(float(loss_fn(params)) - float(ref_fn(params))) < 0.05
    step = jax.jit(lambda p: jax.tree.map(lambda a, b: a - 0.5 * b, p, jax.grad(loss_fn)(p)))
    start = float(loss_fn(params))
    for _ in range(8):
        params = step(params)
    assert float(loss_fn(params)) < start - 0.3
