"""Conversations for the chat front ends (terminal and web): prompt rendering that fits the model's context, and
turning a generated reply back into message parts (text, python calls, tool outputs)."""
from nanochat_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer


def prompt_for_reply(tokenizer: Tokenizer, messages: list[dict], context: int, reply_room: int):
    """Token ids of the conversation ending in <|assistant_start|>, leaving reply_room tokens of the context free.
    Whole user/assistant exchanges are dropped from the start (a leading system message stays) until it fits.
    Returns (ids, number of messages dropped); ValueError when even the last message alone does not fit."""
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    body, dropped = list(messages[len(head):]), 0
    while True:
        ids, _ = tokenizer.render_conversation({"messages": head + body}, max_tokens=10**9)
        ids = ids + [tokenizer.encode_special("<|assistant_start|>")]
        if len(ids) + reply_room <= context:
            return ids, dropped
        if len(body) <= 1:
            raise ValueError(f"the message is {len(ids)} tokens; with {reply_room} tokens for the reply it does not "
                             f"fit the model's context of {context}")
        body, dropped = body[2:], dropped + 2


def reply_parts(tokenizer: Tokenizer, tokens: list[int]):
    """A generated reply (ids after <|assistant_start|>, stop token excluded) -> the assistant message content:
    a plain string, or a list of {"type": "text" | "python" | "python_output", "text": ...} parts."""
    special = tokenizer.encode_special
    kind_after = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output",
                  special("<|python_end|>"): "text", special("<|output_end|>"): "text"}
    parts, kind, current = [], "text", []
    for t in [*tokens, None]:  # (None: the end, which closes the last part as a marker does)
        if t is None or t in kind_after:
            if current:
                parts.append({"type": kind, "text": tokenizer.decode(current)})
            kind, current = kind_after.get(t), []
        else:
            current.append(t)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


class ReplyText:
    """A reply's text for people, token by token: a tool call shows as <<expression=result>> (GSM8K's annotations),
    no other special token by name (plain: each token as decoded, for completions); whole characters settle."""

    def __init__(self, tokenizer: Tokenizer, plain: bool = False):
        self.tokenizer, self.settled, self.tail = tokenizer, "", []
        special = tokenizer.encode_special
        self.markers = {} if plain else {special("<|python_start|>"): "<<", special("<|python_end|>"): "=",
                                         special("<|output_start|>"): "", special("<|output_end|>"): ">>"}
        self.hidden = set() if plain else {special(name) for name in SPECIAL_TOKENS} - set(self.markers)

    def add(self, token: int) -> str:
        if token in self.markers:
            self.settled, self.tail = self.text() + self.markers[token], []
        elif token not in self.hidden:
            self.tail.append(token)
            if not (text := self.text()).endswith("\ufffd"):
                self.settled, self.tail = text, []
        return self.text()

    def text(self) -> str:
        return self.settled + self.tokenizer.decode(self.tail)
