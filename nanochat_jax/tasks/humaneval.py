"""HumanEval (openai/openai_humaneval): write the function; the completion runs against the tests in the sandbox."""
import re

from nanochat_jax.sandbox.execution import execute_code
from nanochat_jax.tasks.base import Task, chat, load_rows


def leading_imports(prompt: str) -> str:
    lines = []
    for line in map(str.strip, prompt.splitlines()):
        if line.startswith(("import ", "from ")):
            lines.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(lines)


def code_of(completion: str) -> str:
    """The first ``` fenced block if there is one, else the whole completion."""
    blocks = re.findall(r"```(?:python)?\s*\n(.*?)\n```", completion, re.DOTALL)
    return (blocks[0] if blocks else completion).strip()


class HumanEval(Task):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_rows("openai/openai_humaneval", None, "test", "humaneval")

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return chat(row["prompt"], f"{row['prompt']}\n{row['canonical_solution']}", entry_point=row["entry_point"],
                    test=row["test"])

    def evaluate(self, conversation: dict, completion: str) -> bool:
        program = "\n\n".join([leading_imports(conversation["messages"][0]["content"]), code_of(completion),
                               conversation["test"], f"check({conversation['entry_point']})"])
        return execute_code(program).success
