import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.model.attention import attention, choose_impl
from nanochat_jax.model.sharding import make_mesh
from reference import naive_attention


def qkv(B, T, S, N, K, D, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, N, D)), rng.standard_normal((B, S, K, D)), rng.standard_normal((B, S, K, D)))


@pytest.mark.parametrize("N,K", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_causal_matches_naive(N, K):
    q, k, v = qkv(2, 7, 7, N, K, 16)
    out = attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), impl="xla")
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_long_sequences_go_block_by_block_with_the_same_values_and_gradients(monkeypatch):
    """Above CAUSAL_BLOCK queries the XLA path computes only the blocks at or below the diagonal: the output equals
    the naive softmax and the gradient equals the one-block path's."""
    from nanochat_jax.model import attention as module
    monkeypatch.setattr(module, "CAUSAL_BLOCK", 8)
    q, k, v = (jnp.asarray(a, jnp.float32) for a in qkv(2, 24, 24, 4, 2, 8, seed=3))  # GQA, 3 blocks
    out = attention(q, k, v, impl="xla")
    np.testing.assert_allclose(np.asarray(out), naive_attention(*(np.asarray(a) for a in (q, k, v))), rtol=1e-5,
                               atol=1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    blocked = jax.grad(loss(lambda q, k, v: attention(q, k, v, impl="xla")), argnums=(0, 1, 2))(q, k, v)
    whole = jax.grad(loss(lambda q, k, v: module._masked_attention(q, k, v)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(blocked, whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, impl="xla"))(q, k, v))
    assert "24,24]" not in jaxpr and "8,24]" in jaxpr  # no [T, T] scores: blocks of [8, up to 24] keys


@pytest.mark.parametrize("N,K", [(4, 4), (6, 2), (4, 1)])
def test_cache_offsets_match_naive(N, K):
    """Rows at different positions of a longer cache (what batched decoding sees), chunk and single-token queries."""
    for T in (1, 3):
        q, k, v = qkv(3, T, 12, N, K, 8, seed=T)
        offsets = np.array([0, 4, 12 - T])
        out = attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), q_offset_B=jnp.asarray(offsets))
        np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, offsets), rtol=1e-5, atol=1e-5)


def test_keys_beyond_the_query_position_are_ignored():
    q, k, v = qkv(1, 2, 10, 2, 1, 8)
    offsets = jnp.array([3])
    base = attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), q_offset_B=offsets)
    k2, v2 = k.copy(), v.copy()
    k2[:, 5:], v2[:, 5:] = 99.0, -99.0  # positions 5.. are beyond the last query (3 + 1)
    moved = attention(*(jnp.asarray(a, jnp.float32) for a in (q, k2, v2)), q_offset_B=offsets)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(moved))


def test_bf16_inputs_close_to_fp32():
    q, k, v = qkv(2, 16, 16, 4, 2, 32)
    exact = naive_attention(q, k, v)
    out = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=0.05)


@pytest.mark.parametrize("N,K", [(4, 4), (4, 2), (4, 1)])
def test_splash_in_interpret_mode_equals_xla_forward_and_gradient(N, K):
    """Pallas splash attention (run by Pallas' interpreter on CPU), inside shard_map over a 2x4 mesh, against the
    XLA path; the gradients go through splash's own backward kernels."""
    q, k, v = (jnp.asarray(a, jnp.float32) for a in qkv(8, 256, 256, N, K, 32))
    mesh = make_mesh("data:2,fsdp:4")
    rows = NamedSharding(mesh, P(("data", "fsdp")))

    def loss(impl):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, impl=impl))),
                                          argnums=(0, 1, 2)))

    with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, rows) for a in (q, k, v)]
        assert "shard_map" in str(jax.make_jaxpr(lambda *a: attention(*a, impl="splash"))(*sharded))
        out = jax.jit(lambda *a: attention(*a, impl="splash"))(*sharded)
        splash_loss, splash_grads = loss("splash")(*sharded)
    xla_loss, xla_grads = loss("xla")(q, k, v)
    np.testing.assert_allclose(np.asarray(out), naive_attention(*(np.asarray(a) for a in (q, k, v))),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(splash_loss), float(xla_loss), atol=1e-2)  # a sum over 262k outputs
    for a, b in zip(splash_grads, xla_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # without a mesh the kernel runs on the whole batch
    np.testing.assert_allclose(np.asarray(attention(q[:2], k[:2], v[:2], impl="splash")),
                               naive_attention(*(np.asarray(a[:2]) for a in (q, k, v))), rtol=1e-4, atol=1e-4)


def test_dispatch():
    assert jax.default_backend() == "cpu"
    assert choose_impl(jnp.bfloat16, has_offset=False) == "xla"  # cuDNN only on GPUs
    assert choose_impl(jnp.bfloat16, has_offset=False, impl="splash", seq_len=2048) == "splash"
    assert choose_impl(jnp.bfloat16, has_offset=False, impl="splash", seq_len=100) == "xla"  # no tile divides 100
    assert choose_impl(jnp.bfloat16, has_offset=True, impl="splash", seq_len=128) == "xla"  # decode with a cache
    assert choose_impl(jnp.bfloat16, has_offset=True, impl="cudnn") == "xla"  # decode masks need the XLA path
    assert choose_impl(jnp.float32, has_offset=False, impl="cudnn") == "cudnn"  # explicit override is honoured
    with pytest.raises(ValueError, match="unknown attention implementation"):
        choose_impl(jnp.float32, False, impl="flash")
    with pytest.raises(ValueError, match="must divide"):
        attention(jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))
