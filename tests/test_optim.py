import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nanochat_jax.gpt import GPT
from nanochat_jax.optim import build_optimizer, lr_multiplier, muon, muon_momentum, orthogonalize, param_label, set_schedule


def numpy_newton_schulz(g, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def numpy_muon_step(param, grad, buf, lr, momentum):
    """nanochat's Muon on a torch-layout weight W [out, in]: buf.lerp_(g, 1-m); g.lerp_(buf, m); NS; scale
    sqrt(max(1, out/in))."""
    buf = buf + (1 - momentum) * (grad - buf)
    g = grad + momentum * (buf - grad)
    update = numpy_newton_schulz(g) * max(1.0, param.shape[0] / param.shape[1]) ** 0.5
    return param - lr * update, buf


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (48, 48)])  # our kernels [in, out]
def test_muon_matches_numpy(shape):
    rng = np.random.default_rng(0)
    kernel, buf = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    grad = rng.standard_normal(shape).astype(np.float32)
    tx = muon(0.02, 0.9)
    state = tx.init({"w": jnp.asarray(kernel)})._replace(momentum={"w": jnp.asarray(buf)})
    updates, state = tx.update({"w": jnp.asarray(grad)}, state)
    # numpy works on torch's layout: W = kernel.T
    expected_w, expected_buf = numpy_muon_step(kernel.T.astype(np.float64), grad.T, buf.T, 0.02, 0.9)
    np.testing.assert_allclose(np.asarray(state.momentum["w"]), expected_buf.T, rtol=1e-6, atol=1e-6)
    got, expected = np.asarray(updates["w"]), expected_w.T - kernel
    # Newton-Schulz runs in bf16, as nanochat's, and the iteration amplifies rounding: a few percent overall
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.1
    # the same iteration in fp32 is exact
    ns32 = np.asarray(orthogonalize(jnp.asarray(grad.T), dtype=jnp.float32), np.float64)
    np.testing.assert_allclose(ns32, numpy_newton_schulz(grad.T.astype(np.float64)), rtol=1e-4, atol=1e-5)


def test_orthogonalized_singular_values_near_one():
    g = jax.random.normal(jax.random.key(0), (64, 256)) * jnp.linspace(0.01, 10, 256)  # badly conditioned
    s = np.linalg.svd(np.asarray(orthogonalize(g), np.float32), compute_uv=False)
    assert s.min() > 0.5 and s.max() < 1.5
    s_tall = np.linalg.svd(np.asarray(orthogonalize(g.T), np.float32), compute_uv=False)
    np.testing.assert_allclose(s_tall, s, atol=0.02)


def test_groups_and_learning_rates():
    cfg = tiny_config(n_embd=128, n_head=1, n_kv_head=1)
    params = nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0))))
    labels = jax.tree_util.tree_map_with_path(lambda p, _: param_label(p), params)
    assert labels["wte"] == "embedding" and labels["lm_head"]["kernel"] == "unembedding"
    assert {labels["h"]["attn"][n]["kernel"] for n in ("c_q", "c_k", "c_v", "c_proj")} == {"matrix"}
    assert labels["h"]["mlp"]["c_fc"]["kernel"] == "matrix"

    tx = build_optimizer(cfg.n_embd, grad_clip=0.0)
    state = set_schedule(tx.init(params), 0.5, 0.95)
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).standard_normal(p.shape), jnp.float32), params)
    updates, _ = tx.update(grads, state, params)
    scale = (128 / 768) ** -0.5
    # Adam's first step moves each weight by lr * sign(grad)
    np.testing.assert_allclose(np.abs(np.asarray(updates["wte"])), 0.2 * scale * 0.5, rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(updates["lm_head"]["kernel"])), 0.004 * scale * 0.5, rtol=1e-4)
    # Muon: lr 0.02 x 0.5, orthogonalized; c_fc [128, 512] also gets sqrt(512/128) = 2
    for name, factor in (("c_fc", 2.0), ("c_proj", 1.0)):
        for layer in range(cfg.n_layer):  # the blocks' kernels are stacked [layers, in, out]: each one on its own
            u = np.asarray(updates["h"]["mlp"][name]["kernel"][layer]) / (0.02 * 0.5 * factor)
            s = np.linalg.svd(u, compute_uv=False)
            assert 0.5 < s.min() and s.max() < 1.5


def test_muon_orthogonalizes_each_stacked_layer_on_its_own():
    g = jnp.asarray(np.random.default_rng(2).standard_normal((3, 16, 40)), jnp.float32)
    tx = muon(0.1, momentum=0.0)
    stacked, _ = tx.update({"w": g}, tx.init({"w": g}))
    for layer in range(3):
        single, _ = tx.update({"w": g[layer]}, tx.init({"w": g[layer]}))
        np.testing.assert_allclose(np.asarray(stacked["w"][layer]), np.asarray(single["w"]), rtol=1e-6, atol=1e-6)


def test_grad_clipping():
    params = {"wte": jnp.zeros((4, 4)), "lm_head": {"kernel": jnp.zeros((4, 4))}, "h": {0: {"w": jnp.zeros((4, 4))}}}
    tx = build_optimizer(768, grad_clip=1.0)
    state = tx.init(params)
    big = jax.tree.map(lambda p: jnp.full(p.shape, 10.0), params)
    _, state = tx.update(big, state, params)
    mu = state.inner_state[1].inner_states["embedding"].inner_state[0].mu["wte"]
    # the clipped gradient has global norm 1 over 48 entries: each 1/sqrt(48); Adam's mu = (1 - 0.8) * g
    np.testing.assert_allclose(np.asarray(mu), 0.2 / np.sqrt(48), rtol=1e-5)


def test_schedules():
    assert [lr_multiplier(s, 100) for s in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(90, 100) == pytest.approx(0.5) and lr_multiplier(100, 100) == 0.0
    assert lr_multiplier(90, 100, final_lr_frac=0.1) == pytest.approx(0.55)
    assert lr_multiplier(0, 100, warmup_ratio=0.1) == pytest.approx(0.1)
    assert muon_momentum(0) == pytest.approx(0.85) and muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(5000) == pytest.approx(0.95)
