"""The modern recipe's model switches, each against the numpy reference of the same formula (tests/reference.py),
windows in training and in cached decoding, its init and its sizes against nanochat's published numbers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import cached_step, logits_of
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT, MODERN_SWITCHES, GPTConfig, config_from_depth, init_cache, modern_config
from nanochat_jax.model.interop import state_dict_to_params
from reference import gpt_forward, random_state_dict

# sequence_len 512: the short window is 128, so rows of 160 tokens see it
BASE = dict(sequence_len=512, vocab_size=128, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)


def load(cfg: dict, seed=0, std=0.3):
    sd = random_state_dict(cfg, seed=seed, std=std)
    model = GPT(GPTConfig(**cfg), rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, state_dict_to_params(sd, model.config)))
    nnx.update(model, state)
    return model, sd


@pytest.mark.parametrize("switch,T", [(dict(rope_base=100000.0), 24), (dict(qk_scale=1.2), 24),
                                      (dict(window_pattern="SSL"), 160), (dict(value_embeds=True), 24),
                                      (dict(value_embeds=True, n_layer=4), 24), (dict(residual_scalars=True), 24),
                                      (dict(smear=True), 24), (dict(backout=True), 24),
                                      (dict(MODERN_SWITCHES, n_layer=4, recipe="modern"), 160)])
def test_each_switch_matches_numpy(switch, T):
    cfg = BASE | switch
    model, sd = load(cfg, std=0.2)
    idx = np.random.default_rng(1).integers(0, cfg["vocab_size"], (2, T))
    expected = gpt_forward(sd, cfg, idx)
    out = np.asarray(logits_of(model, jnp.asarray(idx)), np.float64)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4
    np.testing.assert_allclose(out, expected, atol=2e-4)
    if "window_pattern" in cfg:  # the windows matter here: without them the logits are far off
        no_window = gpt_forward(sd, dict(cfg, window_pattern=None), idx)
        assert np.abs(no_window[:, 140:] - expected[:, 140:]).max() > 1e-2


def test_cached_decoding_with_every_switch():
    """Prefill then one token at a time (windows, smear's previous token from the cache's token record, value
    embeddings), rows at different positions: the full forward's logits."""
    cfg = BASE | MODERN_SWITCHES | dict(n_layer=4, recipe="modern")
    model, sd = load(cfg, std=0.2)
    idx = np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, 150))
    expected = gpt_forward(sd, cfg, idx)
    cache = init_cache(model.config, 2, 256)
    assert cache["tokens"].shape == (1, 2, 256)
    # row 1 starts 10 tokens later: its prefill covers 0..129, row 0's 0..139 (padded rows of one shape)
    logits, cache = cached_step(model, jnp.asarray(idx[:, :140]), cache, jnp.array([0, 0]))
    np.testing.assert_allclose(np.asarray(logits[0]), expected[0, :140], atol=2e-4)
    pos = np.array([140, 130])
    for _ in range(10):
        tok = jnp.asarray(idx[np.arange(2), pos][:, None])
        logits, cache = cached_step(model, tok, cache, jnp.asarray(pos))
        np.testing.assert_allclose(np.asarray(logits[:, 0]), expected[np.arange(2), pos], atol=2e-4)
        pos = pos + 1


def test_engine_greedy_matches_the_full_forward(tokenizer):
    cfg = modern_config(GPTConfig(sequence_len=512, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                                  n_kv_head=1, n_embd=64))
    model, _ = load(dataclasses.asdict(cfg), std=0.2)
    prompt = tokenizer.encode("the cat sat", prepend=tokenizer.get_bos_token_id())
    got = Engine(model, tokenizer).generate_batch(prompt, max_tokens=6, temperature=0.0)[0][0][len(prompt):]
    ids = list(prompt)
    for _ in range(len(got)):
        ids.append(int(np.argmax(np.asarray(logits_of(model, jnp.asarray([ids])))[0, -1])))
    assert got == ids[len(prompt):]


