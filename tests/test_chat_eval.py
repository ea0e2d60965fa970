"""Chat-eval scoring: categorical answers against the full forward's logits, generative outcomes, pass@k."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import logits_of, randomize, tiny_config
from nanochat_jax.evaluation.chat_tasks import categorical_outcomes, generative_outcomes, pass_at_k
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT
from nanochat_jax.tasks.base import Task, render_mc


class Choices(Task):
    eval_type = "categorical"

    def num_examples(self):
        return 11

    def get_example(self, i):
        letters = ("A", "B", "C", "D") if i % 3 else ("1", "2")
        question = render_mc(f"question {i} " + "q" * i, letters, [f"choice {j}" for j in range(len(letters))])
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": letters[i % len(letters)]}], "letters": letters}

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


def test_categorical_matches_the_full_forward(tokenizer):
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=128), rngs=nnx.Rngs(1)))
    task = Choices()
    outcomes = categorical_outcomes(model, tokenizer, task, batch_size=4)
    expected = []
    for i in range(len(task)):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        logits = np.asarray(logits_of(model, jnp.asarray([prompt])))[0, -1]  # unpadded, every position's logits
        letter_ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
        expected.append(conversation["letters"][int(np.argmax(logits[letter_ids]))] ==
                        conversation["messages"][-1]["content"])
    assert outcomes == expected and len(outcomes) == 11 and 0 < sum(outcomes) < 11
    assert categorical_outcomes(model, tokenizer, task, batch_size=4, max_problems=5) == expected[:5]


class Echo(Task):
    def num_examples(self):
        return 3

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "x"}]}

    def evaluate(self, conversation, completion):
        return len(completion) % 2 == 0


def test_generative_outcomes_and_pass_at_k(tokenizer):
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64), rngs=nnx.Rngs(2)))
    engine = Engine(model, tokenizer)
    outcomes = generative_outcomes(engine, tokenizer, Echo(), num_samples=3, max_new_tokens=5, temperature=1.0)
    assert len(outcomes) == 3 and all(len(o) == 3 for o in outcomes)
    prompt = tokenizer.render_for_completion(Echo()[1])
    sequences, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=5, temperature=1.0, top_k=50, seed=43)
    assert outcomes[1] == [len(tokenizer.decode(s[len(prompt):])) % 2 == 0 for s in sequences]
    table = [[False, True], [False, False], [True, True], [False, True]]
    assert pass_at_k(table, 1) == 0.25 and pass_at_k(table, 2) == 0.75 and pass_at_k([], 1) == 0.0


def test_reply_form_checks_the_chat_and_tool_syntax(tokenizer):
    from nanochat_jax.evaluation.chat_tasks import reply_form
    sp = tokenizer.encode_special
    end, ps, pe, os_, oe = (sp(f"<|{n}|>") for n in ("assistant_end", "python_start", "python_end", "output_start",
                                                      "output_end"))
    text, expr, value = tokenizer.encode("so: "), tokenizer.encode("12+7"), tokenizer.encode("19")
    called = text + [ps] + expr + [pe] + [os_] + value + [oe] + text
    assert reply_form(tokenizer, text + [end]) == (True, False)  # plain text that stops
    assert reply_form(tokenizer, called + [end]) == (True, True)  # a call, its forced output, then the answer
    assert reply_form(tokenizer, text + [ps] + expr + [pe] + text + [end]) == (True, True)  # the calculator refused
    assert reply_form(tokenizer, called + called + [end]) == (True, True)  # two calls
    assert reply_form(tokenizer, called) == (False, True)  # ran out of budget: never stopped
    assert reply_form(tokenizer, text + [ps] + expr + [end]) == (False, False)  # an unclosed call
    assert reply_form(tokenizer, text + [sp("<|user_start|>")] + text + [end]) == (False, False)  # a turn marker
    assert reply_form(tokenizer, text + [pe] + [end]) == (False, False)  # a close without an open
    assert reply_form(tokenizer, []) == (False, False)


def test_evals_chat_end_to_end(tmp_path, monkeypatch, tokenizer):
    import json

    import pytest

    from evals import chat
    from nanochat_jax.tasks.registry import CHAT_TASKS, CHATCORE_TASKS
    from task_files import write_all_tasks, write_base_checkpoint
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_all_tasks(tmp_path)
    write_base_checkpoint(tmp_path, tokenizer, tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=128))
    out = tmp_path / "chat.json"
    summary = chat.main(["-i", "base", "-x", "3", "-m", "4", "--json-out", str(out)])
    results = summary["results"]
    assert summary["chance"]["ARC-Easy"] == 0.25 and set(summary["forms"]) == {"GSM8K", "HumanEval", "SpellingBee"}
    assert all(0 <= v <= 1 for form in summary["forms"].values() for v in form.values())
    assert list(results) == CHATCORE_TASKS and all(0 <= v <= 1 for v in results.values())
    expected = sum((results[t] - CHAT_TASKS[t].chance) / (1 - CHAT_TASKS[t].chance) for t in CHATCORE_TASKS) / 6
    assert summary["ChatCORE"] == pytest.approx(expected) and json.loads(out.read_text())["results"] == results
    assert chat.main(["-i", "base", "-a", "MMLU", "-x", "2"])["ChatCORE"] is None  # only with all six
    with pytest.raises(SystemExit):
        chat.main(["-a", "MMLU|Nope"])


def test_evals_chat_refuses_humaneval_where_the_sandbox_is_unavailable(tmp_path, monkeypatch):
    import pytest

    from evals import chat
    from nanochat_jax.sandbox import execution
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # no checkpoint here: the sandbox is checked first
    monkeypatch.delenv(execution.UNSAFE_ENV, raising=False)
    monkeypatch.setattr(execution, "kernel_sandbox", lambda: (False, "the kernel refused (a test)"))
    with pytest.raises(SystemExit, match="sandbox is unavailable here: the kernel refused"):
        chat.main(["-i", "base", "-a", "HumanEval"])
    try:
        with pytest.raises(FileNotFoundError):  # opted in: on to loading the model (there is none)
            chat.main(["-i", "base", "-a", "HumanEval", "--unsafe-sandbox"])
        assert execution.sandbox_mode() == "unsafe"
    finally:
        execution.allow_unsafe(False)
