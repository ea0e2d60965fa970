"""General conversations: SmolTalk (HuggingFaceTB/smol-smoltalk) and CustomJSON (one JSON list of
{role, content} messages per line, e.g. nanochat's identity conversations)."""
import json
import os

from nanochat_jax.tasks.base import Task, load_rows, task_data_path

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


def check_conversation(messages, where: str):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    body = messages[1:] if messages[0].get("role") == "system" else messages
    if len(body) < 2:
        raise ValueError(f"{where}: a conversation needs a user and an assistant message")
    for i, m in enumerate(body):
        role = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != role or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be a {role} message with string content")


class SmolTalk(Task):
    def __init__(self, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk takes split train|test, got {split}")
        self.rows = load_rows("HuggingFaceTB/smol-smoltalk", None, split, "smoltalk")

    def get_example(self, index: int) -> dict:
        messages = self.rows[index]["messages"]
        check_conversation(messages, f"SmolTalk example {index}")
        return {"messages": messages}


class CustomJSON(Task):
    def __init__(self, path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = path or task_data_path("identity", "identity_conversations.jsonl")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no conversations file at {self.path} (nanochat's identity conversations: "
                                    f"{IDENTITY_URL})")
        with open(self.path, encoding="utf-8") as f:
            self.rows = [json.loads(line) for line in f if line.strip()]
        for i, messages in enumerate(self.rows):
            check_conversation(messages, f"{self.path} line {i + 1}")

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]}
