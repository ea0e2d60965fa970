"""Every chat task the evaluations, SFT's metrics, RL and the report name (nanochat's, plus the LOCAL STAND-INS of
tasks/local.py, never in ChatCORE): how to make its split, its chance level, whether it is a stand-in, has a reward."""
from dataclasses import dataclass
from typing import Callable

from nanochat_jax.tasks.base import Task
from nanochat_jax.tasks.choice import ARC, MMLU
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.local import Arithmetic, local_words
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee


@dataclass(frozen=True)
class ChatTask:
    make: Callable[[str], Task]  # split -> the task
    chance: float = 0.0  # the accuracy of guessing (ChatCORE centres each task on it)
    standin: bool = False
    has_reward: bool = False  # train.rl can train on it


CHAT_TASKS = {
    "ARC-Easy": ChatTask(lambda split: ARC(subset="ARC-Easy", split=split), chance=0.25),
    "ARC-Challenge": ChatTask(lambda split: ARC(subset="ARC-Challenge", split=split), chance=0.25),
    "MMLU": ChatTask(lambda split: MMLU(subset="all", split=split), chance=0.25),
    "GSM8K": ChatTask(lambda split: GSM8K(subset="main", split=split), has_reward=True),
    "HumanEval": ChatTask(lambda split: HumanEval()),  # one split: test
    "SpellingBee": ChatTask(lambda split: SpellingBee(size=256, split=split)),
    # the stand-ins: GSM8K's format over generated word problems, the spelling tasks over Python's docstrings' words
    "Arithmetic": ChatTask(lambda split: Arithmetic(size=8_000 if split == "train" else 500, split=split),
                           standin=True, has_reward=True),
    "LocalSpellingBee": ChatTask(lambda split: SpellingBee(size=256, split=split, words=local_words()), standin=True),
    "LocalSimpleSpelling": ChatTask(lambda split: SimpleSpelling(size=256, split=split, words=local_words()),
                                    standin=True),
}
CHATCORE_TASKS = [name for name, task in CHAT_TASKS.items() if not task.standin]
STANDINS = [name for name, task in CHAT_TASKS.items() if task.standin]


def chatcore(results: dict) -> float | None:
    """nanochat's ChatCORE: the mean of (accuracy - chance) / (1 - chance) over its six tasks (None without all six)."""
    if not set(CHATCORE_TASKS) <= set(results):
        return None
    centered = [(results[name] - CHAT_TASKS[name].chance) / (1 - CHAT_TASKS[name].chance) for name in CHATCORE_TASKS]
    return sum(centered) / len(centered)
