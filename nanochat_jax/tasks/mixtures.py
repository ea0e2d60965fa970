"""nanochat's data mixtures for midtraining and SFT (row counts are the full datasets'), and the LOCAL STAND-IN
mixtures built only from generated tasks (tasks/local.py), for machines with no network: `--mixture local`."""
from dataclasses import dataclass
from typing import Callable

from nanochat_jax.tasks.base import Task, TaskMixture
from nanochat_jax.tasks.smoltalk import CustomJSON, SmolTalk
from nanochat_jax.tasks.choice import ARC, MMLU
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.local import Arithmetic, Identity, local_words
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee


def mid_train() -> TaskMixture:
    identity = CustomJSON()
    return TaskMixture([
        SmolTalk(split="train"),  # 460K general conversations
        MMLU(subset="auxiliary_train", split="train"),  # 100K multiple-choice problems (ARC, MC_TEST, OBQA, RACE)
        GSM8K(split="train"),  # 8K math problems with calculator calls
        identity, identity,  # 1K identity conversations, twice
        SimpleSpelling(size=200_000, split="train"), SpellingBee(size=80_000, split="train"),
    ])


def mid_val() -> TaskMixture:
    return TaskMixture([SmolTalk(split="test"), MMLU(split="test", stop=5200), GSM8K(split="test", stop=420)])


def sft_train() -> TaskMixture:
    return TaskMixture([
        ARC("ARC-Easy", split="train"), ARC("ARC-Challenge", split="train"),  # 2.3K + 1.1K
        GSM8K(split="train"),  # 8K
        SmolTalk(split="train", stop=10_000),
        CustomJSON(),  # 1K identity conversations
        SimpleSpelling(size=300, split="train"), SpellingBee(size=300, split="train"),
    ])


def sft_val() -> SmolTalk:
    return SmolTalk(split="test")


def local_mid_train() -> TaskMixture:
    return TaskMixture([Identity(size=2_000), Arithmetic(size=20_000), SimpleSpelling(size=20_000, words=local_words()),
                        SpellingBee(size=8_000, words=local_words())])


def local_val() -> TaskMixture:
    return TaskMixture([Identity(size=100, split="test"), Arithmetic(size=500, split="test"),
                        SpellingBee(size=200, split="test", words=local_words())])


def local_sft_train() -> TaskMixture:
    return TaskMixture([Identity(size=300), Arithmetic(size=2_000), SimpleSpelling(size=300, words=local_words()),
                        SpellingBee(size=300, words=local_words())])


@dataclass(frozen=True)
class Mixture:
    mid_train: Callable[[], Task]
    mid_val: Callable[[], Task]
    sft_train: Callable[[], Task]
    sft_val: Callable[[], Task]
    sft_metrics: dict  # SFT's accuracy metrics: metric name -> the task's name in tasks/registry.py
    standin: str | None = None  # what the report says when the data is a local stand-in


MIXTURES = {  # --mixture
    "classic": Mixture(mid_train, mid_val, sft_train, sft_val, {"mmlu_acc": "MMLU", "arc_easy_acc": "ARC-Easy"}),
    "local": Mixture(local_mid_train, local_val, local_sft_train, local_val,
                     {"arithmetic_acc": "Arithmetic", "spelling_acc": "LocalSpellingBee"},
                     standin="chat data generated on this machine (tasks/local.py: identity, arithmetic word "
                             "problems, spelling over words from Python's docstrings), not nanochat's mixture"),
}
