import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nanochat_jax.data.dataloader import split_rows
from nanochat_jax.model.gpt import GPT
from nanochat_jax.training.optim import build_optimizer
from nanochat_jax.model.sharding import make_mesh
from nanochat_jax.training.trainer import Trainer

CFG = tiny_config(n_embd=64, n_head=2, n_kv_head=1, n_layer=2, vocab_size=100)


def make_model():
    return GPT(CFG, rngs=nnx.Rngs(0))


def run_steps(mesh, batches, schedule=((1.0, 0.85), (0.5, 0.9))):
    trainer = Trainer.create(make_model, build_optimizer(CFG.n_embd), mesh)
    state = trainer.init_state(make_model)
    params, opt_state = state.params, state.opt_state
    losses = []
    for batch, (lrm, mom) in zip(batches, schedule):
        params, opt_state, out = trainer.run_step(params, opt_state, jax.device_put(batch, trainer.batch_sharding()),
                                                  lrm, mom)
        losses.append(float(out["loss"]))
    return trainer, jax.tree.map(np.asarray, params), losses


def random_batches(accum, rows, n=2, seq=17, seed=0):
    rng = np.random.default_rng(seed)
    return [split_rows(rng.integers(0, 100, (accum, rows, seq)).astype(np.int32)) for _ in range(n)]


@pytest.mark.parametrize("spec", ["data:8", "fsdp:8", "data:2,fsdp:4"])
def test_sharded_step_equals_single_device(spec):
    batches = random_batches(1, 8)
    _, ref_params, ref_losses = run_steps(make_mesh(devices=jax.devices()[:1]), batches)
    trainer, params, losses = run_steps(make_mesh(spec), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # bf16 Newton-Schulz can flip a rounding between layouts: compare parameters to a fraction of one update
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=5e-4)
    # optimizer state is split over all 8 devices (ZeRO-1 under pure data parallelism)
    muon_buf = jax.tree.leaves(trainer.opt_sharding)
    assert any(s.spec and s.spec[0] == ("data", "fsdp") for s in muon_buf)


def test_gradient_accumulation_equals_large_batch():
    big = random_batches(1, 8, seed=3)
    split = [{k: v.reshape(2, 4, -1) for k, v in b.items()} for b in big]  # the same rows as 2 micro-steps of 4
    _, params_big, losses_big = run_steps(make_mesh("data:4", devices=jax.devices()[:4]), big)
    _, params_acc, losses_acc = run_steps(make_mesh("data:4", devices=jax.devices()[:4]), split)
    np.testing.assert_allclose(losses_acc, losses_big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_acc), jax.tree.leaves(params_big)):
        np.testing.assert_allclose(a, b, atol=5e-4)


def test_step_compiles_once_and_learns():
    batches = random_batches(1, 8, n=1) * 6  # the same batch again and again: the loss must fall
    schedule = [(1.0 - 0.1 * i, 0.85 + 0.01 * i) for i in range(6)]
    trainer, _, losses = run_steps(make_mesh("data:8"), batches, schedule)
    assert trainer.step._cache_size() == 1  # new schedule values did not recompile
    assert losses[-1] < losses[0] - 0.5


def test_loss_sums_and_bits_per_byte_by_hand():
    from conftest import randomize
    from nanochat_jax.evaluation.bits_per_byte import bits_per_byte, loss_sums
    trainer = Trainer.create(make_model, build_optimizer(CFG.n_embd), make_mesh("data:8"))
    params = nnx.to_pure_dict(nnx.state(randomize(make_model())))
    rng = np.random.default_rng(5)
    batches = [split_rows(rng.integers(0, 100, (8, 13)).astype(np.int32)) for _ in range(3)]
    batches[0]["targets"][:, :4] = -1  # ignored targets
    token_bytes = rng.integers(0, 4, 100)  # some tokens count 0 bytes (special tokens)
    sums = loss_sums(trainer.model(params), iter(batches), 2, token_bytes)  # the first two only

    nats = bpb_nats = 0.0
    tokens = n_bytes = 0
    for batch in batches[:2]:
        logits = np.asarray(trainer.model(params)(jnp.asarray(batch["inputs"])), np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        for (r, t), y in np.ndenumerate(batch["targets"]):
            if y >= 0:
                loss = logz[r, t] - logits[r, t, y]
                nats, tokens = nats + loss, tokens + 1
                if token_bytes[y] > 0:
                    bpb_nats, n_bytes = bpb_nats + loss, n_bytes + token_bytes[y]
    assert sums["tokens"] == tokens and sums["bytes"] == n_bytes
    assert sums["nats"] == pytest.approx(nats, rel=1e-5) and sums["bpb_nats"] == pytest.approx(bpb_nats, rel=1e-5)
    assert bits_per_byte(sums) == pytest.approx(bpb_nats / (np.log(2) * n_bytes), rel=1e-5)
