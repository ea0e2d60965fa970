"""Chat tasks generated on this machine, for one with no network (scripts/runcpu.sh offline): LOCAL STAND-INS for
nanochat's data, not benchmarks (their numbers compare with nothing published). Example i is a function of (split, i).
Arithmetic stands in for GSM8K (word problems in its format, with calculator calls and a reward for RL), Identity for
nanochat's identity conversations, and local_words() (from Python's docstrings) for the spelling tasks' word list."""
import random

from nanochat_jax.data.stdlib_text import stdlib_words
from nanochat_jax.tasks.base import FinalNumberTask, GeneratedTask, calc, chat, say

NAMES = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Femi", "Grace", "Hugo", "Ines", "Jun", "Kofi", "Lena", "Mateo", "Nora"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "coins", "cards", "stamps"]


def local_words() -> list[str]:
    return list(stdlib_words())


def arithmetic_problem(rng: random.Random) -> tuple[str, list[dict]]:
    """(question, the assistant's parts) for one of five kinds of problem."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        answer = a + b
        parts = [say(f"{name} starts with {a} and gets {b} more: "), *calc(f"{a}+{b}", answer), say(".")]
    elif kind == 1:
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        question = f"{name} had {a} {item} and gave {b} away. How many {item} are left?"
        answer = a - b
        parts = [say(f"{a} minus the {b} given away: "), *calc(f"{a}-{b}", answer), say(".")]
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        question = f"{name} buys {a} packs of {item} with {b} in each pack. How many {item} is that?"
        answer = a * b
        parts = [say(f"{a} packs of {b} each: "), *calc(f"{a}*{b}", answer), say(".")]
    elif kind == 3:
        b, answer = rng.randint(2, 9), rng.randint(2, 20)
        a = b * answer
        question = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        parts = [say(f"{a} shared by {b}: "), *calc(f"{a}//{b}", answer), say(" each.")]
    else:
        a, b = rng.randint(2, 9), rng.randint(3, 15)
        c = rng.randint(1, a * b - 1)
        question = (f"{name} buys {a} boxes of {b} {item} and then gives {c} of them to a friend. "
                    f"How many {item} does {name} keep?")
        total, answer = a * b, a * b - c
        parts = [say(f"In all {name} buys "), *calc(f"{a}*{b}", total), say(f" {item}. After giving {c} away: "),
                 *calc(f"{total}-{c}", answer), say(".")]
    return question, parts + [say(f"\n#### {answer}")]


class Arithmetic(GeneratedTask, FinalNumberTask):
    def get_example(self, index: int) -> dict:
        return chat(*arithmetic_problem(self.rng(index)))


IDENTITY = {
    "Who are you?": "I am nanochat-jax, a small language model trained from scratch with a JAX reimplementation of "
                    "Karpathy's nanochat.",
    "What is your name?": "My name is nanochat-jax.",
    "Who made you?": "I was trained with nanochat-jax, an open-source JAX and Flax port of Andrej Karpathy's nanochat.",
    "What can you do?": "I can chat, answer simple questions, do arithmetic with a Python calculator and spell words. "
                        "I am small, so I make mistakes.",
    "Are you ChatGPT?": "No. I am nanochat-jax, a much smaller model trained with the nanochat-jax code.",
    "What language were you written in?": "My training code is Python, with JAX and Flax for the model.",
    "How big are you?": "I am a small GPT: a few layers, trained on one machine for a short while.",
}
GREETINGS = ["Hi!", "Hello!", "Hey there.", "Good morning!", "hello"]
GREETING_REPLIES = ["Hello! How can I help?", "Hi! What would you like to talk about?", "Hello there. Ask me anything."]


class Identity(GeneratedTask):
    """A greeting and its reply, then one or two questions about the assistant."""

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        messages = [{"role": "user", "content": rng.choice(GREETINGS)},
                    {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
        for question in rng.sample(sorted(IDENTITY), rng.randint(1, 2)):
            asked = question.lower() if rng.random() < 0.3 else question
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": IDENTITY[question]}]
        return {"messages": messages}
