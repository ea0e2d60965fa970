"""Every chat task the evaluations, SFT's metrics, RL and the report name, in one table: CHAT_TASKS[name] says how
to make its split, how it is scored, its chance level and whether it is a LOCAL STAND-IN (tasks/local.py: generated
on this machine, never in ChatCORE). The names are nanochat's (ARC-Easy, ..., SpellingBee) plus the stand-ins'."""
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
    cls: type
    options: Callable[[str], dict]  # split -> the constructor's arguments
    chance: float = 0.0  # the accuracy of guessing (ChatCORE centres each task on it)
    standin: bool = False
    has_reward: bool = False  # train.rl can train on it

    @property
    def eval_type(self) -> str:  # categorical (the answer letter with the highest logit) or generative (sampled)
        return self.cls.eval_type

    def make(self, split: str = "test") -> Task:
        return self.cls(**self.options(split))


CHAT_TASKS = {
    "ARC-Easy": ChatTask(ARC, lambda split: {"subset": "ARC-Easy", "split": split}, chance=0.25),
    "ARC-Challenge": ChatTask(ARC, lambda split: {"subset": "ARC-Challenge", "split": split}, chance=0.25),
    "MMLU": ChatTask(MMLU, lambda split: {"subset": "all", "split": split}, chance=0.25),
    "GSM8K": ChatTask(GSM8K, lambda split: {"subset": "main", "split": split}, has_reward=True),
    "HumanEval": ChatTask(HumanEval, lambda split: {}),  # one split: test
    "SpellingBee": ChatTask(SpellingBee, lambda split: {"size": 256, "split": split}),
    # the stand-ins, for machines with no network: GSM8K's format over generated word problems, and SpellingBee
    # over words from Python's docstrings
    "Arithmetic": ChatTask(Arithmetic, lambda split: {"size": 8_000 if split == "train" else 500, "split": split},
                           standin=True, has_reward=True),
    "LocalSpellingBee": ChatTask(SpellingBee, lambda split: {"size": 256, "split": split, "words": local_words()},
                                 standin=True),
    "LocalSimpleSpelling": ChatTask(SimpleSpelling, lambda split: {"size": 256, "split": split,
                                                                   "words": local_words()}, standin=True),
}
CHATCORE_TASKS = [name for name, task in CHAT_TASKS.items() if not task.standin]
STANDINS = [name for name, task in CHAT_TASKS.items() if task.standin]


def chatcore(results: dict) -> float | None:
    """nanochat's ChatCORE: the mean of (accuracy - chance) / (1 - chance) over its six tasks; None unless all six
    were evaluated."""
    if not set(CHATCORE_TASKS) <= set(results):
        return None
    centered = [(results[name] - CHAT_TASKS[name].chance) / (1 - CHAT_TASKS[name].chance) for name in CHATCORE_TASKS]
    return sum(centered) / len(centered)
