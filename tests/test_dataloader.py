import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_text
from nanochat_jax.data.dataloader import PackedRows


def write_shards(directory, n_shards=3, docs=30, group=8):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_shards):
        texts = [make_text(int(5 + 60 * ((7 * j + i) % 11) / 10), seed=1000 * i + j) for j in range(docs)]
        path = directory / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=group)
        paths.append(str(path))
    return paths


def doc_chunks(paths, tokenizer, chunk):
    """Documents in reading order, BOS-prefixed, in the chunks they are tokenized in (slices of a row group)."""
    chunks = []
    for path in paths:
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):
            texts = f.read_row_group(g).column("text").to_pylist()
            chunks += [[[tokenizer.get_bos_token_id()] + tokenizer.encode(t) for t in texts[i:i + chunk]]
                       for i in range(0, len(texts), chunk)]
    return chunks


def reference_rows(chunks, row_len, buffer_size, n_rows):
    """nanochat's best-fit packing written plainly: while the buffer holds fewer than buffer_size documents, add the
    next chunk (cycling over the data); put the largest document that fits (first of equals), else crop the shortest
    (first of equals)."""
    stream, buffer, rows = iter(chunks * 100), [], []
    for _ in range(n_rows):
        row = []
        while len(row) < row_len:
            while len(buffer) < buffer_size:
                buffer.extend(next(stream))
            room = row_len - len(row)
            fits = [i for i, d in enumerate(buffer) if len(d) <= room]
            if fits:
                best = max(fits, key=lambda i: (len(buffer[i]), -i))
                row += buffer.pop(best)
            else:
                shortest = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                row += buffer.pop(shortest)[:room]
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("buffer_size", [1, 5, 16])
def test_best_fit_matches_reference_and_invariants(tmp_path, tokenizer, buffer_size):
    paths = write_shards(tmp_path)
    row_len, n_rows = 48, 40
    rows = np.stack(list(_take(iter(PackedRows(paths, tokenizer, row_len, buffer_size=buffer_size,
                                               tokenizer_batch_size=4)), n_rows)))
    chunks = doc_chunks(paths, tokenizer, 4)
    np.testing.assert_array_equal(rows, reference_rows(chunks, row_len, buffer_size, n_rows))
    docs = [d for chunk in chunks for d in chunk]
    bos = tokenizer.get_bos_token_id()
    assert rows.shape == (n_rows, row_len) and (rows[:, 0] == bos).all()  # BOS-aligned, no padding
    # every segment between BOS tokens is a whole document or the start of one (a crop)
    known = {tuple(d) for d in docs}
    for row in rows:
        starts = list(np.flatnonzero(row == bos)) + [row_len]
        for a, b in zip(starts[:-1], starts[1:]):
            segment = tuple(row[a:b])
            assert segment in known or (b == row_len and any(d[:len(segment)] == segment for d in known))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_resume_equals_uninterrupted(tmp_path, tokenizer):
    paths = write_shards(tmp_path)
    ds = PackedRows(paths, tokenizer, 40, buffer_size=6, tokenizer_batch_size=3).batch(4)
    expected = _take(iter(ds), 30)  # runs past the end of the data into a second epoch
    for cut in (1, 7, 19):
        it = iter(ds)
        _take(it, cut)
        state = it.get_state()
        resumed = iter(ds)
        resumed.set_state(state)
        np.testing.assert_array_equal(np.stack(_take(resumed, 30 - cut)), np.stack(expected[cut:]))
    assert state["epoch"] >= 1 or state["shard"] > 0


def test_processes_read_disjoint_row_groups(tmp_path, tokenizer):
    paths = write_shards(tmp_path, n_shards=2, docs=32, group=8)
    seen = []
    for p in range(2):
        it = iter(PackedRows(paths, tokenizer, 30, buffer_size=4, process_index=p, process_count=2))
        _take(it, 5)
        state = it.get_state()
        seen.append({(s, g) for s, g, _ in state["buffer"]} | {(state["shard"], state["group"])})
    assert all(g % 2 == 0 for _, g in seen[0]) and all(g % 2 == 1 for _, g in seen[1])


def test_corrupt_shard_is_named(tmp_path, tokenizer):
    paths = write_shards(tmp_path, n_shards=2)
    with open(paths[1], "wb") as f:
        f.write(b"not a parquet file")
    it = iter(PackedRows(paths, tokenizer, 40, buffer_size=200))
    with pytest.raises(ValueError, match="shard_00001.parquet"):
        next(it)
