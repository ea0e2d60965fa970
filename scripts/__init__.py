"""The command-line scripts (python -m scripts.NAME), and what the comparisons with nanochat share."""
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


def random_pair(tokenizer, **config):
    """A random nanochat GPT (torch, eval mode) and ours, imported from it through nanochat's checkpoint format."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat_jax.model.interop import import_nanochat, write_random_nanochat
    with tempfile.TemporaryDirectory() as directory:
        ref_model = write_random_nanochat(directory, tokenizer, GPT, GPTConfig, **config)
        return ref_model, import_nanochat(directory)[0]
