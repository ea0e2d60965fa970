"""Multiple-choice tasks: MMLU (cais/mmlu) and ARC-Easy / ARC-Challenge (allenai/ai2_arc). The assistant answers
with the letter alone; evaluation compares the letter."""
from nanochat_jax.tasks.base import Task, chat, load_rows, render_mc


class MultipleChoice(Task):
    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


class MMLU(MultipleChoice):
    letters = ("A", "B", "C", "D")

    def __init__(self, subset: str = "all", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train") or split not in ("train", "validation", "dev", "test"):
            raise ValueError(f"MMLU takes subset all|auxiliary_train and split train|validation|dev|test, "
                             f"got {subset}/{split}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU auxiliary_train has only the train split")
        self.rows = load_rows("cais/mmlu", subset, split, "mmlu", "auxiliary_train" if subset != "all" else split)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        row = row.get("train") or row  # auxiliary_train nests each example under "train"
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU example {index} has {len(row['choices'])} choices")
        return chat(render_mc(row["question"], self.letters, row["choices"]), self.letters[row["answer"]],
                    subject=row["subject"], letters=self.letters)


class ARC(MultipleChoice):
    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge") or split not in ("train", "validation", "test"):
            raise ValueError(f"ARC takes subset ARC-Easy|ARC-Challenge and split train|validation|test, "
                             f"got {subset}/{split}")
        self.rows = load_rows("allenai/ai2_arc", subset, split, subset.lower().replace("-", "_"))

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        letters = row["choices"]["label"]
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC example {index}: answer {row['answerKey']} is not among {letters}")
        return chat(render_mc(row["question"], letters, row["choices"]["text"]), row["answerKey"], letters=letters)
