"""Tasks on small files in each dataset's own schema, written by the test under task_data/."""
import json

import pytest

from nanochat_jax.tasks.base import TaskMixture, render_mc
from nanochat_jax.tasks.smoltalk import CustomJSON, SmolTalk
from nanochat_jax.tasks.choice import ARC, MMLU
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee
from task_files import write


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def test_gsm8k_tool_rendering(base, tokenizer):
    answer = "Each costs 12/4 = $<<12/4=3>>3.\nTwo cost <<3*2=6>>6 dollars.\n#### 6"
    write(base, "gsm8k", "test", [{"question": "What do two cost?", "answer": answer}] * 3)
    task = GSM8K(split="test")
    ex = task[0]
    assert ex["messages"][1]["content"] == [
        {"type": "text", "text": "Each costs 12/4 = $"}, {"type": "python", "text": "12/4"},
        {"type": "python_output", "text": "3"}, {"type": "text", "text": "3.\nTwo cost "},
        {"type": "python", "text": "3*2"}, {"type": "python_output", "text": "6"},
        {"type": "text", "text": "6 dollars.\n#### 6"}]
    assert task.evaluate(ex, "so #### 6") == 1 and task.evaluate(ex, "#### 7") == 0 and task.evaluate(ex, "6") == 0
    ids, mask = tokenizer.render_conversation(ex)
    S = tokenizer.encode_special
    out = ids.index(S("<|output_start|>"))
    assert mask[out] == 0 and mask[ids.index(S("<|python_start|>"))] == 1


def test_multiple_choice(base):
    write(base, "mmlu", "test", [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}])
    write(base, "arc_easy", "test", [{"id": "x", "question": "Sky?", "answerKey": "2",
                                      "choices": {"text": ["green", "blue"], "label": ["1", "2"]}}])
    mmlu, arc = MMLU(split="test")[0], ARC("ARC-Easy", "test")[0]
    assert mmlu["messages"][0]["content"] == ("Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n- 5=C\n- 6=D\n\n"
                                              "Respond only with the letter of the correct answer.")
    assert mmlu["messages"][1]["content"] == "B" and mmlu["letters"] == ("A", "B", "C", "D")
    assert arc["messages"][0]["content"] == render_mc("Sky?", ["1", "2"], ["green", "blue"])
    assert arc["messages"][1]["content"] == "2" and MMLU(split="test").eval_type == "categorical"
    assert MMLU(split="test").evaluate(mmlu, "B") and not MMLU(split="test").evaluate(mmlu, "C")
    write(base, "mmlu", "auxiliary_train", [{"train": {"question": "q", "subject": "", "choices": list("wxyz"),
                                                        "answer": 3}}])
    assert MMLU("auxiliary_train", "train")[0]["messages"][1]["content"] == "D"
    with pytest.raises(ValueError):
        MMLU("auxiliary_train", "test")


def test_missing_dataset_names_the_hub_id_and_the_local_path(base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets  # read at import time: if another test imported it first, the variables above come too late
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as err:
        ARC("ARC-Challenge", "test")
    assert "allenai/ai2_arc" in str(err.value) and str(base / "task_data" / "arc_challenge" / "test.jsonl") in str(err.value)


def test_spelling_tasks(base):
    (base / "task_data" / "words").mkdir(parents=True)
    (base / "task_data" / "words" / "words_alpha.txt").write_text("strawberry\nbanana\nmississippi\nkiwi\n")
    bee = SpellingBee(size=50, split="train")
    for i in range(50):
        ex = bee[i]
        parts = ex["messages"][1]["content"]
        word, letter = parts[1]["text"].split("'")[1], parts[1]["text"].split("'")[3]
        assert parts[2]["text"] == str(word.count(letter)) and parts[-1]["text"].endswith(f"#### {word.count(letter)}")
        assert bee.evaluate(ex, f"#### {word.count(letter)}") == 1
    assert bee[3] == SpellingBee(size=50)[3] and bee[3] != SpellingBee(size=50, split="test")[3]
    simple = SimpleSpelling(size=5)[0]["messages"]
    word = simple[0]["content"].removeprefix("Spell the word: ")
    assert simple[1]["content"] == f"{word}:{','.join(word)}"


def test_mixture_sequence_and_slicing(base):
    (base / "id.jsonl").write_text("".join(json.dumps([{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": f"a{i}"}]) + "\n"
                                           for i in range(5)))
    a, b = CustomJSON(str(base / "id.jsonl")), CustomJSON(str(base / "id.jsonl"), start=1, stop=5, step=2)
    assert len(b) == 2 and b[1] == a[3]
    mix = TaskMixture([a, b, b])  # b twice: oversampled
    assert len(mix) == 9 and [mix[i] for i in range(9)] == [TaskMixture([a, b, b])[i] for i in range(9)]
    assert sorted(m["messages"][0]["content"] for m in (mix[i] for i in range(9))).count("q3") == 3
    (base / "bad.jsonl").write_text(json.dumps([{"role": "assistant", "content": "x"}]) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        CustomJSON(str(base / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="identity"):
        CustomJSON(str(base / "none.jsonl"))


def test_smoltalk_and_humaneval(base):
    write(base, "smoltalk", "train", [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                                    {"role": "assistant", "content": "a"}]}])
    assert SmolTalk("train")[0]["messages"][1]["content"] == "u"
    prompt = "import math\n\ndef area(r):\n    \"\"\"circle area\"\"\"\n"
    write(base, "humaneval", "test", [{"task_id": "t/0", "prompt": prompt, "canonical_solution": "    return math.pi*r*r\n",
                                       "test": "def check(f):\n    assert abs(f(1) - 3.14159) < 1e-3\n",
                                       "entry_point": "area"}])
    task = HumanEval()
    ex = task[0]
    assert task.evaluate(ex, "```python\ndef area(r):\n    return math.pi * r ** 2\n```")
    assert not task.evaluate(ex, "def area(r):\n    return 3\n")
