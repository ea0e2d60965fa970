import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import cached_step, logits_of, randomize, tiny_config
from nanochat_jax.model.gpt import (GPT, GPTConfig, apply_rope, config_from_depth, cross_entropy, init_cache, rms_norm,
                              rope_tables)
from nanochat_jax.model import gpt
from nanochat_jax.model.interop import state_dict_to_params
from nanochat_jax.model.sharding import batch_sharding, create_sharded, make_mesh, param_shardings
from reference import bf16_round, gpt_forward, random_state_dict, rope_angles, rotate


def model_from_state_dict(sd, cfg, dtype=jnp.float32):
    model = GPT(GPTConfig(**cfg), rngs=nnx.Rngs(0), dtype=dtype)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, state_dict_to_params(sd, model.config)))
    nnx.update(model, state)
    return model


def test_rope_matches_numpy():
    T, D = 50, 16
    angles = rope_angles(T, D)
    cos, sin = rope_tables(jnp.arange(T)[None], D)
    # tables are nanochat's: fp32 angles, rounded to bf16
    np.testing.assert_allclose(np.asarray(cos[0], np.float64), np.cos(angles), atol=2 ** -8)
    np.testing.assert_allclose(np.asarray(sin[0], np.float64), np.sin(angles), atol=2 ** -8)
    x = np.random.default_rng(0).standard_normal((2, T, 3, D))
    c, s = bf16_round(np.cos(angles.astype(np.float32))), bf16_round(np.sin(angles.astype(np.float32)))
    out = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)[None], jnp.asarray(s, jnp.float32)[None])
    np.testing.assert_allclose(np.asarray(out), rotate(x, c, s), rtol=1e-5, atol=1e-5)
    # a rotation keeps each pair's norm, and position 0 is the identity
    np.testing.assert_allclose(np.asarray(out[:, 0]), x[:, 0], atol=1e-6)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_forward_matches_numpy_reference(n_kv_head):
    cfg = dict(sequence_len=16, vocab_size=70, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)  # 70 -> pad 128
    sd = random_state_dict(cfg, seed=n_kv_head)
    idx = np.random.default_rng(1).integers(0, 70, (2, 11))
    logits = logits_of(model_from_state_dict(sd, cfg), jnp.asarray(idx))
    assert logits.shape == (2, 11, 70) and logits.dtype == jnp.float32
    expected = gpt_forward(sd, cfg, idx)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_causality():
    model = randomize(GPT(tiny_config(), rngs=nnx.Rngs(0)))
    idx = np.random.default_rng(0).integers(0, 100, (1, 12))
    base = np.asarray(logits_of(model, jnp.asarray(idx)))
    for t in (0, 5, 11):
        changed = idx.copy()
        changed[0, t] = (changed[0, t] + 1) % 100
        out = np.asarray(logits_of(model, jnp.asarray(changed)))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = randomize(GPT(tiny_config(n_kv_head=2), rngs=nnx.Rngs(0)))
    mha = GPT(tiny_config(n_kv_head=4), rngs=nnx.Rngs(1))
    g = nnx.to_pure_dict(nnx.state(gqa))
    D = gqa.config.head_dim

    def repeat_heads(kernel):  # [L, C, K*D] -> [L, C, N*D], each kv head serving its group of query heads
        L, C = kernel.shape[:2]
        return jnp.repeat(kernel.reshape(L, C, 2, D), 2, axis=2).reshape(L, C, 4 * D)

    for name in ("c_k", "c_v"):
        g["h"]["attn"][name]["kernel"] = repeat_heads(g["h"]["attn"][name]["kernel"])
    state = nnx.state(mha)
    nnx.replace_by_pure_dict(state, g)
    nnx.update(mha, state)
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 9)))
    np.testing.assert_allclose(np.asarray(logits_of(mha, idx)), np.asarray(logits_of(gqa, idx)), rtol=1e-5, atol=1e-5)


def test_loss_with_ignored_targets_matches_numpy():
    model = randomize(GPT(tiny_config(), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 100, (2, 10)), rng.integers(0, 100, (2, 10))
    targets[0, :4] = -1
    targets[1, 7] = -1
    logits = np.asarray(model(jnp.asarray(idx)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    valid = targets != -1
    per_token = np.where(valid, -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0], 0)
    np.testing.assert_allclose(float(model(jnp.asarray(idx), jnp.asarray(targets))), per_token.sum() / valid.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(idx), jnp.asarray(targets), loss_reduction="none")),
                               per_token, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        cross_entropy(jnp.zeros((1, 1, 3)), jnp.zeros((1, 1), jnp.int32), "sum")


def test_fresh_model_predicts_uniform():
    """lm_head starts at zero, so every logit is 0 and the loss is exactly ln(vocab)."""
    model = GPT(tiny_config(), rngs=nnx.Rngs(0))
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 8)))
    np.testing.assert_allclose(float(model(idx, idx)), np.log(100), rtol=1e-6)


