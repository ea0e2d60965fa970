"""nanochat's data mixtures for midtraining and SFT (row counts are the full datasets')."""
from nanochat_jax.tasks.base import TaskMixture
from nanochat_jax.tasks.chat_data import CustomJSON, SmolTalk
from nanochat_jax.tasks.choice import ARC, MMLU
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.spelling import SimpleSpelling, SpellingBee


def mid_train() -> TaskMixture:
    identity = CustomJSON()
    return TaskMixture([
        SmolTalk(split="train"),  # 460K general conversations
        MMLU(subset="auxiliary_train", split="train"),  # 100K multiple-choice problems (ARC, MC_TEST, OBQA, RACE)
        GSM8K(split="train"),  # 8K math problems with calculator calls
        identity, identity,  # 1K identity conversations, twice
        SimpleSpelling(size=200_000, split="train"),
        SpellingBee(size=80_000, split="train"),
    ])


def mid_val() -> TaskMixture:
    return TaskMixture([SmolTalk(split="test"), MMLU(split="test", stop=5200), GSM8K(split="test", stop=420)])


def sft_train() -> TaskMixture:
    return TaskMixture([
        ARC("ARC-Easy", split="train"),  # 2.3K
        ARC("ARC-Challenge", split="train"),  # 1.1K
        GSM8K(split="train"),  # 8K
        SmolTalk(split="train", stop=10_000),
        CustomJSON(),  # 1K identity conversations
        SimpleSpelling(size=300, split="train"),
        SpellingBee(size=300, split="train"),
    ])


def sft_val() -> SmolTalk:
    return SmolTalk(split="test")
