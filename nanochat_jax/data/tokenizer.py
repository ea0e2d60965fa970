"""GPT-4-style BPE tokenizer (trained with rustbpe, run by tiktoken) and nanochat's chat format. Saved in
$NANOCHAT_BASE_DIR/tokenizer/ as tokenizer.json (split pattern, special tokens, base64 mergeable ranks) and
token_bytes.npy (UTF-8 byte length of every token id, 0 for special tokens: the weights of bits-per-byte)."""
import base64
import json
import os

import numpy as np
import tiktoken

# <|bos|> starts every document; python_*: the assistant calls the python tool; output_*: the tool's output, fed back
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
# an assistant part's type -> (the special tokens around it, whether it is trained on)
PART_FORMATS = {"text": (None, None, 1), "python": ("<|python_start|>", "<|python_end|>", 1),
                "python_output": ("<|output_start|>", "<|output_end|>", 0)}  # comes from the tool at inference

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (nanochat's choice for small vocabs)
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"


class Tokenizer:
    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int) -> "Tokenizer":
        import rustbpe
        n_merged = vocab_size - len(SPECIAL_TOKENS)  # the special tokens are appended after the learned ones
        if n_merged < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_merged, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        special_tokens = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(_make_encoding(trainer.get_pattern(), ranks, special_tokens))

    @classmethod
    def load(cls, tokenizer_dir: str) -> "Tokenizer":
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python -m tokenizer.train`")
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        ranks = {base64.b64decode(token): rank for token, rank in spec["mergeable_ranks"]}
        return cls(_make_encoding(spec["pattern"], ranks, spec["special_tokens"]))

    def save(self, tokenizer_dir: str):
        """Write tokenizer.json and token_bytes.npy, atomically (a crash never leaves a half-written file)."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        special = self.enc._special_tokens
        ranks = [[base64.b64encode(self.enc.decode_single_token_bytes(i)).decode("ascii"), i]
                 for i in range(self.enc.n_vocab) if i not in special.values()]
        spec = {"pattern": self.enc._pat_str, "special_tokens": special, "mergeable_ranks": ranks}
        _atomic_write(os.path.join(tokenizer_dir, TOKENIZER_FILE), lambda f: f.write(json.dumps(spec).encode()))
        _atomic_write(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), lambda f: np.save(f, self.token_bytes()))

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_special(self, token: str) -> int:
        return self.enc.encode_single_token(token)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def token_bytes(self) -> np.ndarray:
        special_ids = set(self.enc._special_tokens.values())
        return np.array([0 if i in special_ids else len(self.enc.decode_single_token_bytes(i))
                         for i in range(self.enc.n_vocab)], dtype=np.int32)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int], or list[str] -> list[list[int]] (batched in tiktoken's threads). Special-token strings
        inside the text are encoded as plain text. prepend/append: a special token's string or an id."""
        first = [] if prepend is None else [self._as_id(prepend)]
        last = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return first + self.enc.encode_ordinary(text) + last
        if isinstance(text, list):
            return [first + ids + last for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def _as_id(self, token) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def render_conversation(self, conversation: dict, max_tokens: int = 2048):
        """A chat {"messages": [...]} -> (ids, mask) of at most max_tokens; mask 1 marks what the assistant is trained
        on (its text, python calls and <|assistant_end|>). A leading system message joins the first user message."""
        ids, mask = [self.bos_token_id], [0]

        def add(token_ids, supervised):
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        for i, message in enumerate(_merge_system_message(conversation)):
            expected = "user" if i % 2 == 0 else "assistant"
            if not isinstance(message, dict) or message.get("role") != expected:
                role = message.get("role") if isinstance(message, dict) else type(message).__name__
                raise ValueError(f"message {i} is from {role!r} but should be from {expected!r}: "
                                 "roles must alternate user/assistant, starting with user")
            content = message.get("content")
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string, got {type(content).__name__}")
                add(self.encode(content, "<|user_start|>", "<|user_end|>"), 0)
                continue
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            elif not isinstance(content, list):
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts, "
                                 f"got {type(content).__name__}")
            add([self.encode_special("<|assistant_start|>")], 0)
            for part in content:
                kind, text = part.get("type"), part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"message {i}: part of type {kind!r} needs a string 'text'")
                if kind not in PART_FORMATS:
                    raise ValueError(f"message {i}: unknown part type {kind!r}")
                start, end, supervised = PART_FORMATS[kind]
                add(self.encode(text, start, end), supervised)
            add([self.encode_special("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The conversation without its final assistant message, ending in <|assistant_start|> (for sampling)."""
        messages = conversation.get("messages") or []
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is from the assistant")
        ids, _ = self.render_conversation(dict(conversation, messages=messages[:-1]))
        return ids + [self.encode_special("<|assistant_start|>")]


def _merge_system_message(conversation: dict) -> list:
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a dict with a non-empty list under 'messages'")
    if isinstance(messages[0], dict) and messages[0].get("role") == "system":
        if len(messages) < 2 or not isinstance(messages[1], dict) or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        return [dict(messages[1], content=f"{messages[0]['content']}\n\n{messages[1]['content']}")] + messages[2:]
    return messages


def _make_encoding(pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int]):
    return tiktoken.Encoding(name="nanochat_jax", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)


def _atomic_write(path: str, write):
    with open(path + ".tmp", "wb") as f:
        write(f)
    os.replace(path + ".tmp", path)


def get_tokenizer(tokenizer_dir: str | None = None) -> Tokenizer:
    from nanochat_jax.common import get_base_dir
    return Tokenizer.load(tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(tokenizer_dir: str | None = None) -> np.ndarray:
    from nanochat_jax.common import get_base_dir
    path = os.path.join(tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"), TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: it is written by `python -m tokenizer.train`")
    return np.load(path)
