"""GSM8K (openai/gsm8k): grade-school math. The solutions' <<expression=result>> annotations become python tool
calls and their outputs, so the model learns to use the calculator; the answer follows '#### '."""
import re

from nanochat_jax.tasks.base import FinalNumberTask, calc, chat, load_rows, say


def solution_parts(answer: str) -> list[dict]:
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts += calc(expr, result)
        else:
            parts.append(say(piece))
    return parts


class GSM8K(FinalNumberTask):
    def __init__(self, subset: str = "main", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K takes subset main|socratic and split train|test, got {subset}/{split}")
        self.rows = load_rows("openai/gsm8k", subset, split, "gsm8k")

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return chat(row["question"], solution_parts(row["answer"]))
