"""Chat-stage batches against a plain reference: midtraining's packed stream, SFT's padded rows (padding and
non-assistant tokens never trained on), step stacking, exact states, the epoch estimate."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize, tiny_config
from nanochat_jax.training.chat_batches import PackedConversations, PaddedConversations, estimated_tokens
from nanochat_jax.data.dataloader import StepBatches
from nanochat_jax.model.gpt import GPT
from nanochat_jax.tasks.base import Task
from nanochat_jax.training.trainer import micro_loss


class Listed(Task):
    def __init__(self, conversations, **kwargs):
        super().__init__(**kwargs)
        self.conversations = conversations

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


def conversations(n=7):
    out = []
    for i in range(n):
        reply = [{"type": "text", "text": f"let me count {i}: "}, {"type": "python", "text": f"{i}*3"},
                 {"type": "python_output", "text": str(3 * i)}, {"type": "text", "text": f"so {3 * i}"}]
        out.append({"messages": [{"role": "user", "content": "question number " + "x" * (3 * i) + str(i)},
                                 {"role": "assistant", "content": reply if i % 2 else f"answer {i} " * (i + 1)}]})
    return out


def stream(tokenizer, task, process_index, process_count, n_conversations):
    ids, mask = [], []
    for k in range(n_conversations):
        i, m = tokenizer.render_conversation(task[(process_index + k * process_count) % len(task)])
        ids += i
        mask += m
    return np.array(ids), np.array(mask)


@pytest.mark.parametrize("process_index,process_count,masked", [(0, 1, True), (1, 2, True), (0, 1, False)])
def test_packed_rows_follow_the_rendered_stream(tokenizer, process_index, process_count, masked):
    task, T, rows = Listed(conversations()), 24, 3
    it = PackedConversations(task, tokenizer, rows, T, process_index=process_index, process_count=process_count,
                             masked=masked)
    ids, mask = stream(tokenizer, task, process_index, process_count, 40)  # several epochs
    for b in range(6):
        batch = next(it)
        assert batch["inputs"].shape == batch["targets"].shape == (rows, T) and batch["inputs"].dtype == np.int32
        for r in range(rows):
            start = (b * rows + r) * T  # rows overlap by one token: each token is a target once
            np.testing.assert_array_equal(batch["inputs"][r], ids[start:start + T])
            keep = (mask[start + 1:start + T + 1] == 1) | (not masked)
            np.testing.assert_array_equal(batch["targets"][r], np.where(keep, ids[start + 1:start + T + 1], -1))
    assert (batch["targets"] == -1).any() == masked and (batch["targets"] >= 0).any()


def test_packed_and_padded_states_resume_exactly(tokenizer):
    task = Listed(conversations())
    for make in (lambda: PackedConversations(task, tokenizer, 2, 20),
                 lambda: PaddedConversations(task, tokenizer, 3, 64)):
        it = make()
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(4)]
        other = make()
        other.set_state(state)
        for want in expected:
            got = next(other)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_padded_rows_train_only_the_assistant(tokenizer):
    task, T = Listed(conversations()), 40
    it = PaddedConversations(task, tokenizer, 4, T)
    end = tokenizer.encode_special("<|assistant_end|>")
    for b in range(3):
        batch = next(it)
        length = batch["inputs"].shape[1]
        assert length in (16, 32, T) and batch["targets"].shape == (4, length)
        for r in range(4):
            ids, mask = tokenizer.render_conversation(task[(4 * b + r) % len(task)])
            ids, mask = ids[:T + 1], mask[:T + 1]  # cropped to the context
            n = len(ids) - 1
            np.testing.assert_array_equal(batch["inputs"][r, :n], ids[:-1])
            assert (batch["inputs"][r, n:] == end).all() and (batch["targets"][r, n:] == -1).all()
            trained = np.flatnonzero(batch["targets"][r] >= 0)
            np.testing.assert_array_equal(trained, np.flatnonzero(np.array(mask[1:]) == 1))
            np.testing.assert_array_equal(batch["targets"][r, trained], np.array(ids[1:])[trained])
    # several processes: every micro-batch has the full length, so that their shapes agree
    shard = PaddedConversations(task, tokenizer, 4, T, process_index=1, process_count=2)
    assert all(next(shard)["inputs"].shape == (4, T) for _ in range(3))
    # the tool's output (mask 0) is never a target, the python call (mask 1) is
    out_start, py_start = tokenizer.encode_special("<|output_start|>"), tokenizer.encode_special("<|python_start|>")
    targets = np.concatenate([next(it)["targets"].ravel() for _ in range(4)])
    assert out_start not in targets and py_start in targets


def test_step_padding_changes_no_loss(tokenizer):
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64)
    model = randomize(GPT(config, rngs=nnx.Rngs(0)))
    task = Listed(conversations())

    class Two:  # micro-batches of different lengths, as SFT makes them
        def __init__(self):
            self.its = iter([PaddedConversations(task, tokenizer, 2, 16).__next__(),
                             PaddedConversations(task, tokenizer, 2, 64).__next__()])

        def __next__(self):
            return next(self.its)

    step = next(StepBatches(Two(), 2))
    assert step["inputs"].shape == (2, 2, 64)
    short = PaddedConversations(task, tokenizer, 2, 16).__next__()
    padded = {k: jnp.asarray(v[0]) for k, v in step.items()}
    unpadded = {k: jnp.asarray(v) for k, v in short.items()}
    assert float(micro_loss(model, padded)) == pytest.approx(float(micro_loss(model, unpadded)), rel=1e-5)


def test_estimated_tokens(tokenizer):
    task = Listed(conversations(50))
    exact = sum(len(tokenizer.render_conversation(c)[0]) for c in conversations(50))
    assert estimated_tokens(task, tokenizer) == exact
    assert estimated_tokens(task, tokenizer, sample=10) == pytest.approx(exact, rel=0.2)
    with pytest.raises(ValueError, match="no conversations"):
        PackedConversations(Listed([]), tokenizer, 1, 8)
