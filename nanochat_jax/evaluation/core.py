"""The CORE metric (DCLM, arXiv 2406.11794) computed the way nanochat computes it.

Task kinds, scored by the model's per-token loss: multiple_choice (the query, then each choice) and schema (each context
option, then one continuation): the lowest mean loss over the choice (the continuation) wins; language_modeling: right
when greedy prediction reproduces the whole continuation. Few-shot examples come first; every row starts with <|bos|>.
Accuracy is centered by the task's random baseline, (acc - b) / (1 - b); CORE is the mean.
"""
import csv
import json
import os
import random
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax.common import bucket
from nanochat_jax.model.sharding import BATCH_AXES

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def prompts_mc(item, delimiter, shots):
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def prompts_schema(item, delimiter, shots):
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in shots)
    return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def prompts_lm(item, delimiter, shots):
    """(without, with) the continuation; the first is stripped so that it is a clean token prefix of the second."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in shots)
    without = f"{prefix}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def common_length(sequences, from_end: bool = False) -> int:  # of the prefix (suffix) all token sequences share
    columns = zip(*(reversed(s) if from_end else s for s in sequences))
    return next((n for n, column in enumerate(columns) if len(set(column)) > 1), min(map(len, sequences)))


def example_rows(item, task_type: str, delimiter: str, shots, tokenizer):
    """The token rows of one example, each with the span [start, end) of the tokens it is scored on."""
    render = {"multiple_choice": prompts_mc, "schema": prompts_schema, "language_modeling": prompts_lm}[task_type]
    tokens = tokenizer.encode(render(item, delimiter, shots), prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":
        start = common_length(tokens)
        return [(t, start, len(t)) for t in tokens]
    if task_type == "schema":
        suffix = common_length(tokens, from_end=True)
        return [(t, len(t) - suffix, len(t)) for t in tokens]
    without, with_ = tokens
    if len(without) >= len(with_) or with_[:len(without)] != without:
        raise ValueError("language-modeling prompt without the continuation is not a token prefix of the one with it")
    return [(with_, len(without), len(with_))]


def fewshot(data, index: int, k: int):
    if k == 0:
        return []
    others = [i for i in range(len(data)) if i != index]
    return [data[i] for i in random.Random(1234 + index).sample(others, k)]


@partial(nnx.jit, static_argnums=5)
def _score_rows(model, ids_BT, start_B, end_B, choices_BM, span: int):
    """Per row: the mean loss over targets start..end-1 (predicted from positions start-1..end-2), whether the
    greedy prediction matches all of them, and the loss of each token of choices_BM as the target at start. Only
    `span` positions from start-1 on go through the head (end - start <= span): a choice or a continuation is a few
    tokens of a row of hundreds."""
    j = jnp.arange(span)[None, :]
    at_BS = jnp.minimum(start_B[:, None] - 1 + j, ids_BT.shape[1] - 2)  # (clipped positions are past end: masked)
    logits = model.logits_at(ids_BT[:, :-1], at_BS)
    targets = jnp.take_along_axis(ids_BT, at_BS + 1, axis=1)
    loss = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    scored = j < (end_B - start_B)[:, None]
    mean_loss = jnp.sum(jnp.where(scored, loss, 0.0), axis=1) / jnp.maximum(jnp.sum(scored, axis=1), 1)
    exact = jnp.all(jnp.where(scored, jnp.argmax(logits, axis=-1) == targets, True), axis=1)
    first = logits[:, 0]  # (the same expression as `loss`: a choice's loss equals its own row's)
    return mean_loss, exact, jax.nn.logsumexp(first, axis=-1)[:, None] - jnp.take_along_axis(first, choices_BM, axis=1)


MAX_BATCH_TOKENS = 16384  # padded tokens per forward pass: long rows go fewer at a time
LENGTH_STEP = 512  # row lengths: powers of two up to 512, then multiples of 512 (see common.bucket)
SPAN = 128  # positions per row through the head (more where a row scores more: one program per length, mostly)
MAX_CHOICES = 16  # one-token choices read off one row's logits, at most this many


def batches(lengths, batch_size: int, multiple: int = 1, max_tokens: int = MAX_BATCH_TOKENS):
    """Group rows by length, shortest first: [(row indices, padded length, padded rows)], lengths bucketed by
    LENGTH_STEP; at each length the same padded row count (batch_size halved until the rows fit in max_tokens, at
    least 1, then a power of two and a multiple of the devices, `multiple`): one program per length."""
    def rows_at(length):
        n = batch_size
        while n > 1 and n * length > max_tokens:
            n = max(1, bucket(n, minimum=1) // 2)
        return n

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, first = [], 0
    while first < len(order):
        n = min(batch_size, len(order) - first)
        while n > rows_at(length := bucket(lengths[order[first + n - 1]], step=LENGTH_STEP)):
            n = rows_at(length)
        out.append((order[first:first + n], length, -(-bucket(rows_at(length), minimum=1) // multiple) * multiple))
        first += n
    return out


def score_rows(model, rows, pad_id: int, batch_size: int, mesh=None):
    """(mean losses, exact matches) for every (tokens, start, end) row, in the rows' order (see `batches`); a row
    (tokens, start, start + 1, choices) gets the losses of each token of `choices` at start instead of one loss."""
    sharding = None if mesh is None else NamedSharding(mesh, P(BATCH_AXES))
    losses, exacts = [0.0] * len(rows), [False] * len(rows)
    for indices, length, n in batches([len(row[0]) for row in rows], batch_size, 1 if mesh is None else mesh.size):
        ids = np.full((n, length + 1), pad_id, np.int32)  # +1: the last position is only a target
        starts, ends, choices = np.ones(n, np.int32), np.ones(n, np.int32), np.zeros((n, MAX_CHOICES), np.int32)
        for r, i in enumerate(indices):
            tokens, starts[r], ends[r] = rows[i][:3]
            ids[r, :len(tokens)] = tokens
            if len(rows[i]) == 4:
                choices[r, :len(rows[i][3])] = rows[i][3]
        arrays = [ids, starts, ends, choices]
        if sharding is not None:
            arrays = [jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index]) for a in arrays]
        span = min(length, max(SPAN, bucket(max(rows[i][2] - rows[i][1] for i in indices), minimum=1)))
        mean_loss, exact, choice_loss = (np.asarray(x) for x in _score_rows(model, *arrays, span))
        for r, i in enumerate(indices):
            losses[i], exacts[i] = float(mean_loss[r]), bool(exact[r])
            if len(rows[i]) == 4:
                losses[i] = [float(x) for x in choice_loss[r, :len(rows[i][3])]]
    return losses, exacts


def evaluate_task(model, tokenizer, data, task_type: str, num_fewshot: int, delimiter: str, batch_size: int = 32,
                  mesh=None) -> list[bool]:
    """Whether each example is answered correctly."""
    rows, firsts = [], []  # firsts: where each example's rows begin
    for index, item in enumerate(data):
        firsts.append(len(rows))
        example = example_rows(item, task_type, delimiter, fewshot(data, index, num_fewshot), tokenizer)
        if task_type == "multiple_choice" and len(example) <= MAX_CHOICES and all(
                len(t) == start + 1 for t, start, _ in example):  # one token each after the same prefix: one row
            example = [(*example[0], [t[-1] for t, _, _ in example])]
        rows += example
    losses, exacts = score_rows(model, rows, tokenizer.get_bos_token_id(), batch_size, mesh)
    if task_type == "language_modeling":
        return [exacts[first] for first in firsts]
    # the lowest mean loss wins (the first of equals)
    spans = [losses[a] if len(rows[a]) == 4 else losses[a:b] for a, b in zip(firsts, firsts[1:] + [len(rows)])]
    return [span.index(min(span)) == item["gold"] for span, item in zip(spans, data)]


def load_bundle(bundle_dir: str):
    """(tasks from core.yaml, random baselines by label from eval_meta_data.csv)."""
    import yaml
    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        tasks = yaml.safe_load(f)["icl_tasks"]
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    return tasks, baselines


def load_task_data(bundle_dir: str, task: dict, max_per_task: int = -1) -> list[dict]:
    with open(os.path.join(bundle_dir, "eval_data", task["dataset_uri"]), encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered(accuracy: float, baseline_percent: float) -> float:
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)
