import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nanochat_jax.model.gpt import GPT
from nanochat_jax.model.gpt import config_from_depth
from nanochat_jax.training.optim import (MODERN_MUON, MuonVariant, Schedule, auto_batch, build_optimizer, lr_multiplier, muon,
                                muon_momentum, orthogonalize, param_label, set_schedule)


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


POLAR = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
         (4.042929935166739, -2.808917465908714, 0.5000178451051316),
         (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
         (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
         (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def numpy_modern_muon_step(W, G, buf, v2, lr, momentum, wd, beta2, variant):
    """nanochat's current Muon step on torch-layout weights W [out, in] (float64): Nesterov, MuonEq, Polar
    Express, Muon+, NorMuon, cautious weight decay; each part per the variant."""
    buf = buf + (1 - momentum) * (G - buf)
    X = G + momentum * (buf - G)
    out_, in_ = W.shape
    if variant.row_equilibration:
        X = X * (np.linalg.norm(X) / np.sqrt(out_) / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-6))
    coeffs = POLAR if variant.polar_express else [(3.4445, -4.7750, 2.0315)] * 5
    X = X / (np.linalg.norm(X) * 1.01 + 1e-6) if variant.polar_express else X / (np.linalg.norm(X) + 1e-7)
    for a, b, c in coeffs:
        if out_ > in_:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    if variant.renormalize:
        X = X * np.sqrt(min(out_, in_)) / max(np.linalg.norm(X), 1e-6)
    if variant.normuon_beta2 is not None:
        red = 1 if out_ >= in_ else 0
        v_mean = (X * X).mean(axis=red, keepdims=True)
        n = X.shape[red]
        v_norm = np.sqrt(v_mean.sum() * n)
        v2 = v2 + (1 - beta2) * (v_mean - v2)
        step = 1 / np.sqrt(np.maximum(v2, 1e-10))
        X = X * step * v_norm / max(np.sqrt((v_mean * n * step ** 2).sum()), 1e-10)
    lr = lr * max(1.0, out_ / in_) ** 0.5
    decay = wd * W * ((X * W) >= 0) if variant.cautious_weight_decay else 0
    return W - lr * X - lr * decay, buf, v2


@pytest.mark.parametrize("variant", [MuonVariant(polar_express=True), MuonVariant(normuon_beta2=0.9),
                                     MuonVariant(cautious_weight_decay=True), MODERN_MUON])
@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])  # our kernels [in, out]
def test_modern_muon_matches_numpy(variant, shape):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(shape).astype(np.float32)
    tx = muon(0.02, 0.9, variant=variant, weight_decay=0.3, dtype=jnp.float32)
    state, params = tx.init({"w": jnp.asarray(kernel)}), {"w": jnp.asarray(kernel)}
    W, buf = kernel.T.astype(np.float64), np.zeros(kernel.T.shape)
    v2 = np.zeros((W.shape[0], 1) if W.shape[0] >= W.shape[1] else (1, W.shape[1]))
    for _ in range(3):  # three steps, so NorMuon's second moment and the momentum carry over
        grad = rng.standard_normal(shape).astype(np.float32)
        updates, state = tx.update({"w": jnp.asarray(grad)}, state, params)
        params = {"w": params["w"] + updates["w"]}
        W, buf, v2 = numpy_modern_muon_step(W, grad.T.astype(np.float64), buf, v2, 0.02, 0.9, 0.3, 0.9, variant)
    np.testing.assert_allclose(np.asarray(params["w"]), W.T, rtol=1e-4, atol=1e-5)
    if variant.normuon_beta2 is not None:
        np.testing.assert_allclose(np.asarray(state.second_moment["w"]).ravel(), v2.ravel(), rtol=1e-4)


def test_polar_express_singular_values():
    """Polar Express lands the singular values of a badly conditioned matrix closer to 1 than the fixed quintic."""
    g = jax.random.normal(jax.random.key(0), (64, 256)) * jnp.linspace(0.01, 10, 256)
    quintic = np.linalg.svd(np.asarray(orthogonalize(g), np.float32), compute_uv=False)
    polar = np.linalg.svd(np.asarray(orthogonalize(g, polar_express=True), np.float32), compute_uv=False)
    assert polar.min() > 0.75 and polar.max() < 1.2
    assert np.abs(polar - 1).mean() < 0.6 * np.abs(quintic - 1).mean()


