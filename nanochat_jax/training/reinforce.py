"""On-policy REINFORCE, nanochat's simplification of GRPO: no KL penalty, no PPO ratio (samples come from the current
policy), advantage = reward - the question's mean reward (not / std), the loss averaged over sampled tokens. `rollouts`
scores one question's samples, `policy_batch` makes a step's a batch ("weights": advantages) for RolloutBatches."""
import time
from dataclasses import dataclass

import numpy as np

from nanochat_jax.common import bucket
from nanochat_jax.training.chat_batches import padded_rows


@dataclass
class Rollouts:
    sequences: list[list[int]]  # prompt + completion (without the final stop token)
    masks: list[list[int]]  # 1 = sampled, 0 = prompt or forced by the tool
    rewards: np.ndarray  # [num_samples]
    prompt_len: int

    @property
    def advantages(self) -> np.ndarray:
        return self.rewards - self.rewards.mean()


def rollouts(engine, tokenizer, task, index: int, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = 50, seed: int = 0) -> Rollouts:
    conversation = task[index]
    prompt = tokenizer.render_for_completion(conversation)
    if len(prompt) >= engine.config.sequence_len:  # no room to answer: nothing sampled, nothing to learn
        return Rollouts([prompt] * num_samples, [[0] * len(prompt)] * num_samples,
                        np.zeros(num_samples, np.float32), len(prompt))
    sequences, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k, seed=seed)
    rewards = [task.reward(conversation, tokenizer.decode(s[len(prompt):])) for s in sequences]
    return Rollouts(sequences, masks, np.asarray(rewards, np.float32), len(prompt))


def policy_batch(step_rollouts: list[Rollouts], rows_per_micro_step: int, pad_id: int, max_len: int) -> dict:
    """Rows in question order, in micro-steps of rows_per_micro_step, padded to a power-of-two length (<= max_len)."""
    rows = [(seq, mask) for r in step_rollouts for seq, mask in zip(r.sequences, r.masks)]
    if len(rows) % rows_per_micro_step:
        raise ValueError(f"{len(rows)} sequences do not split into micro-steps of {rows_per_micro_step} rows")
    length = bucket(max(len(seq) - 1 for seq, _ in rows), maximum=max_len)
    shape = (len(rows) // rows_per_micro_step, rows_per_micro_step)
    batch = {name: a.reshape(*shape, length) for name, a in padded_rows(rows, length, pad_id).items()}
    return batch | {"weights": np.concatenate([r.advantages for r in step_rollouts]).astype(np.float32).reshape(shape)}


class RolloutBatches:
    """RL's batch source: step k's batch is the rollouts of questions k x per_step ... of the task (cycling), sampled
    by engine_for(params) from the params the loop hands over (on-policy). Its position is the next step's k."""

    def __init__(self, engine_for, tokenizer, task, per_step: int, num_samples: int, max_new_tokens: int,
                 temperature: float, top_k: int | None, seed: int, rows_per_micro_step: int):
        self.engine_for, self.tokenizer, self.task, self.per_step = engine_for, tokenizer, task, per_step
        self.num_samples, self.max_new_tokens, self.temperature = num_samples, max_new_tokens, temperature
        self.top_k, self.seed, self.rows_per_micro_step, self.position = top_k, seed, rows_per_micro_step, 0
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")  # never a target: any id would do

    def next_batch(self, params) -> tuple[dict, dict]:
        t0 = time.time()
        engine = self.engine_for(params)
        step, self.position = self.position, self.position + 1
        indices = [(step * self.per_step + j) % len(self.task) for j in range(self.per_step)]
        # each question's seed from ints, which hash the same in every process and run
        batch_rollouts = [rollouts(engine, self.tokenizer, self.task, i, self.num_samples, self.max_new_tokens,
                                   self.temperature, self.top_k, hash((self.seed, step, i)) & 0x7FFFFFFF)
                          for i in indices]
        stats = {"reward": float(np.mean([r.rewards.mean() for r in batch_rollouts])),
                 "completion_length": float(np.mean([len(s) - r.prompt_len for r in batch_rollouts
                                                     for s in r.sequences])),
                 "sampling_s": time.time() - t0}
        return policy_batch(batch_rollouts, self.rows_per_micro_step, self.pad_id, engine.config.sequence_len), stats

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict):
        self.position = int(state["position"])
