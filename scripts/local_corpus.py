"""Build a small stand-in pretraining corpus for machines with no network: the docstrings of each standard-library
module as a document (to exercise the pipeline, not for comparable numbers), the shards marked by LOCAL_STANDIN.txt.

    python -m scripts.local_corpus            # writes $NANOCHAT_BASE_DIR/base_data/shard_0000{0..3}.parquet
"""
import argparse
import os

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.common import run_entry_point
from nanochat_jax.data.dataset import STANDIN_MARKER as MARKER, data_dir, shard_name
from nanochat_jax.data.stdlib_text import stdlib_documents


def main():
    parser = argparse.ArgumentParser(description="write a local stand-in corpus of parquet shards")
    parser.add_argument("--num-shards", type=int, default=4, help="the last one is the validation shard")
    parser.add_argument("--max-chars", type=int, default=6_000_000, help="stop collecting at this many characters")
    args = parser.parse_args()
    if args.num_shards < 2:
        parser.error("--num-shards must be at least 2 (train + validation)")
    directory = data_dir()
    os.makedirs(directory, exist_ok=True)
    existing = sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))
    if existing and not os.path.exists(os.path.join(directory, MARKER)):
        raise SystemExit(f"{directory} already holds shards ({existing[0]} ...): not mixing a stand-in into them")
    for name in existing:  # an earlier stand-in: replaced whole, so no stale shard becomes the validation split
        os.remove(os.path.join(directory, name))
    docs = stdlib_documents(args.max_chars)
    for shard in range(args.num_shards):
        part = docs[shard::args.num_shards]
        pq.write_table(pa.table({"text": part}), os.path.join(directory, shard_name(shard)), row_group_size=256)
    with open(os.path.join(directory, MARKER), "w") as f:
        f.write("These shards are a local stand-in built from Python's standard-library docstrings, not FineWeb-edu.\n")
    print(f"wrote {args.num_shards} shards ({len(docs)} documents, {sum(map(len, docs)):,} characters) to {directory}")


if __name__ == "__main__":
    run_entry_point(main)
