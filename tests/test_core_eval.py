"""CORE: prompt construction with few-shot examples, scored spans, the three task types on examples with known answers,
batched scoring against the full forward, centering, and evals.base end to end on a bundle the test writes."""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import logits_of, randomize, tiny_config
from nanochat_jax.evaluation import core
from nanochat_jax.model.gpt import GPT
from nanochat_jax.model.sharding import make_mesh


def test_prompts_with_fewshot_examples():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    assert core.prompts_mc({"query": "Q", "choices": ["x", "y"]}, "\nAnswer: ", shots) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ\nAnswer: x", "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ\nAnswer: y"]
    shots = [{"context_options": ["A said", "B said"], "continuation": "hi.", "gold": 1}]
    assert core.prompts_schema({"context_options": ["C ran", "D ran"], "continuation": "far."}, " ", shots) == [
        "B said hi.\n\nC ran far.", "B said hi.\n\nD ran far."]
    shots = [{"context": " Capital of France? ", "continuation": "Paris"}]
    without, with_ = core.prompts_lm({"context": "Capital of Italy?  ", "continuation": "Rome"}, "\nAnswer: ",
                                          shots)
    assert with_ == "Capital of France?\nAnswer: Paris\n\nCapital of Italy?\nAnswer: Rome"
    assert without == "Capital of France?\nAnswer: Paris\n\nCapital of Italy?\nAnswer:"  # stripped
    assert core.prompts_mc({"query": "Q", "choices": ["x"]}, " ", []) == ["Q x"]


def test_fewshot_draws():
    data = [{"i": i} for i in range(30)]
    for index in (0, 7, 29):
        drawn = core.fewshot(data, index, 5)
        expected = random.Random(1234 + index).sample([i for i in range(30) if i != index], 5)
        assert [d["i"] for d in drawn] == expected and data[index] not in drawn
    assert core.fewshot(data, 3, 0) == []


def test_scored_spans(tokenizer):
    bos = tokenizer.get_bos_token_id()
    rows = core.example_rows({"query": "the model", "choices": ["reads every token", "keeps two"]},
                                  "multiple_choice", " ", [], tokenizer)
    prefix = tokenizer.encode("the model", prepend=bos)
    for (tokens, start, end), choice in zip(rows, ["reads every token", "keeps two"]):
        assert tokens == tokenizer.encode(f"the model {choice}", prepend=bos) and end == len(tokens)
        assert tokens[:start] == prefix[:start] and start >= len(prefix) - 1
    rows = core.example_rows({"context_options": ["hello world", "the optimizer"], "continuation": "keeps data"},
                                  "schema", " ", [], tokenizer)
    suffix = tokenizer.encode(" keeps data")
    for tokens, start, end in rows:
        assert tokens[start:] == suffix and end == len(tokens)
    (tokens, start, end), = core.example_rows({"context": "hello", "continuation": "world"},
                                                   "language_modeling", " ", [], tokenizer)
    assert tokens[:start] == tokenizer.encode("hello", prepend=bos) and tokens[start:end] == tokenizer.encode(" world")


