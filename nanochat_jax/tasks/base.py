"""The Task interface, task mixtures, and where task data comes from.

A Task is a sliceable (start/stop/step) list of conversations ({"messages": [...], plus task fields}). Rows come from
$NANOCHAT_BASE_DIR/task_data/<task>/<split>.jsonl (in the dataset's own schema) when present, else the Hugging Face
hub; each dataset is shuffled with seed 42 as in nanochat, so example i is the same in both."""
import os
import random
import re

from nanochat_jax.common import get_base_dir


def task_data_path(task: str, filename: str) -> str:
    return os.path.join(get_base_dir(), "task_data", task, filename)


def load_rows(hf_id: str, config: str | None, split: str, local_task: str, local_split: str | None = None):
    import datasets
    local = task_data_path(local_task, f"{local_split or split}.jsonl")
    if os.path.exists(local):
        rows = datasets.load_dataset("json", data_files=local, split="train")
    else:
        try:
            rows = datasets.load_dataset(hf_id, config, split=split)
        except Exception as e:  # offline, or no such dataset/split
            raise FileNotFoundError(f"could not load {hf_id} ({config or 'default'}, {split}): {type(e).__name__}. Put "
                                    f"its rows, one JSON object per line in the dataset's schema, at {local}") from e
    return rows.shuffle(seed=42)


class Task:
    eval_type = "generative"  # sampled, scored by evaluate(); "categorical": the answer letter with the top logit

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:  # a task over rows; generated tasks override it
        return len(self.rows)

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:  # subclasses make example i with get_example(i)
        if not isinstance(index, int) or not 0 <= index < len(self):
            raise IndexError(f"example {index} of a task with {len(self)}")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation: dict, completion: str):
        raise NotImplementedError


class FinalNumberTask(Task):
    """A completion is right when its number after '#### ' is the reference's (GSM8K style); RL reward 1.0 or 0.0."""

    def evaluate(self, conversation: dict, completion: str) -> int:
        reference = final_number(conversation["messages"][-1]["content"][-1]["text"])
        return int(reference is not None and final_number(completion) == reference)

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))


class GeneratedTask(Task):
    """`size` examples, example i made from random.Random(i) (the test split's from seeds no training example uses)."""
    TEST_SEED_OFFSET = 10_000_000

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be train|test, got {split}")
        self.size, self.split = size, split

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(index + (self.TEST_SEED_OFFSET if self.split == "test" else 0))


class TaskMixture(Task):
    """Every example of every task, in one deterministic shuffle (seed 42). A task listed twice is seen twice."""

    def __init__(self, tasks: list[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.rows = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]  # (task, its example)
        random.Random(42).shuffle(self.rows)

    def get_example(self, index: int) -> dict:
        task, local = self.rows[index]
        return self.tasks[task][local]


def chat(question: str, answer, **fields) -> dict:
    """A user's question and the assistant's answer (a string or a list of parts), plus task fields."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **fields}


def say(text: str) -> dict:
    return {"type": "text", "text": text}


def calc(expr: str, result) -> list[dict]:
    return [{"type": "python", "text": expr}, {"type": "python_output", "text": str(result)}]


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt: each choice followed by '=' and its letter with no space, so the letter
    the model answers with is the very token it saw in the prompt."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def final_number(text: str) -> str | None:
    match = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return match.group(1).strip().replace(",", "") if match else None
