"""train.mid -> train.sft -> train.rl end to end at a tiny size, on task files in the datasets' own schemas:
each stage starts from the one before, writes metrics.jsonl and a checkpoint that loads; mid resumes exactly."""
import json
import shutil

import pytest

from conftest import tiny_config
from nanochat_jax.training.checkpoint import load_stage
from task_files import write_all_tasks, write_base_checkpoint
from train import mid, rl, sft

MID = ["--device-batch-size", "1", "--total-batch-size", "512", "--max-seq-len", "64", "--num-iterations", "10",
       "--eval-every", "5", "--eval-tokens", "512", "--save-every", "5"]
SFT = ["--device-batch-size", "1", "--target-examples-per-step", "16", "--num-iterations", "4", "--eval-every", "2",
       "--eval-steps", "2", "--eval-metrics-every", "2", "--eval-metrics-max-problems", "8"]
RL = ["--device-batch-size", "2", "--examples-per-step", "2", "--num-samples", "8", "--max-new-tokens", "8",
      "--num-iterations", "2", "--eval-every", "1", "--eval-examples", "2", "--save-every", "1"]


@pytest.fixture
def base_dir(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_all_tasks(tmp_path)
    write_base_checkpoint(tmp_path, tokenizer, tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=128))
    return tmp_path


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mid_sft_rl_chain(base_dir):
    mid.main(MID)
    run_dir = base_dir / "mid_checkpoints" / "d2"
    full = read_metrics(run_dir)
    assert [m["step"] for m in full] == list(range(11)) and "val_bpb" in full[5] and "val_bpb" in full[10]
    assert [m["lr"] for m in full[:10]] == [1.0] * 9 + [0.5]  # the last 20% decays
    assert full[9]["loss"] < full[0]["loss"] and full[10]["val_bpb"] < full[0]["val_bpb"]
    model, _, meta = load_stage("mid")
    assert meta["step"] == 10 and meta["source"]["stage"] == "base" and model.config.sequence_len == 128

    # killed after the step-5 checkpoint: --resume replays steps 5..9 exactly
    shutil.rmtree(run_dir / "10")
    mid.main(MID + ["--resume"])
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(11))
    for a, b in zip(resumed, full):
        for key in ("loss", "val_bpb"):
            assert (key in a) == (key in b)
            assert key not in b or a[key] == pytest.approx(b[key], rel=1e-6)

    sft.main(SFT)
    records = read_metrics(base_dir / "chatsft_checkpoints" / "d2")
    assert [m["step"] for m in records] == list(range(5))
    assert [m["lr"] for m in records[:4]] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert {"val_loss", "mmlu_acc", "arc_easy_acc"} <= set(records[4]) and "mmlu_acc" in records[2]
    assert "val_loss" in records[0] and "mmlu_acc" not in records[0]  # accuracy: not before training
    assert all(0 <= records[4][k] <= 1 for k in ("mmlu_acc", "arc_easy_acc"))
    _, _, meta = load_stage("sft")
    assert meta["source"]["stage"] == "mid" and meta["mmlu_acc"] == records[4]["mmlu_acc"]

    rl.main(RL)
    records = read_metrics(base_dir / "chatrl_checkpoints" / "d2")
    assert [m["step"] for m in records] == [0, 1, 2]
    assert {"reward", "loss", "pass@1"} <= set(records[0]) and "reward" not in records[2] and "pass@1" in records[2]
    assert 0 <= records[0]["reward"] <= 1 and records[2]["pass@1"] <= records[2]["pass@2"]
    _, _, meta = load_stage("rl")
    assert meta["step"] == 2 and meta["source"]["stage"] == "sft"

    # RL resumes exactly too: the samples of a step depend on (seed, step, question) and the restored weights
    shutil.rmtree(base_dir / "chatrl_checkpoints" / "d2" / "2")
    rl.main(RL + ["--resume"])
    resumed = read_metrics(base_dir / "chatrl_checkpoints" / "d2")
    assert [m["step"] for m in resumed] == [0, 1, 2]
    for a, b in zip(resumed, records):
        assert a.get("reward") == b.get("reward") and a.get("pass@2") == b.get("pass@2")
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), abs=1e-6)


def test_stage_errors(base_dir):
    with pytest.raises(SystemExit, match="train the mid stage first"):  # one line, before anything compiles
        sft.main(SFT)
    with pytest.raises(SystemExit, match="no checkpoint"):
        mid.main(MID + ["--resume"])
    with pytest.raises(SystemExit, match="multiple"):
        mid.main(MID[:2] + ["--total-batch-size", "500"] + MID[4:])
    with pytest.raises(SystemExit):
        sft.main(SFT + ["--source", "rl"])  # not a choice
