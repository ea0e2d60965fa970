"""Chat-model evaluation, shared by SFT's in-training metrics, RL's pass@k and `python -m evals.chat`.
Categorical tasks (MMLU, ARC), as nanochat scores them: the answer letter whose token has the highest logit after
the conversation up to <|assistant_start|>. Generative tasks sample with the engine (tool use on) and the task
judges each completion. Every process evaluates every problem (the results agree on all hosts).
"""
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.common import bucket, print0
from nanochat_jax.tasks.base import Task
from nanochat_jax.data.tokenizer import SPECIAL_TOKENS


@nnx.jit
def _logits_at(model, ids_BT, at_B):
    return model.logits_at(ids_BT, at_B)


def letter_token_ids(tokenizer, letters) -> list[int]:
    encodings = [tokenizer.encode(letter) for letter in letters]
    for letter, encoded in zip(letters, encodings):
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens with this tokenizer; "
                             "categorical scoring needs one token per letter")
    return [encoded[0] for encoded in encodings]


def categorical_outcomes(model, tokenizer, task: Task, batch_size: int = 8, max_problems: int | None = None):
    """Per problem, whether the highest-logit answer letter is right (a list of bools)."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    bos, outcomes = tokenizer.get_bos_token_id(), []
    for start in range(0, n, batch_size):
        conversations = [task[i] for i in range(start, min(start + batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        # prompts longer than the model's context are scored all the same (rotary positions extend), as nanochat does
        length = bucket(max(len(p) for p in prompts))
        ids = np.full((batch_size, length), bos, np.int32)  # a full batch each time: one compiled shape per length
        at = np.zeros(batch_size, np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)], at[row] = prompt, len(prompt) - 1
        logits = np.asarray(_logits_at(model, jnp.asarray(ids), jnp.asarray(at)))
        for row, conversation in enumerate(conversations):
            letters = conversation["letters"]
            predicted = letters[int(np.argmax(logits[row, letter_token_ids(tokenizer, letters)]))]
            outcomes.append(bool(task.evaluate(conversation, predicted)))
    return outcomes


TOOL_MARKS = {"<|python_start|>": "p", "<|python_end|>": "s", "<|output_start|>": "o", "<|output_end|>": "q"}


def reply_form(tokenizer, completion: list[int]) -> tuple[bool, bool]:
    """(well-formed, calls the tool) for a completion (with its stop token if it stopped), what midtraining teaches.
    Well-formed: it ends with <|assistant_end|>, other special tokens only as tool calls, <|python_start|> code
    <|python_end|> [<|output_start|> result <|output_end|>]. Calls the tool: at least one such call."""
    ends = completion[-1:] == [tokenizer.encode_special("<|assistant_end|>")]
    marks = {tokenizer.encode_special(name): TOOL_MARKS.get(name, "x") for name in SPECIAL_TOKENS}
    body = "".join(marks[t] for t in (completion[:-1] if ends else completion) if t in marks)
    calls = re.match(r"(?:ps(?:oq)?)*", body).group()  # the well-formed calls up to the first stray special token
    return ends and calls == body, "p" in calls


def generative_outcomes(engine, tokenizer, task: Task, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, max_problems: int | None = None,
                        seed: int = 42, rows: int = 32, forms: dict | None = None):
    """Per problem, the outcomes of its num_samples completions; problem i samples with seed seed + i, `rows` rows at
    a time. A prompt that fills the context fails. `forms` gets the shares of well-formed and tool-calling ones."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    conversations = [task[i] for i in range(n)]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    fits = [i for i in range(n) if len(prompts[i]) < engine.config.sequence_len]
    completions = engine.complete_many([prompts[i] for i in fits], num_samples, max_new_tokens, temperature, top_k,
                                       [seed + i for i in fits], rows, keep_stop=True)
    outcomes = [[False] * num_samples for _ in range(n)]  # no room to answer: a failure
    shapes = []
    for i, samples in zip(fits, completions):
        texts = [tokenizer.decode([t for t in s if t not in engine.stops]) for s in samples]
        outcomes[i] = [task.evaluate(conversations[i], text) for text in texts]
        shapes += [reply_form(tokenizer, s) for s in samples]
    if forms is not None:
        forms["well_formed"] = sum(w for w, _ in shapes) / max(n * num_samples, 1)
        forms["tool_calls"] = sum(c for _, c in shapes) / max(n * num_samples, 1)
    if len(fits) < n:
        print0(f"{n - len(fits)} of {n} prompts fill the model's context ({engine.config.sequence_len}): counted as "
               "failed")
    return outcomes


def pass_at_k(outcomes, k: int) -> float:  # the share of problems with a success among their first k samples
    return float(np.mean([any(o[:k]) for o in outcomes])) if outcomes else 0.0