class Repeat(nnx.Module):
    """Predicts that the current token comes again (logit 10 on it)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, ids):
        return 10.0 * jax.nn.one_hot(ids, self.vocab)

    def logits_at(self, ids, at_BS):  # (the scorer's call: the logits at some positions of each row)
        return self(ids)[jnp.arange(ids.shape[0])[:, None], at_BS]


def test_task_types_with_known_answers(tokenizer):
    model = Repeat(tokenizer.get_vocab_size())
    # the repeated continuation is predicted token for token; the other is not
    mc = [{"query": "the", "choices": ["the the the the", "model reads every token"], "gold": g} for g in (0, 1)]
    assert core.evaluate_task(model, tokenizer, mc, "multiple_choice", 0, " ") == [True, False]
    schema = [{"context_options": ["the the the", "model reads"], "continuation": "the the", "gold": g}
              for g in (0, 1)]
    assert core.evaluate_task(model, tokenizer, schema, "schema", 0, " ") == [True, False]
    lm = [{"context": "the the", "continuation": "the the the"}, {"context": "the the", "continuation": "model reads"}]
    assert core.evaluate_task(model, tokenizer, lm, "language_modeling", 0, " ") == [True, False]
    # with few-shot examples in front the answers stand (all examples of the task share the format)
    assert core.evaluate_task(model, tokenizer, mc * 3, "multiple_choice", 2, " ") == [True, False] * 3


@pytest.mark.parametrize("span", [128, 2])  # 2: the head runs on a few positions of each row, not all of them
def test_batched_scores_match_the_full_forward(tokenizer, monkeypatch, span):
    monkeypatch.setattr(core, "SPAN", span)
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64), rngs=nnx.Rngs(3)))
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(11):
        tokens = rng.integers(0, tokenizer.get_vocab_size(), rng.integers(5, 40)).tolist()
        start = int(rng.integers(1, len(tokens) - 1))
        rows.append((tokens, start, int(rng.integers(start + 1, len(tokens) + 1))))
    losses, exact = core.score_rows(model, rows, 0, batch_size=4, mesh=make_mesh("data:8"))
    for (tokens, start, end), loss, ok in zip(rows, losses, exact):
        logits = np.asarray(logits_of(model, jnp.asarray([tokens])))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        expected = -np.mean([logp[t - 1, tokens[t]] for t in range(start, end)])
        assert loss == pytest.approx(expected, rel=1e-4)
        assert ok == all(np.argmax(logits[t - 1]) == tokens[t] for t in range(start, end))


def test_centering():
    assert core.centered(0.25, 25) == pytest.approx(0.0)
    assert core.centered(0.5, 25) == pytest.approx(1 / 3)
    assert core.centered(0.3, 0) == pytest.approx(0.3)


def test_evals_base_end_to_end(tmp_path, monkeypatch, tokenizer):
    from evals import base as evals_base
    from task_files import write_base_checkpoint
    from test_entrypoints import write_shards
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_shards(tmp_path, n_shards=2, docs_per_shard=20)
    write_base_checkpoint(tmp_path, tokenizer, tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64))
    bundle = tmp_path / "eval_bundle"
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n"
        "- {label: mc, dataset_uri: mc.jsonl, num_fewshot: [2], icl_task_type: multiple_choice}\n"
        "- {label: lm, dataset_uri: lm.jsonl, num_fewshot: [0], icl_task_type: language_modeling,"
        " continuation_delimiter: ': '}\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,50\nlm,0\n")
    (bundle / "eval_data" / "mc.jsonl").write_text("".join(
        json.dumps({"query": f"the model {i}", "choices": ["reads", "keeps"], "gold": i % 2}) + "\n" for i in range(6)))
    (bundle / "eval_data" / "lm.jsonl").write_text("".join(
        json.dumps({"context": f"hello {i}", "continuation": "world"}) + "\n" for i in range(4)))
    out = tmp_path / "core.json"
    summary = evals_base.main(["--eval-tokens", "512", "--device-batch-size", "1", "--json-out", str(out)])
    assert set(summary["results"]) == {"mc", "lm"} and summary["train_bpb"] > 0 and summary["val_bpb"] > 0
    assert 0 < summary["unigram_bpb"] < float("inf")
    assert summary["centered_results"]["mc"] == pytest.approx(2 * summary["results"]["mc"] - 1)
    assert summary["core_metric"] == pytest.approx(sum(summary["centered_results"].values()) / 2)
    assert json.loads(out.read_text())["core_metric"] == summary["core_metric"]
    with pytest.raises(SystemExit, match="few-shot"):
        evals_base.main(["--eval-tokens", "0", "--max-per-task", "2"])
    monkeypatch.setattr(core, "EVAL_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="eval_bundle"):
        evals_base.eval_bundle_dir()


def test_unigram_bpb_against_counting_by_hand():
    import math

    from nanochat_jax.evaluation.bits_per_byte import unigram_bpb
    train = iter([{"targets": np.array([[0, 1, 1, -1]])}] * 4)  # 4 batches: token 0 x4, token 1 x8 (-1: padding)
    val = iter([{"targets": np.array([[1, 2, 3, -1]])}])
    token_bytes = np.array([1, 2, 3, 0])  # token 3 has no bytes (a special token): not counted
    p = {1: (8 + 1) / (12 + 4), 2: 1 / (12 + 4)}  # add-one smoothing over a vocabulary of 4
    expected = (-math.log(p[1]) - math.log(p[2])) / (math.log(2) * (2 + 3))
    assert unigram_bpb(train, val, 1, token_bytes, 4) == pytest.approx(expected)


def test_batches_group_rows_by_length_within_a_token_budget():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 3000, 200)] + [5000]
    for batch_size, multiple, budget in ((8, 1, 4096), (32, 8, 16384), (3, 2, 512)):
        groups = core.batches(lengths, batch_size, multiple, budget)
        assert sorted(i for g, _, _ in groups for i in g) == list(range(len(lengths)))  # every row once
        shapes = set()
        for rows, length, n in groups:
            assert 1 <= len(rows) <= min(batch_size, max(1, budget // length)) and len(rows) <= n and n % multiple == 0
            longest = max(lengths[i] for i in rows)
            assert longest <= length < longest + 512  # padding: to a power of two up to 512, a multiple of 512 above
            assert length & (length - 1) == 0 if length <= 512 else length % 512 == 0
            assert (n // multiple) & (n // multiple - 1) == 0
            shapes.add((length, n))
        assert len(shapes) <= 16  # a handful of programs for 201 rows of 201 lengths
        assert groups[-1][0] == [200] and groups[-1][1] == 5120  # shortest first: the longest row comes last


def test_scoring_compiles_per_length_bucket_not_per_example(tokenizer):
    """Examples of 29 different lengths compile a few programs (one per power-of-two bucket); more examples of
    other lengths within the same buckets compile none."""
    from nanochat_jax.common import CompileCount
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64), rngs=nnx.Rngs(0)))
    data = [{"context": "hello " * n, "continuation": "world"} for n in range(1, 30)]
    with CompileCount() as first:
        core.evaluate_task(model, tokenizer, data, "language_modeling", 0, " ", batch_size=8)
    assert 1 <= first.programs <= 4, first  # rows of up to 64 tokens: buckets 16, 32, 64 (and a short last batch)
    more = [{"context": "the model " * n, "continuation": "reads"} for n in range(1, 14)]
    with CompileCount() as second:
        core.evaluate_task(model, tokenizer, more, "language_modeling", 0, " ", batch_size=8)
    assert second.programs == 0, second


def test_one_token_choices_are_read_off_one_row(tokenizer, monkeypatch):
    """Choices of one token each after a shared prefix are scored from one row's last logits: the same losses as one
    row per choice, and the same answers."""
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64), rngs=nnx.Rngs(5)))
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, tokenizer.get_vocab_size(), 20).tolist()
    choices = rng.integers(0, tokenizer.get_vocab_size(), 5).tolist()
    separate, _ = core.score_rows(model, [(prefix + [c], 20, 21) for c in choices], 0, batch_size=8)
    together, _ = core.score_rows(model, [(prefix + [choices[0]], 20, 21, choices)], 0, batch_size=8)
    assert together[0] == pytest.approx(separate, rel=1e-5)
    base = tokenizer.encode("say it")
    words = [w for w in "abcdefghijklmnopqrstuvwxyz" if tokenizer.encode("say it " + w)[:-1] == base][:5]
    assert len(words) == 5
    data = [{"query": "say it", "choices": words, "gold": g} for g in range(5)]
    collapsed = core.evaluate_task(model, tokenizer, data, "multiple_choice", 0, " ")
    monkeypatch.setattr(core, "MAX_CHOICES", 1)  # (too few: one row per choice, as before)
    assert core.evaluate_task(model, tokenizer, data, "multiple_choice", 0, " ") == collapsed
    assert sum(collapsed) == 1  # one gold matches the model's pick
