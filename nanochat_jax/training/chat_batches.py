"""Micro-batches {"inputs", "targets"} (np.int32 [rows_per_process, length]) of rendered conversations for the chat
stages, exact JSON states: process i's k-th is task[(i + k * process_count) % len(task)]; masked targets are -1.
Packed (mid): a token stream in rows of T+1 overlapping by one; Padded (SFT): a conversation a row, cropped, padded."""
import numpy as np

from nanochat_jax.common import bucket
from nanochat_jax.tasks.base import Task


def masked_targets(ids: list[int], mask: list[int]) -> list[int]:  # those of inputs ids[:-1]; -1 where mask is 0
    return [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


def padded_rows(rows: list, length: int, pad_id: int) -> dict:
    """{"inputs", "targets"} [len(rows), length] of (ids, mask) rows, cropped; padding: pad_id inputs, -1 targets."""
    inputs = np.full((len(rows), length), pad_id, np.int32)
    targets = np.full((len(rows), length), -1, np.int32)
    for row, (ids, mask) in enumerate(rows):
        n = min(len(ids) - 1, length)
        inputs[row, :n] = ids[:n]
        targets[row, :n] = masked_targets(ids[:n + 1], mask[:n + 1])
    return {"inputs": inputs, "targets": targets}


class _Conversations:
    def __init__(self, task: Task, tokenizer, rows_per_process: int, seq_len: int, process_index: int = 0,
                 process_count: int = 1, max_tokens: int = 2048):
        if len(task) == 0:
            raise ValueError("the task mixture holds no conversations")
        self.task, self.tokenizer, self.rows_per_process, self.seq_len = task, tokenizer, rows_per_process, seq_len
        self.process_index, self.process_count, self.max_tokens = process_index, process_count, max_tokens
        self.conversation, self._rendered = 0, (None, None)  # _rendered: (k, (ids, mask)) of the last one rendered

    def __iter__(self):
        return self

    def render(self, k: int) -> tuple[list[int], list[int]]:
        if self._rendered[0] != k:
            index = (self.process_index + k * self.process_count) % len(self.task)
            self._rendered = (k, self.tokenizer.render_conversation(self.task[index], max_tokens=self.max_tokens))
        return self._rendered[1]


class PackedConversations(_Conversations):
    def __init__(self, *args, masked: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset, self.masked = 0, masked

    def _read(self, n: int, advance: bool) -> tuple[list[int], list[int]]:
        """The next n (token, mask) pairs of the stream; the position moves past them only if `advance`."""
        k, offset, ids, mask = self.conversation, self.offset, [], []
        while len(ids) < n:
            conv_ids, conv_mask = self.render(k)
            take = min(n - len(ids), len(conv_ids) - offset)
            ids += conv_ids[offset:offset + take]
            mask += conv_mask[offset:offset + take]
            offset += take
            if offset == len(conv_ids):
                k, offset = k + 1, 0
        if advance:
            self.conversation, self.offset = k, offset
        return ids, mask

    def __next__(self) -> dict:
        inputs, targets = [], []
        for _ in range(self.rows_per_process):
            ids, mask = self._read(self.seq_len, advance=True)
            next_id, next_mask = self._read(1, advance=False)  # the row's last target starts the next row
            inputs.append(ids)
            targets.append(masked_targets(ids + next_id, mask + next_mask) if self.masked else ids[1:] + next_id)
        return {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32)}

    def get_state(self) -> dict:
        return {"conversation": self.conversation, "offset": self.offset}

    def set_state(self, state: dict):
        self.conversation, self.offset = int(state["conversation"]), int(state["offset"])


class PaddedConversations(_Conversations):
    def __next__(self) -> dict:
        rendered = [self.render(k) for k in range(self.conversation, self.conversation + self.rows_per_process)]
        self.conversation += self.rows_per_process
        longest = max(len(ids) - 1 for ids, _ in rendered)
        length = self.seq_len if self.process_count > 1 else bucket(longest, maximum=self.seq_len)
        return padded_rows(rendered, length, self.tokenizer.encode_special("<|assistant_end|>"))

    def get_state(self) -> dict:
        return {"conversation": self.conversation}

    def set_state(self, state: dict):
        self.conversation = int(state["conversation"])


def estimated_tokens(task: Task, tokenizer, max_tokens: int = 2048, sample: int = 10_000) -> int:
    """Tokens in one pass over the task (extrapolated from `sample` evenly spaced conversations when it has more)."""
    n = len(task)
    indices = range(n) if n <= sample else np.linspace(0, n - 1, sample).astype(int)
    total = sum(len(tokenizer.render_conversation(task[int(i)], max_tokens=max_tokens)[0]) for i in indices)
    return round(total * n / len(indices))
