"""The local stand-in chat tasks (tasks/local.py), the word list from Python's docstrings, the local mixtures, and
the network probe that decides when runcpu.sh uses them."""
import os
import re
import subprocess
import sys

from nanochat_jax.inference.calculator import use_calculator
from nanochat_jax.data.stdlib_text import stdlib_words
from nanochat_jax.tasks import mixtures
from nanochat_jax.tasks.smoltalk import check_conversation
from nanochat_jax.tasks.local import Arithmetic, Identity, local_words
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee
from evals.chat import parse_args
from nanochat_jax.tasks.registry import CHAT_TASKS, CHATCORE_TASKS, STANDINS, chatcore


def solve(question: str) -> int:
    """The answer worked out from the question's wording alone (independent of the generator's arithmetic)."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "gets" in question and "more" in question:
        return n[0] + n[1]
    if "gave" in question:
        return n[0] - n[1]
    if "packs" in question:
        return n[0] * n[1]
    if "equally" in question:
        return n[0] // n[1]
    if "boxes" in question:
        return n[0] * n[1] - n[2]
    raise AssertionError(f"unknown kind of problem: {question}")


def test_arithmetic_problems_are_right_and_use_the_calculator():
    task = Arithmetic(size=300, split="train")
    kinds = set()
    for i in range(len(task)):
        conversation = task[i]
        assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
        question, parts = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
        answer = solve(question)
        kinds.add(question.split()[1])
        assert parts[-1]["text"].endswith(f"#### {answer}")
        calls = [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]
        assert calls and all(b["type"] == "python_output" for a, b in zip(parts, parts[1:]) if a["type"] == "python")
        for expr, output in calls:  # every tool call gives what the conversation says it gives
            assert str(use_calculator(expr)) == output, (expr, output)
        assert calls[-1][1] == str(answer)
        assert task.evaluate(conversation, f"so the answer is\n#### {answer}") == 1
        assert task.evaluate(conversation, f"#### {answer + 1}") == 0 and task.reward(conversation, "no idea") == 0.0
    assert len(kinds) >= 4
    # deterministic, and test examples are not training examples
    assert Arithmetic(size=5)[3] == task[3]
    train = {Arithmetic(size=500)[i]["messages"][0]["content"] for i in range(500)}
    test = [Arithmetic(size=100, split="test")[i]["messages"][0]["content"] for i in range(100)]
    assert sum(q in train for q in test) < 10


def test_identity_conversations():
    task = Identity(size=50)
    for i in range(len(task)):
        messages = task[i]["messages"]
        check_conversation(messages, f"example {i}")
        assert 4 <= len(messages) <= 6 and [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert any("nanochat-jax" in m["content"] for i in range(len(task)) for m in task[i]["messages"])


def test_local_words_and_spelling_over_them():
    words = local_words()
    assert len(words) > 2000 and words == sorted(set(words)) and list(stdlib_words()) == words
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 12 for w in words)
    assert {"function", "return", "string"} <= set(words)
    bee = SpellingBee(size=20, split="test", words=words)
    for i in range(len(bee)):
        conversation = bee[i]
        word = re.search(r"'([a-z]+)'\.count", conversation["messages"][1]["content"][1]["text"]).group(1)
        assert word in words
        assert bee.evaluate(conversation, conversation["messages"][1]["content"][-1]["text"]) == 1
    spell = SimpleSpelling(size=5, words=["abc"])
    assert spell[0]["messages"][1]["content"] == "abc:a,b,c"


def test_local_mixtures_and_the_chat_eval_names(tokenizer):
    local = mixtures.MIXTURES["local"]
    for stage, (train, val) in {"mid": (local.mid_train, local.mid_val), "sft": (local.sft_train, local.sft_val)}.items():
        train_task, val_task = train(), val()
        assert len(train_task) > len(val_task) > 0
        ids, mask = tokenizer.render_conversation(train_task[0])
        assert len(ids) == len(mask) and sum(mask) > 0
    args = parse_args(["-a", "Arithmetic|LocalSpellingBee|LocalSimpleSpelling"])
    assert args.tasks == ["Arithmetic", "LocalSpellingBee", "LocalSimpleSpelling"] and set(STANDINS) == set(args.tasks)
    spell = CHAT_TASKS["LocalSimpleSpelling"].make("test")
    assert spell.evaluate(spell[0], " " + spell[0]["messages"][-1]["content"] + "\n") == 1
    assert spell.evaluate(spell[0], spell[0]["messages"][-1]["content"][:-1]) == 0
    # the stand-ins never enter ChatCORE, and do not stop it being computed
    six = {name: 0.5 for name in CHATCORE_TASKS}
    assert chatcore(six | {"Arithmetic": 1.0}) == chatcore(six) and chatcore({"Arithmetic": 1.0}) is None


def test_online_probe():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = dict(args=[sys.executable, "-m", "scripts.online"], cwd=repo, capture_output=True, text=True, timeout=60)
    forced = subprocess.run(**probe, env={"NANOCHAT_OFFLINE": "1", "PYTHONPATH": repo})
    assert forced.returncode == 1 and "NANOCHAT_OFFLINE" in forced.stderr
    unknown = subprocess.run(**probe | {"args": probe["args"] + ["no-such-host.invalid"]}, env={"PYTHONPATH": repo})
    assert unknown.returncode == 1 and "no-such-host.invalid" in unknown.stderr
