"""Train the BPE tokenizer on the pretraining shards and save it with its token_bytes.

    python -m tokenizer.train --vocab-size 65536 --max-chars 2000000000 --doc-cap 10000

Reads the train shards (documents cropped to --doc-cap characters) up to --max-chars -> $NANOCHAT_BASE_DIR/tokenizer/.
"""
import argparse
import os
import time

from nanochat_jax.evaluation import report
from nanochat_jax.common import check_writable, get_base_dir, run_entry_point
from nanochat_jax.data.dataset import check_shards, iter_texts, standin_corpus
from nanochat_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer


def capped_documents(max_chars: int, doc_cap: int):
    seen = 0
    for batch in iter_texts("train"):
        for doc in batch:
            seen += len(doc[:doc_cap])
            yield doc[:doc_cap]
            if seen >= max_chars:
                return


def main():
    parser = argparse.ArgumentParser(description="train the BPE tokenizer with rustbpe")
    parser.add_argument("--vocab-size", type=int, default=65536, help="including the 9 special tokens")
    parser.add_argument("--max-chars", type=int, default=10_000_000_000, help="characters to train on")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document")
    args = parser.parse_args()
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        parser.error(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)}")
    if args.max_chars < 1 or args.doc_cap < 1:
        parser.error("--max-chars and --doc-cap must be positive")

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    check_writable(tokenizer_dir, "the tokenizer")  # before the training, not after it
    check_shards()
    t0 = time.time()
    try:
        tokenizer = Tokenizer.train_from_iterator(capped_documents(args.max_chars, args.doc_cap), args.vocab_size)
    except ValueError as e:  # a shard damaged past its footer: the message names it
        raise SystemExit(str(e).splitlines()[0]) from None
    train_time = time.time() - t0
    sample = "Hello world! Numbers: 12345, contractions: I'm, you're; unicode: héllo 你好 🌍\n\tdone."
    assert tokenizer.decode(tokenizer.encode(sample)) == sample, "tokenizer failed to round-trip a sample"

    tokenizer.save(tokenizer_dir)
    token_bytes = tokenizer.token_bytes()
    text_bytes = token_bytes[token_bytes > 0]
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size < args.vocab_size:
        print(f"warning: the corpus ran out of pairs to merge; vocabulary is {vocab_size:,} tokens, "
              f"not {args.vocab_size:,} (train on more text for the full size)")
    print(f"trained a {vocab_size:,}-token vocabulary in {train_time:.1f}s, saved to {tokenizer_dir}")
    print(f"bytes per token id: min {text_bytes.min()}, max {text_bytes.max()}, mean {text_bytes.mean():.2f}")
    results = {"vocabulary size": vocab_size, "training time (s)": round(train_time, 1),
               "mean bytes per token id": float(text_bytes.mean())}
    report.log(report.TOKENIZER_TRAINING, vars(args), results, report.standin(standin_corpus()))


if __name__ == "__main__":
    run_entry_point(main)
