"""Generated spelling tasks over an English word list (dwyl/english-words' words_alpha.txt): SpellingBee ("how many r
in strawberry?": spell the word out, count, check with the python tool) and SimpleSpelling (spell a word letter by
letter). Example i is a pure function of (split, i)."""
import os
import random
import urllib.request

from nanochat_jax.tasks.base import FinalNumberTask, GeneratedTask, calc, chat, say, task_data_path

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
QUESTIONS = ["How many {letter} are there in {word}", "How many times does the letter {letter} occur in {word}",
             "Count the letter {letter} in the word {word}", "In {word}, how often does {letter} appear",
             "What is the number of {letter} in {word}", "Tell me how many {letter} {word} has",
             "How many {letter}'s does the word {word} contain", "Number of times {letter} shows up in {word}",
             "Could you count every {letter} in {word}", "{word}: how many {letter}",
             "¿Cuántas veces sale la {letter} en {word}?", "Combien de {letter} y a-t-il dans {word}",
             "Wie oft steht {letter} in {word}", "{word} 里有几个 {letter}", "{word} に {letter} はいくつありますか"]


def load_words() -> list[str]:
    path = task_data_path("words", "words_alpha.txt")
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            urllib.request.urlretrieve(WORD_LIST_URL, path + ".tmp")
            os.replace(path + ".tmp", path)
        except Exception as e:
            raise FileNotFoundError(f"no word list at {path} and could not download {WORD_LIST_URL} "
                                    f"({type(e).__name__}): put words_alpha.txt there") from e
    with open(path, encoding="utf-8") as f:
        return [w for w in (line.strip() for line in f) if w]


class _Generated(GeneratedTask):
    def __init__(self, size: int = 1000, split: str = "train", words=None, **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = list(words) if words is not None else load_words()


class SpellingBee(_Generated, FinalNumberTask):
    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        quote_letter, quote_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = rng.choice(QUESTIONS).format(letter=f"{quote_letter}{letter}{quote_letter}",
                                                word=f"{quote_word}{word}{quote_word}")
        question = (question.lower() if rng.random() < 0.3 else question) + ("?" if rng.random() < 0.5 else "")
        count, lines = 0, []
        for position, char in enumerate(word, 1):
            count += char == letter
            lines.append(f"{position}:{char}" + (f" <- {letter}, so far {count}" if char == letter else ""))
        reasoning = (f"I need the number of '{letter}' in '{word}'. Spelling it out one letter at a time:\n"
                     + "\n".join(lines) + f"\nBy hand that makes {count}.\n\nChecking with Python:\n\n")
        return chat(question, [say(reasoning), *calc(f"'{word}'.count('{letter}')", count),
                               say(f"\n\nBoth give {count}.\n\n#### {count}")])


class SimpleSpelling(_Generated):
    def __init__(self, size: int = 1000, split: str = "train", words=None, **kwargs):
        super().__init__(size, split, words, **kwargs)
        random.Random(42).shuffle(self.words)  # another word order than SpellingBee's

    def get_example(self, index: int) -> dict:
        word = self.rng(index).choice(self.words)
        return chat(f"Spell the word: {word}", f"{word}:{','.join(word)}")

    def evaluate(self, conversation: dict, completion: str) -> int:
        return int(completion.strip() == conversation["messages"][-1]["content"])
