"""Bad input through the real entry points: one line naming the problem and its fix, before anything compiles, and
nothing a user has is removed (issue 25's data, checkpoint and flag cases)."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_text, run_module
from nanochat_jax.evaluation import report
from nanochat_jax.common import check_writable
from nanochat_jax.training.stages import Source


def write_shards(base, n_shards=3):
    data = base / "base_data"
    data.mkdir(parents=True)
    for i in range(n_shards):
        docs = [make_text(60, seed=10 * i + j) for j in range(20)]
        pq.write_table(pa.table({"text": docs}), data / f"shard_{i:05d}.parquet", row_group_size=8)
    return data


def one_line_error(result, *fragments):
    """The process failed with a message of one line (argparse's usage line aside) holding every fragment."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("usage:")]
    message = lines[-1]
    for fragment in fragments:
        assert fragment in message, (fragment, result.stderr[-2000:])
    return message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_bad_shard_stops_the_tokenizer_and_pretraining_at_once(tmp_path, damage):
    data = write_shards(tmp_path)
    shard = data / "shard_00001.parquet"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"PAR1 not a parquet file at all")
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    result = run_module("tokenizer.train", "--vocab-size", "300", "--max-chars", "20000", env=env)
    one_line_error(result, str(shard), "fetch it again", "scripts.download_data")
    assert not (tmp_path / "tokenizer").exists() or not any((tmp_path / "tokenizer").iterdir())
    # train.base with a tokenizer in place: the shard is named before the step compiles
    shard.write_bytes(whole)
    run_module("tokenizer.train", "--vocab-size", "300", "--max-chars", "20000", env=env, check=True)
    shard.write_bytes(whole[:100])
    result = run_module("train.base", "--depth", "1", "--max-seq-len", "32", "--device-batch-size", "1",
                        "--total-batch-size", "256", "--num-iterations", "2", env=env)
    one_line_error(result, str(shard), "fetch it again")
    assert "memory per device" not in result.stdout  # (printed after the step compiles)


def test_flags_and_places_that_cannot_work_are_one_line(tmp_path):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    one_line_error(run_module("train.base", "--mesh", "foo", env=env), "bad --mesh entry 'foo'")
    one_line_error(run_module("train.base", "--mesh", "data:3", env=env), "has 3 devices but this run has")
    one_line_error(run_module("serve.web", "--port", "99999", env=env), "--port 99999")
    write_shards(tmp_path)
    one_line_error(run_module("train.sft", "--model-tag", "nosuch", env=env), "nosuch")
    # a base directory that cannot be made (a file stands where it should go): even root cannot write there
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line_error(run_module("scripts.report", "reset", env={"NANOCHAT_BASE_DIR": str(blocker / "base")}),
                   "cannot create the base directory", "NANOCHAT_BASE_DIR")
    with pytest.raises(SystemExit, match="cannot write checkpoints to"):
        check_writable(str(blocker / "checkpoints"), "checkpoints")


def test_a_missing_source_model_names_the_ones_there(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "base_checkpoints" / "d20").mkdir(parents=True)  # a run that died before it saved
    with pytest.raises(SystemExit, match="no checkpoints in .*d20: no complete checkpoint"):
        Source("base", None, None)
    with pytest.raises(SystemExit, match="no complete checkpoint in .*d20"):
        Source("base", "d20", None)


def test_report_reset_keeps_the_last_report(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert report.reset() is None
    (tmp_path / "report" / "report.md").write_text("the last run's report card")
    archive = report.reset()
    assert open(os.path.join(archive, "report.md")).read() == "the last run's report card"
    assert os.path.exists(os.path.join(archive, "header.json"))
    assert sorted(os.listdir(tmp_path / "report")) == ["header.json", "previous"]


def test_the_expectation_line_says_what_the_scores_were(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert report.scores_line("rl") is None
    report.log(report.chat_evaluation("rl"), {"Arithmetic": 0.0, "Spelling": 0.5},
               {"Arithmetic chance": 0.0, "Spelling chance": 0.25})
    assert report.scores_line("rl") == ("the rl model's chat evaluation: Arithmetic 0% (chance 0%), Spelling 50% "
                                        "(chance 25%): right more often than chance on 1 of 2 tasks")
    report.log(report.chat_evaluation("rl"), {"Arithmetic": 0.0}, {"Arithmetic chance": 0.0})
    assert report.scores_line("rl").endswith("not yet right more often than chance on any task")
