"""The pretraining corpus on disk: parquet shards with a `text` column in $NANOCHAT_BASE_DIR/base_data/ (FineWeb-edu,
the classic recipe's) or base_data_climbmix/ (the modern one's), as $NANOCHAT_DATASET says (fineweb, the default, or
climbmix); sorted by name, the last shard is the validation split. `python -m scripts.download_data` fetches them."""
import os

import pyarrow.parquet as pq

from nanochat_jax.common import get_base_dir

# name -> (Hugging Face dataset, the last shard it publishes (the validation shard), directory under the base dir)
DATASETS = {"fineweb": ("karpathy/fineweb-edu-100b-shuffle", 1822, "base_data"),
            "climbmix": ("karpathy/climbmix-400b-shuffle", 6542, "base_data_climbmix")}
STANDIN_MARKER = "LOCAL_STANDIN.txt"  # written beside shards built by scripts.local_corpus


def dataset_name() -> str:
    name = os.environ.get("NANOCHAT_DATASET", "fineweb")
    if name not in DATASETS:
        raise ValueError(f"NANOCHAT_DATASET={name!r}: expected one of {sorted(DATASETS)}")
    return name


def base_url(name: str | None = None) -> str:
    return f"https://huggingface.co/datasets/{DATASETS[name or dataset_name()][0]}/resolve/main"


def max_shard(name: str | None = None) -> int:
    return DATASETS[name or dataset_name()][1]


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir(name: str | None = None) -> str:
    return os.path.join(get_base_dir(), DATASETS[name or dataset_name()][2])


def standin_corpus(directory: str | None = None) -> str | None:
    """The marker file's text when the shards are a local stand-in, else None."""
    marker = os.path.join(directory or data_dir(), STANDIN_MARKER)
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        return f.read().strip()


def list_shards(directory: str | None = None) -> list[str]:
    directory = directory or data_dir()
    names = sorted(f for f in os.listdir(directory) if f.endswith(".parquet")) if os.path.isdir(directory) else []
    if len(names) < 2:
        raise FileNotFoundError(
            f"need at least 2 parquet shards (train + validation) in {directory}, found {len(names)}: run "
            f"`python -m scripts.download_data -n 8 --dataset {dataset_name()}`, or put shard_XXXXX.parquet files "
            f"(with a 'text' column, e.g. from https://huggingface.co/datasets/{DATASETS[dataset_name()][0]}) there")
    return [os.path.join(directory, f) for f in names]


def split_shards(split: str, directory: str | None = None) -> list[str]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(directory)
    return shards[:-1] if split == "train" else shards[-1:]


def open_shard(path: str) -> pq.ParquetFile:
    try:
        shard = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"corrupt or unreadable parquet shard {path}: {e}") from e
    if "text" not in shard.schema_arrow.names:
        raise ValueError(f"parquet shard {path} has no 'text' column (columns: {shard.schema_arrow.names})")
    if shard.metadata.num_rows == 0:
        raise ValueError(f"parquet shard {path} is empty")
    return shard


def check_shards(directory: str | None = None) -> list[str]:
    """Reads every shard's footer and schema first, so that a bad shard (a truncated file has no valid footer) stops
    a run at its start with one line naming the file and how to get it again."""
    directory = directory or data_dir()
    try:
        shards = list_shards(directory)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    for path in shards:
        try:
            open_shard(path)
        except ValueError as e:
            again = ("rebuild the stand-in: python -m scripts.local_corpus" if standin_corpus(directory) else
                     f"delete it and fetch it again: rm {path} && python -m scripts.download_data --dataset "
                     f"{dataset_name()} (with the -n you used; shards already there are kept)")
            raise SystemExit(f"{str(e).splitlines()[0].rstrip('.')}; {again}") from None
    return shards


def iter_texts(split: str, directory: str | None = None):
    """Yields lists of documents, one list per parquet row group, over the split's shards in order."""
    for path in split_shards(split, directory):
        shard = open_shard(path)
        for group in range(shard.num_row_groups):
            try:
                yield shard.read_row_group(group, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise ValueError(f"corrupt parquet shard {path} (row group {group}): {e}") from e
