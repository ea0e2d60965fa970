"""The command-line scripts (python -m scripts.NAME), and what the comparisons with nanochat share. Those that take
--nanochat (parity_tasks, parity_core, parity_chat, bench_decode) want a checkout of e1770a3 and what it imports:

    git clone https://github.com/karpathy/nanochat /tmp/nanochat && git -C /tmp/nanochat checkout e1770a3
    pip install tokenizers jinja2 torch
"""
import argparse
import os
import sys
import tempfile


def nanochat_parser(doc: str, checkout: str = "a nanochat checkout (e1770a3)") -> argparse.ArgumentParser:
    """A parser described by doc's first line, with the required --nanochat: the checkout to compare with."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--nanochat", required=True, help=checkout)
    return p


def parse_with_checkout(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """p's arguments, the --nanochat checkout made absolute and put first on sys.path (its nanochat and tasks)."""
    args = p.parse_args(argv)
    args.nanochat = os.path.abspath(args.nanochat)
    sys.path.insert(0, args.nanochat)
    return args


def random_pair(**config):
    """Our tokenizer and nanochat's over its encoding, a random nanochat GPT (torch, eval mode) and ours, imported
    through its checkpoint format."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer
    from nanochat_jax.data.tokenizer import get_tokenizer
    from nanochat_jax.model.interop import import_nanochat, write_random_nanochat
    tokenizer = get_tokenizer()
    with tempfile.TemporaryDirectory() as directory:
        ref_model = write_random_nanochat(directory, tokenizer, GPT, GPTConfig, **config)
        return tokenizer, RustBPETokenizer(tokenizer.enc, "<|bos|>"), ref_model, import_nanochat(directory)[0]