def test_modern_groups_and_schedule():
    cfg = config_from_depth(2, 200, 64, recipe="modern")
    params = nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0))))
    tx = build_optimizer(cfg.n_embd, 0.3, 0.008, 0.02, 0.28, grad_clip=0.0, recipe="modern", lr_scale=2.0)
    state = set_schedule(tx.init(params), 0.5, 0.95, 0.0)
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).standard_normal(p.shape), jnp.float32), params)
    zero = jax.tree.map(jnp.zeros_like, params)  # zero weights: weight decay moves nothing, Adam moves lr x sign
    update = jax.jit(lambda state, params: tx.update(grads, state, params)[0])  # (one compile, not op by op)
    updates = update(state, zero)
    w = (cfg.n_embd / 768) ** -0.5
    expected = {"wte": 0.3 * 2 * w, "value_embeds": 0.15 * 2 * w, "resid_lambdas": 0.005 * 2, "x0_lambdas": 0.5 * 2,
                "smear_lambda": 0.2, "backout_lambda": 0.2}  # smear's group is not batch-scaled (nanochat's)
    for name, lr in expected.items():
        np.testing.assert_allclose(np.abs(np.asarray(updates[name])), lr * 0.5, rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(updates["lm_head"]["kernel"])), 0.008 * 2 * w * 0.5, rtol=1e-4)
    # the Muon weight decay follows its multiplier: 0 here, so nonzero weights move by the update only
    ones = jax.tree.map(jnp.ones_like, params)
    u_off, u_on = update(state, ones), update(set_schedule(state, 0.5, 0.95, 1.0), ones)
    diff = np.asarray(u_off["h"]["mlp"]["c_proj"]["kernel"] - u_on["h"]["mlp"]["c_proj"]["kernel"])
    assert diff.min() >= 0 and 0 < diff.max() <= 0.02 * 2 * 0.5 * 0.28 + 1e-7

    s = Schedule(1000, warmdown_ratio=0.65, final_lr_frac=0.05, warmup_steps=40, modern=True)
    assert s(0)[0] == pytest.approx(1 / 40) and s(39)[0] == 1.0 and s(350)[0] == 1.0
    assert s(1000)[0] == pytest.approx(0.05) and s(675)[0] == pytest.approx(0.5 + 0.5 * 0.05)
    assert s(0)[1] == pytest.approx(0.85) and s(200)[1] == pytest.approx(0.91) and s(340)[1] < s(349)[1] < 0.97
    assert s(400)[1] == pytest.approx(0.97 * (1 - 50 / 650) + 0.90 * 50 / 650) and s(1000)[1] == pytest.approx(0.90)
    assert s(0)[2] == 1.0 and s(500)[2] == pytest.approx(0.5) and s(1000)[2] == pytest.approx(0.0)
    assert Schedule(100)(50) == (1.0, muon_momentum(50), 1.0)


def test_auto_batch_matches_nanochat():
    """nanochat's published sizing at its speedrun ratio 8: d12 trains on 2^19 tokens a step, d24 on 2^20."""
    ref = config_from_depth(12, 32768, 2048, recipe="modern").scaling_params()
    assert auto_batch(ref, ref, 8, 0.28) == (2 ** 19, 1.0, 0.28)
    d24 = config_from_depth(24, 32768, 2048, recipe="modern").scaling_params()
    batch, lr_scale, wd = auto_batch(d24, ref, 8, 0.28)
    assert batch == 2 ** 20 and lr_scale == pytest.approx(2 ** 0.5)
    assert wd == pytest.approx(0.28 * 2 ** 0.5 * ref / d24)


def test_classic_state_keeps_its_checkpoint_layout():
    """Training checkpoints of earlier versions resume: the classic optimizer state has the same tree as before the
    modern recipe (no NorMuon moments, no weight-decay multiplier); the modern one has both."""
    params = nnx.to_pure_dict(nnx.state(GPT(tiny_config(), rngs=nnx.Rngs(0))))
    classic = build_optimizer(64).init(params)
    assert set(classic.hyperparams) == {"lr_multiplier", "muon_momentum"}
    layout = str(jax.tree_util.tree_structure(classic))
    assert "namedtuple[MuonState]" in layout and "NorMuonState" not in layout
    modern_params = nnx.to_pure_dict(nnx.state(GPT(config_from_depth(2, 100, 32, recipe="modern"), rngs=nnx.Rngs(0))))
    modern = build_optimizer(128, recipe="modern").init(modern_params)
    assert set(modern.hyperparams) == {"lr_multiplier", "muon_momentum", "wd_multiplier"}
    assert "namedtuple[NorMuonState]" in str(jax.tree_util.tree_structure(modern))
