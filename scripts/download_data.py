"""Download nanochat's pretraining shards: FineWeb-edu into $NANOCHAT_BASE_DIR/base_data/ (the classic recipe's) or
ClimbMix into base_data_climbmix/ (the modern recipe's, read with NANOCHAT_DATASET=climbmix). Present shards are
skipped, an interrupted one (a .tmp file) resumes by a range request; the validation shard is the last one published.

    python -m scripts.download_data -n 8                       # the first 8 training shards and the validation shard
    python -m scripts.download_data -n 170 --dataset climbmix  # nanochat's GPT-2 speedrun amount of ClimbMix
"""
import argparse
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from nanochat_jax.common import run_entry_point
from nanochat_jax.data.dataset import (DATASETS, STANDIN_MARKER as MARKER, base_url, data_dir, dataset_name,
                                       max_shard, shard_name)

BASE_URL = None  # (tests point this at a local server; None: the dataset's Hugging Face URL)


def download(index: int, directory: str, attempts: int = 5, url_root: str | None = None) -> str | None:
    """None on success, else why not. A partial .tmp file (of an earlier attempt or run) is continued."""
    path = os.path.join(directory, shard_name(index))
    if os.path.exists(path):
        return None
    url, tmp = f"{BASE_URL or url_root or base_url()}/{shard_name(index)}", path + ".tmp"
    for attempt in range(attempts):
        try:
            have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                response = urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # the partial file is already whole (or bad): start again
                    os.remove(tmp)
                raise
            with response, open(tmp, "ab" if have and response.status == 206 else "wb") as f:  # (206: resumed)
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            os.replace(tmp, path)
            print(f"downloaded {shard_name(index)}", flush=True)
            return None
        except Exception as e:  # network errors of every kind: retry with backoff, keeping what arrived
            error = e
            if attempt + 1 < attempts:
                time.sleep(2 ** attempt)
    return f"{url}: {error}"


def main():
    parser = argparse.ArgumentParser(description="download nanochat's pretraining shards")
    parser.add_argument("-n", "--num-shards", type=int, default=8, help="training shards (and the validation shard)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="default: $NANOCHAT_DATASET or fineweb")
    args = parser.parse_args()
    name = args.dataset or dataset_name()
    last = max_shard(name)
    if not 1 <= args.num_shards <= last:
        parser.error(f"--num-shards must be between 1 and {last}")
    directory, url_root = data_dir(name), BASE_URL or base_url(name)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, MARKER)):
        raise SystemExit(f"{directory} holds the local stand-in corpus (see {MARKER}); move those shards away "
                         f"before downloading {name}, so that the two never mix")
    indices = list(range(args.num_shards)) + [last]
    with ThreadPoolExecutor(args.workers) as pool:
        failures = [f for f in pool.map(lambda i: download(i, directory, url_root=url_root), indices) if f]
    if failures:
        missing = [shard_name(i) for i in indices if not os.path.exists(os.path.join(directory, shard_name(i)))]
        raise SystemExit(f"could not download {len(failures)} shard(s), e.g. {failures[0]}\n"
                         f"missing: {', '.join(missing)}\nput these files (from {url_root}) in {directory}")
    print(f"{len(indices)} shards ready in {directory}")


if __name__ == "__main__":
    run_entry_point(main)
