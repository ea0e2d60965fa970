"""Pretraining batches as a grain pipeline: parquet shards -> tokenized documents -> BOS-aligned best-fit rows.

Rows hold T+1 tokens, each starting at a document's <|bos|>, no padding: the largest of the `buffer_size` buffered
documents that fits goes in; when none fits, the shortest is cropped to fill the row (its rest is dropped). Process p
reads the row groups g % process_count == p of every shard. The JSON state (epoch, the (shard, row group, row) of the
next unread document and of the buffered ones) round-trips exactly: restoring re-tokenizes the buffered documents."""
import bisect
import functools
import itertools

import grain
import jax
import numpy as np

from nanochat_jax.data.dataset import open_shard, split_shards


class PackedRows(grain.IterDataset):
    def __init__(self, shards: list[str], tokenizer, row_len: int, buffer_size: int = 1000,
                 tokenizer_batch_size: int = 128, process_index: int = 0, process_count: int = 1):
        super().__init__()
        self.shards, self.tokenizer, self.row_len = shards, tokenizer, row_len
        self.buffer_size, self.tokenizer_batch_size = buffer_size, tokenizer_batch_size
        self.process_index, self.process_count = process_index, process_count

    def __iter__(self):
        return PackedRowsIterator(self)


class PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, ds: PackedRows):
        super().__init__()
        self.ds = ds
        self._texts = {}  # (shard, group) -> the row group's documents, while it is being read
        self._file = functools.cache(lambda shard: open_shard(ds.shards[shard]))  # shard -> its open ParquetFile
        self.set_state({"epoch": 0, "shard": 0, "group": ds.process_index, "row": 0, "buffer": []})

    def _group_texts(self, shard: int, group: int) -> list[str]:
        if (shard, group) not in self._texts:
            table = self._file(shard).read_row_group(group, columns=["text"])
            self._texts = {(shard, group): table.column("text").to_pylist()}  # keep only the group being read
        return self._texts[(shard, group)]

    def _read_more(self):
        start_epoch = self.epoch
        while self.epoch <= start_epoch + 1:  # a whole pass without a document means there are none
            if self.group < self._file(self.shard).num_row_groups:
                texts = self._group_texts(self.shard, self.group)
                if self.row < len(texts):
                    stop = min(self.row + self.ds.tokenizer_batch_size, len(texts))
                    self._add([(self.shard, self.group, r) for r in range(self.row, stop)], texts[self.row:stop])
                    self.row = stop
                    return
            self.group, self.row = self.group + self.ds.process_count, 0  # on to this process's next row group
            if self.group >= self._file(self.shard).num_row_groups:
                self.shard, self.group = self.shard + 1, self.ds.process_index
                if self.shard == len(self.ds.shards):
                    self.shard, self.epoch = 0, self.epoch + 1
        raise ValueError(f"no documents for process {self.ds.process_index} of {self.ds.process_count} in "
                         f"{self.ds.shards}: fewer row groups than processes?")

    def _add(self, doc_ids, texts):
        bos = self.ds.tokenizer.get_bos_token_id()
        for doc_id, tokens in zip(doc_ids, self.ds.tokenizer.encode(texts, prepend=bos, num_threads=4)):
            arrival = next(self.arrivals)
            bisect.insort(self.keys, (len(tokens), arrival))
            self.docs[arrival] = (doc_id, tokens)

    def _take(self, index: int) -> list[int]:
        _, arrival = self.keys.pop(index)
        return self.docs.pop(arrival)[1]

    def __next__(self) -> np.ndarray:
        row = []
        while len(row) < self.ds.row_len:
            while len(self.keys) < self.ds.buffer_size:
                self._read_more()
            room = self.ds.row_len - len(row)
            fit = bisect.bisect_right(self.keys, (room, float("inf")))  # keys[:fit] are the documents that fit
            if fit > 0:  # the largest that fits, the earliest of equals
                row.extend(self._take(bisect.bisect_left(self.keys, (self.keys[fit - 1][0], -1))))
            else:  # nothing fits: crop the shortest
                row.extend(self._take(0)[:room])
        return np.asarray(row, dtype=np.int32)

    def get_state(self) -> dict:
        buffered = [list(self.docs[arrival][0]) for arrival in sorted(self.docs)]
        return {"epoch": self.epoch, "shard": self.shard, "group": self.group, "row": self.row, "buffer": buffered}

    def set_state(self, state: dict):
        self.epoch, self.shard, self.group, self.row = state["epoch"], state["shard"], state["group"], state["row"]
        # keys sorted by (length, arrival); docs: arrival -> (doc_id, tokens)
        self.keys, self.docs, self.arrivals = [], {}, itertools.count()
        ids = [tuple(doc_id) for doc_id in state["buffer"]]  # in reading order: row groups come one by one
        self._add(ids, [self._group_texts(shard, group)[row] for shard, group, row in ids])
        self._texts = {}


def pretraining_batches(tokenizer, split: str, rows_per_process: int, seq_len: int, buffer_size: int = 1000):
    """This process's rows as micro-batches {"inputs", "targets"}: np.int32 [rows_per_process, seq_len]."""
    dataset = PackedRows(split_shards(split), tokenizer, seq_len + 1, buffer_size=buffer_size,
                         process_index=jax.process_index(), process_count=jax.process_count())
    return iter(dataset.batch(rows_per_process, drop_remainder=True).map(split_rows))


def split_rows(rows: np.ndarray) -> dict:
    return {"inputs": rows[..., :-1], "targets": rows[..., 1:]}


class StepBatches:
    """Steps of `accum_steps` micro-batches ([rows, T] dicts) stacked to [accum_steps, rows, T], shorter ones padded at
    the end (inputs 0, targets -1: never counted, and causal attention keeps them out of earlier positions)."""

    def __init__(self, micro_batches, accum_steps: int):
        self.micro_batches, self.accum_steps = micro_batches, accum_steps

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        micro = [next(self.micro_batches) for _ in range(self.accum_steps)]
        T = max(m["inputs"].shape[1] for m in micro)
        return {key: np.stack([np.pad(m[key], ((0, 0), (0, T - m[key].shape[1])), constant_values=fill) for m in micro])
                for key, fill in (("inputs", 0), ("targets", -1))}

    def next_batch(self, params=None) -> tuple[dict, dict]:
        return next(self), {}

    def get_state(self):
        return self.micro_batches.get_state()

    def set_state(self, state):
        self.micro_batches.set_state(state)


def to_global_array(local_batch: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local_batch)
