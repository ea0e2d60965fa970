"""The tokenizer and model entry points run as a user runs them, on parquet shards the test writes."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_text, run_module
from nanochat_jax.data.dataset import iter_texts, split_shards
from nanochat_jax.data.tokenizer import Tokenizer


def write_shards(base, n_shards=3, docs_per_shard=40):
    data = base / "base_data"
    data.mkdir(parents=True)
    for i in range(n_shards):
        docs = [make_text(80, seed=100 * i + j) for j in range(docs_per_shard)]
        pq.write_table(pa.table({"text": docs}), data / f"shard_{i:05d}.parquet", row_group_size=16)
    return data


def test_shard_splits_and_errors(tmp_path):
    data = write_shards(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in split_shards("train", str(data))] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [p.rsplit("/", 1)[1] for p in split_shards("val", str(data))] == ["shard_00002.parquet"]
    batches = list(iter_texts("val", str(data)))
    assert [len(b) for b in batches] == [16, 16, 8] and batches[0][0] == make_text(80, seed=200)
    with pytest.raises(ValueError, match="split"):
        split_shards("test", str(data))
    with pytest.raises(FileNotFoundError, match="download_data"):
        split_shards("train", str(tmp_path / "nothing"))

    (data / "shard_00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="shard_00001.parquet"):
        list(iter_texts("train", str(data)))
    pq.write_table(pa.table({"body": ["x"]}), data / "shard_00001.parquet")
    with pytest.raises(ValueError, match="shard_00001.parquet has no 'text' column"):
        list(iter_texts("train", str(data)))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), data / "shard_00001.parquet")
    with pytest.raises(ValueError, match="shard_00001.parquet is empty"):
        list(iter_texts("train", str(data)))


def test_tokenizer_train_eval_and_model_summary(tmp_path):
    write_shards(tmp_path)
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    result = run_module("tokenizer.train", "--vocab-size", "400", "--max-chars", "100000", "--doc-cap", "300",
                        env=env, check=True)
    assert "400-token vocabulary" in result.stdout
    tok = Tokenizer.load(str(tmp_path / "tokenizer"))
    assert tok.get_vocab_size() == 400 and (tmp_path / "tokenizer" / "token_bytes.npy").exists()

    result = run_module("tokenizer.eval", env=env, check=True)
    assert "bytes per token" in result.stdout and "val-shard" in result.stdout and "korean" in result.stdout

    result = run_module("scripts.model_summary", "--depth", "2", "--max-seq-len", "32", "--batch-size", "8",
                        "--mesh", "data:2,fsdp:4", env=env, check=True)
    assert "fresh-model validation loss 5.9915 (ln vocab = 5.9915)" in result.stdout  # ln(400)

    bad = run_module("tokenizer.train", "--vocab-size", "100", env=env)
    assert bad.returncode == 2 and "--vocab-size must be at least 265" in bad.stderr
    bad = run_module("scripts.model_summary", "--depth", "2", "--mesh", "data:3", env=env)
    assert bad.returncode != 0 and "has 3 devices but this run has 8" in bad.stderr
