import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import logits_of, randomize, tiny_config
from nanochat_jax.checkpoint import Checkpointer, load_model, model_meta
from nanochat_jax.gpt import GPT
from nanochat_jax.sharding import make_mesh, param_shardings


def test_save_on_one_mesh_load_on_another(tmp_path, tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size())
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    state = jax.device_put(state, param_shardings(state, make_mesh("data:8")))
    checkpointer = Checkpointer(str(tmp_path / "run"), max_to_keep=2)
    checkpointer.save_tokenizer(tokenizer)
    for step in (10, 20, 30):
        checkpointer.save(step, {"params": nnx.to_pure_dict(state)}, model_meta(cfg, step, val_bpb=1.5))
    checkpointer.wait()
    assert checkpointer.manager.all_steps() == [20, 30]  # keeps the last two

    loaded, tok, meta = load_model(str(tmp_path / "run"), mesh=make_mesh("data:2,fsdp:4"))
    assert meta == model_meta(cfg, 30, val_bpb=1.5)
    assert tok.encode("hello") == tokenizer.encode("hello")
    assert loaded.h[0].mlp.c_fc.kernel[...].sharding.spec[0] == "fsdp"
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    idx = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)))
    np.testing.assert_allclose(np.asarray(logits_of(loaded, idx)), np.asarray(logits_of(model, idx)), atol=1e-5)

    with pytest.raises(FileNotFoundError, match="steps present: \\[20, 30\\]"):
        load_model(str(tmp_path / "run"), step=10)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(str(tmp_path / "empty"))