def test_init_and_sizes():
    cfg = tiny_config(n_embd=128, n_head=2, n_kv_head=1)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert cfg.padded_vocab_size == 128
    assert model.wte[...].shape == (128, 128) and abs(float(model.wte[...].std()) - 1.0) < 0.02
    c_fc = model.h.mlp.c_fc.kernel[...]  # [layers, in, out]; fan_in 128, fan_out 512: std 1/sqrt(128)
    assert c_fc.shape == (2, 128, 512)
    assert abs(float(c_fc.std()) * np.sqrt(128) - 1.0) < 0.02
    assert not np.allclose(c_fc[0], c_fc[1])  # each layer has its own draw
    c_k = model.h.attn.c_k.kernel[...]  # fan_out 64 < fan_in 128: std 1/sqrt(128) * sqrt(64/128)
    assert abs(float(c_k.std()) / (128 ** -0.5 * 0.5 ** 0.5) - 1.0) < 0.05
    for zero in (model.lm_head.kernel, model.h.attn.c_proj.kernel, model.h.mlp.c_proj.kernel):
        assert not np.any(np.asarray(zero[...]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model)))


def test_depth_config_and_flops():
    cfg = config_from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (1280, 10, 10, 128)
    assert cfg.num_params() == 560_988_160  # nanochat's d20 logs "Number of parameters: 560,988,160"
    non_embedding = 560_988_160 - 65536 * 1280
    assert cfg.flops_per_token() == 6 * non_embedding + 12 * 20 * 10 * 128 * 2048
    with pytest.raises(ValueError):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=64)


def test_cached_decoding_matches_full_forward():
    cfg = tiny_config()
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)))
    idx = np.random.default_rng(0).integers(0, 100, (2, 12))
    full = np.asarray(logits_of(model, jnp.asarray(idx)))
    cache = init_cache(cfg, batch_size=2, max_len=16)
    pos = jnp.zeros(2, jnp.int32)
    logits, cache = cached_step(model, jnp.asarray(idx[:, :5]), cache, pos)  # prefill
    chunks = [np.asarray(logits)]
    for start, stop in ((5, 6), (6, 9), (9, 10), (10, 12)):  # single tokens and chunks
        logits, cache = cached_step(model, jnp.asarray(idx[:, start:stop]), cache, jnp.full(2, start, jnp.int32))
        chunks.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-5, atol=1e-5)


def test_cached_rows_at_different_positions():
    """Two sequences of different lengths decode side by side (continuous batching) and match their own forwards."""
    cfg = tiny_config(n_kv_head=1)
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 100, (1, 7)), rng.integers(0, 100, (1, 4))
    cache = init_cache(cfg, batch_size=2, max_len=10)
    b_padded = np.concatenate([b[:, :3], np.zeros((1, 3), int)], axis=1)
    _, cache = cached_step(model, jnp.asarray(np.concatenate([a[:, :6], b_padded])), cache, jnp.zeros(2, jnp.int32))
    # row 1 only really holds its first 3 tokens: its next token goes at position 3, overwriting the padding
    step = jnp.asarray(np.array([[a[0, 6]], [b[0, 3]]]))
    logits, _ = cached_step(model, step, cache, jnp.array([6, 3]))
    np.testing.assert_allclose(np.asarray(logits[0, 0]), np.asarray(logits_of(model, jnp.asarray(a)))[0, 6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[1, 0]), np.asarray(logits_of(model, jnp.asarray(b)))[0, 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["data:8", "fsdp:8", "data:2,fsdp:4"])
def test_sharded_forward_equals_single_device(spec):
    cfg = tiny_config(n_kv_head=1)
    make = lambda: randomize(GPT(cfg, rngs=nnx.Rngs(0)))  # noqa: E731
    single = make()
    idx = np.random.default_rng(0).integers(0, 100, (8, 16))
    expected = np.asarray(single(jnp.asarray(idx), jnp.asarray(idx), loss_reduction="none"))

    mesh = make_mesh(spec)
    graphdef, state = nnx.split(make())
    state = jax.device_put(state, param_shardings(state, mesh))
    if "fsdp" in spec:  # parameters really are split
        kernel = state["h"]["mlp"]["c_fc"]["kernel"][...]  # [layers, embed, mlp]: embed split, layers whole
        assert kernel.addressable_shards[0].data.shape[:2] == (2, 64 // mesh.shape["fsdp"])

    @jax.jit
    def loss_fn(state, idx):
        return nnx.merge(graphdef, state)(idx, idx, loss_reduction="none")

    out = loss_fn(state, jax.device_put(jnp.asarray(idx), batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_sharded_init_equals_eager_init():
    cfg = tiny_config()
    _, state = create_sharded(lambda: GPT(cfg, rngs=nnx.Rngs(3)), make_mesh("fsdp:8"))
    eager = nnx.state(GPT(cfg, rngs=nnx.Rngs(3)))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eager)):  # same draws (jit may fuse the scaling)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = tiny_config()
    model32 = randomize(GPT(cfg, rngs=nnx.Rngs(0)), std=0.1)
    model16 = GPT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(model16, nnx.state(model32))
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 8)))
    out16 = logits_of(model16, idx)
    assert out16.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16)))
    np.testing.assert_allclose(np.asarray(out16), np.asarray(logits_of(model32, idx)), atol=0.1)


