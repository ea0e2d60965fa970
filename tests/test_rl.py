"""RL: advantages, the policy-gradient batch and loss against a hand computation, and a toy task whose reward a
tiny model learns to collect."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize, tiny_config
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT
from nanochat_jax.training.optim import build_optimizer
from nanochat_jax.training.reinforce import Rollouts, policy_batch, rollouts
from nanochat_jax.model.sharding import make_mesh
from nanochat_jax.tasks.base import Task
from nanochat_jax.training.trainer import Trainer, micro_loss

PAD = 99


def hand_rollouts():
    # prompt of 3 tokens; sample 0 calls a tool (two forced tokens, mask 0) before its last sampled token
    a = Rollouts(sequences=[[1, 2, 3, 10, 11, 12, 13, 14], [1, 2, 3, 20]], masks=[[0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1]],
                 rewards=np.array([1.0, 0.0], np.float32), prompt_len=3)
    b = Rollouts(sequences=[[5, 6, 30, 31], [5, 6, 40, 41, 42]], masks=[[0, 0, 1, 1], [0, 0, 1, 1, 1]],
                 rewards=np.array([1.0, 1.0], np.float32), prompt_len=2)
    return [a, b]


def test_advantages_and_policy_batch():
    a, b = hand_rollouts()
    np.testing.assert_allclose(a.advantages, [0.5, -0.5])
    np.testing.assert_allclose(b.advantages, [0.0, 0.0])  # all correct: nothing to learn from this question
    batch = policy_batch([a, b], rows_per_micro_step=2, pad_id=PAD, max_len=64)
    assert batch["inputs"].shape == batch["targets"].shape == (2, 2, 16) and batch["weights"].shape == (2, 2)
    np.testing.assert_allclose(batch["weights"], [[0.5, -0.5], [0.0, 0.0]])
    np.testing.assert_array_equal(batch["inputs"][0, 0, :7], [1, 2, 3, 10, 11, 12, 13])
    assert (batch["inputs"][0, 0, 7:] == PAD).all()
    # targets: only the sampled tokens (mask 1), never the prompt, the tool's forced output or the padding
    np.testing.assert_array_equal(batch["targets"][0, 0, :8], [-1, -1, 10, 11, -1, -1, 14, -1])
    np.testing.assert_array_equal(batch["targets"][0, 1, :4], [-1, -1, 20, -1])
    np.testing.assert_array_equal(batch["targets"][1, 1, :5], [-1, 40, 41, 42, -1])
    assert (batch["targets"][:, :, 8:] == -1).all()
    with pytest.raises(ValueError, match="micro-steps"):
        policy_batch([a, b], rows_per_micro_step=3, pad_id=PAD, max_len=64)


def test_policy_gradient_loss_by_hand():
    model = randomize(GPT(tiny_config(), rngs=nnx.Rngs(0)))
    batch = policy_batch(hand_rollouts(), rows_per_micro_step=2, pad_id=PAD, max_len=32)
    for a in range(2):
        micro = {k: v[a] for k, v in batch.items()}
        logits = np.asarray(model(jnp.asarray(micro["inputs"])), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        objective, count = 0.0, 0
        for r in range(2):
            for t in range(micro["targets"].shape[1]):
                if micro["targets"][r, t] >= 0:
                    objective += micro["weights"][r] * logp[r, t, micro["targets"][r, t]]
                    count += 1
        expected = -objective / count
        got = float(micro_loss(model, {k: jnp.asarray(v) for k, v in micro.items()}))
        assert got == pytest.approx(expected, abs=1e-5)


class SayE(Task):
    """Reward 1 when the reply contains the letter e."""

    def num_examples(self):
        return 1000

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"go {index % 7}"}, {"role": "assistant", "content": "e"}]}

    def reward(self, conversation, completion):
        return float("e" in completion)


def test_toy_rl_reward_rises(tokenizer):
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=32)
    make_model = lambda: GPT(config, rngs=nnx.Rngs(0))  # noqa: E731
    trainer = Trainer.create(make_model, build_optimizer(config.n_embd), make_mesh("data:8"))
    state = trainer.init_state(make_model)
    params, opt_state = state.params, state.opt_state
    engine = Engine(trainer.model(params), tokenizer)
    task, pad = SayE(), tokenizer.encode_special("<|assistant_end|>")
    rewards = []
    for step in range(12):
        step_rollouts = [rollouts(engine, tokenizer, task, step * 4 + j, num_samples=8, max_new_tokens=1,
                                  seed=step * 10 + j) for j in range(4)]
        rewards.append(float(np.mean([r.rewards.mean() for r in step_rollouts])))
        batch = jax.device_put(policy_batch(step_rollouts, 16, pad, config.sequence_len), trainer.batch_sharding())
        params, opt_state, _ = trainer.run_step(params, opt_state, batch, 1.0, 0.95)
        engine.use(trainer.model(params))
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards

    # a question that leaves no room to answer gives rows with nothing to train on
    long = {"messages": [{"role": "user", "content": "go " * 40}, {"role": "assistant", "content": "e"}]}
    class Long(SayE):  # noqa: E306
        def get_example(self, index):
            return long
    full = rollouts(engine, tokenizer, Long(), 0, num_samples=4, max_new_tokens=4)
    assert (full.rewards == 0).all() and all(m == [0] * full.prompt_len for m in full.masks)
    assert (policy_batch([full], 4, pad, config.sequence_len)["targets"] == -1).all()