def test_modern_init():
    cfg = config_from_depth(4, 1000, 512, recipe="modern")
    m = GPT(cfg, rngs=nnx.Rngs(0))
    C, s = cfg.n_embd, (3 / cfg.n_embd) ** 0.5
    assert cfg.recipe == "modern" and cfg.window_sizes() == [128, 128, 128, 512]
    assert abs(float(jnp.std(m.wte[...])) - 0.8) < 0.02 and abs(float(jnp.std(m.lm_head.kernel[...])) - 1e-3) < 1e-4
    for kernel, bound in ((m.h.attn.c_q.kernel, s), (m.h.attn.c_v.kernel, s), (m.h.mlp.c_fc.kernel, 0.4 * s),
                          (m.value_embeds, s)):
        k = np.asarray(kernel[...])
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
    assert not np.any(np.asarray(m.h.attn.c_proj.kernel[...])) and not np.any(np.asarray(m.h.mlp.c_proj.kernel[...]))
    np.testing.assert_allclose(np.asarray(m.resid_lambdas[...]), [1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m.x0_lambdas[...]), [0.20, 0.15, 0.10, 0.05], rtol=1e-6)
    assert float(m.smear_lambda[0]) == 0 and float(m.backout_lambda[0]) == pytest.approx(0.2)
    gate = np.asarray(m.h.attn.ve_gate.kernel[...])  # layers 1 and 3 have a value embedding (the last always)
    assert cfg.ve_layers() == [1, 3] and m.value_embeds.shape == (2, 1024, C)
    assert not gate[[0, 2]].any() and (gate[[1, 3]] > 0).all() and gate.max() < 0.02
    assert 0 <= float(m.smear_gate.kernel[...].min()) and float(m.smear_gate.kernel[...].max()) < 0.02
    # every parameter of the tree is counted once (the zero gates of layers without a value embedding aside)
    stored = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(m))))
    assert stored - cfg.num_params() == 2 * 12 * cfg.n_kv_head


def test_sizes_match_nanochat():
    """nanochat's current d20 has 896.5M parameters and d24 1,384M (vocabulary 32768); its window pattern SSSL at
    2048 has a short window of 512 (its code's -(-2048 // 4 // 128) * 128; a comment there says 768); classic
    configs are unchanged."""
    d20, d24 = (config_from_depth(d, 32768, 2048, recipe="modern") for d in (20, 24))
    assert round(d20.num_params() / 1e5) == 8965 and round(d24.num_params() / 1e6) == 1384
    assert d24.window_sizes()[:4] == [512, 512, 512, 2048] and d24.window_sizes()[-1] == 2048
    classic = config_from_depth(20, 65536)
    assert classic.recipe == "classic" and classic.window_sizes() == [None] * 20 and classic.ve_layers() == []
    assert classic == GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")


def test_every_remat_policy_gives_the_same_gradients_with_every_switch(monkeypatch):
    """The policies name what the backward pass keeps; with windows (one branch per window), value embeddings and the
    residual scalars the loss and gradients are those of a backward pass that keeps everything."""
    from nanochat_jax.model import gpt
    monkeypatch.setitem(gpt.REMAT_POLICIES, "everything", jax.checkpoint_policies.everything_saveable)
    cfg = GPTConfig(**(BASE | MODERN_SWITCHES | dict(n_layer=4, recipe="modern")))
    idx = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 161)))
    reference, _ = load(dataclasses.asdict(cfg), std=0.2)
    results = {}
    for policy in ("everything", "none", "dots", "full"):
        model = GPT(cfg, rngs=nnx.Rngs(0), remat=policy)
        nnx.update(model, nnx.state(reference))
        graphdef, state = nnx.split(model)
        results[policy] = jax.jit(jax.value_and_grad(lambda s: nnx.merge(graphdef, s)(idx[:, :-1], idx[:, 1:])))(state)
    for policy in ("none", "dots", "full"):
        np.testing.assert_allclose(float(results[policy][0]), float(results["everything"][0]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(results[policy][1]), jax.tree.leaves(results["everything"][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_recipe_is_named_not_guessed():
    """A switch turned on by hand changes that switch only (not the init, nor the recipe); a checkpoint's meta names
    its recipe, and one written before it did is read by the rule of its time."""
    import dataclasses
    from nanochat_jax.model.gpt import config_from_meta
    plain = GPTConfig(**BASE)
    one = GPTConfig(**BASE, qk_scale=1.2)
    assert one.recipe == "classic"
    a, b = (nnx.to_pure_dict(nnx.state(GPT(c, rngs=nnx.Rngs(0)))) for c in (plain, one))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # the same init
    modern = config_from_depth(4, 1000, 512, recipe="modern")
    saved = dataclasses.asdict(modern)
    assert saved["recipe"] == "modern" and config_from_meta(saved) == modern
    assert config_from_meta({k: v for k, v in saved.items() if k != "recipe"}) == modern  # an earlier checkpoint
    classic = dataclasses.asdict(config_from_depth(4, 1000, 512))
    assert config_from_meta({k: v for k, v in classic.items() if k != "recipe"}).recipe == "classic"
    with pytest.raises(ValueError, match="unknown recipe"):
        GPTConfig(**BASE, recipe="nosuch")