def unrolled_logits(model, idx_BT):
    """The trunk written as a Python loop over layers (no scan), each block on its slice of the stacked parameters."""
    B, T = idx_BT.shape
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), model.config.head_dim)
    x = rms_norm(jnp.take(model.wte[...], idx_BT, axis=0).astype(model.dtype))
    block_def, stacked = nnx.split(model.h)
    for i in range(model.config.n_layer):
        x, _ = nnx.merge(block_def, jax.tree.map(lambda a: a[i], stacked))(x, cos, sin)
    return model._head(x)


def test_scanned_trunk_equals_unrolled_loop_and_training_step():
    cfg = tiny_config(n_layer=3)
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)), std=0.1)
    rng = np.random.default_rng(0)
    idx, targets = jnp.asarray(rng.integers(0, 100, (2, 9))), jnp.asarray(rng.integers(0, 100, (2, 9)))
    np.testing.assert_allclose(np.asarray(logits_of(model, idx)), np.asarray(jax.jit(unrolled_logits)(model, idx)),
                               rtol=1e-6, atol=1e-6)
    # one optimizer step: gradients through the scan equal gradients through the loop
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = optax.sgd(0.5)  # the optimizer is not under test here (bf16 Newton-Schulz would blur the comparison)

    def one_step(forward):
        def loss(p):
            return cross_entropy(forward(nnx.merge(graphdef, p), idx), targets)
        grads = jax.grad(loss)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return grads, optax.apply_updates(params, updates)

    scanned = jax.jit(lambda: one_step(lambda m, i: m(i)))()
    unrolled = jax.jit(lambda: one_step(unrolled_logits))()
    for a, b in zip(jax.tree.leaves(scanned[0]), jax.tree.leaves(unrolled[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(scanned[1]), jax.tree.leaves(unrolled[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_remat_changes_memory_not_numbers(dtype):
    """Every policy keeps less than the plain backward pass and gives its loss and gradients: the unrolled loop, no
    jax.checkpoint anywhere, is the reference (bf16: the same operations, so equal to bf16 rounding)."""
    cfg = tiny_config(n_layer=4, sequence_len=64)
    rng = np.random.default_rng(0)
    idx, targets = jnp.asarray(rng.integers(0, 100, (8, 64))), jnp.asarray(rng.integers(0, 100, (8, 64)))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=0.02, atol=2e-3)

    def loss_and_grads(model, forward):
        graphdef, state = nnx.split(model)
        fn = jax.jit(jax.value_and_grad(lambda s: cross_entropy(forward(nnx.merge(graphdef, s), idx), targets)))
        return fn(state), fn.lower(state).compile().memory_analysis().temp_size_in_bytes

    plain = randomize(GPT(cfg, rngs=nnx.Rngs(0), dtype=dtype), std=0.1)
    (ref_loss, ref_grads), ref_bytes = loss_and_grads(plain, unrolled_logits)
    temp_bytes = {}
    for policy in ("none", "dots", "full"):
        model = GPT(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=policy)
        nnx.update(model, nnx.state(plain))
        (loss, grads), temp_bytes[policy] = loss_and_grads(model, lambda m, i: m(i))
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6 if dtype == jnp.float32 else 1e-3)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    assert temp_bytes["full"] < temp_bytes["dots"] <= temp_bytes["none"] < ref_bytes, (temp_bytes, ref_bytes)
    with pytest.raises(ValueError, match="unknown remat policy"):
        GPT(cfg, rngs=nnx.Rngs(0), remat="some")


def test_chunked_loss_equals_the_whole_sequence_loss(monkeypatch):
    """The training loss runs the head a chunk of positions at a time; with one chunk or four, loss and gradients
    are those of the plain cross-entropy over all logits."""
    cfg = tiny_config(sequence_len=64)
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)), std=0.1)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 100, (2, 64)), rng.integers(0, 100, (2, 64))
    targets[0, :20] = -1
    idx, targets = jnp.asarray(idx), jnp.asarray(targets)
    graphdef, state = nnx.split(model)

    def whole(s):
        return cross_entropy(nnx.merge(graphdef, s)(idx), targets)

    expected_loss, expected_grads = jax.jit(jax.value_and_grad(whole))(state)
    for chunk in (64, 16, 24):  # one chunk; four; 24 does not divide 64, so 16
        monkeypatch.setattr(gpt, "LOSS_CHUNK", chunk)
        loss, grads = jax.jit(jax.value_and_grad(lambda s: nnx.merge(graphdef, s)(idx, targets)))(state)
        np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
