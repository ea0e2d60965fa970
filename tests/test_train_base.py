"""python -m train.base end to end at a tiny size: loss falls, exact resume, resume onto another mesh, bad flags."""
import json
import shutil

import pytest

from nanochat_jax.training.checkpoint import load_model
from test_entrypoints import write_shards
from train import base

ARGS = ["--depth", "2", "--max-seq-len", "32", "--device-batch-size", "1", "--total-batch-size", "512",
        "--num-iterations", "10", "--eval-every", "5", "--eval-tokens", "512", "--sample-every", "-1",
        "--save-every", "5"]


@pytest.fixture
def base_dir(tmp_path, monkeypatch, tokenizer):
    write_shards(tmp_path, n_shards=3, docs_per_shard=60)
    tokenizer.save(str(tmp_path / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def assert_same(records, expected, rel):
    for a, b in zip(records, expected, strict=True):
        for key in ("loss", "val_bpb"):
            assert (key in a) == (key in b), (a, b)
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rel), (key, a, b)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_and_remesh(base_dir, capsys):
    base.main(ARGS)
    run_dir = base_dir / "base_checkpoints" / "d2"
    full = read_metrics(run_dir)
    assert [m["step"] for m in full] == list(range(11))
    assert set(full[0]) >= {"step", "loss", "lr", "tok_per_sec", "mfu", "val_bpb"} and full[0]["mfu"] is None
    assert full[9]["loss"] < full[0]["loss"] - 0.5  # it learns
    assert full[10]["val_bpb"] < full[0]["val_bpb"]
    assert "val_bpb" in full[5] and "val_bpb" not in full[4]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.isdigit()) == ["10", "5"]
    model, _, meta = load_model(str(run_dir))  # what evals and chat load: params only
    assert meta["step"] == 10 and meta["val_bpb"] == full[10]["val_bpb"] and model.config.n_layer == 2
    assert meta["train_config"]["total_batch_size"] == 512

    # the run died after the step-5 checkpoint: resuming replays steps 5..9 exactly
    shutil.rmtree(run_dir / "10")
    base.main(ARGS + ["--resume"])
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(11))
    assert_same(resumed, full, rel=1e-6)

    # and onto another mesh shape: same numbers up to float reassociation
    shutil.rmtree(run_dir / "10")
    base.main(ARGS + ["--resume", "--mesh", "data:2,fsdp:4"])
    remeshed = read_metrics(run_dir)
    assert_same(remeshed, full, rel=1e-3)
    assert "resumed from step 5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds a model"):
        base.main(ARGS + ["--resume", "--max-seq-len", "64"])
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        base.main(ARGS)  # a fresh run never mixes into an existing one
    with pytest.raises(SystemExit, match="beyond this run's 8 steps"):
        base.main(ARGS + ["--resume", "--num-iterations", "8"])
    base.main(ARGS + ["--resume"])  # resuming a finished run: evaluates, saves nothing new, ends
    assert read_metrics(run_dir)[-1]["step"] == 10
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "los')  # a line cut short by a crash does not break the next resume
    shutil.rmtree(run_dir / "10")
    base.main(ARGS + ["--resume"])
    assert_same(read_metrics(run_dir), full, rel=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--total-batch-size", "500"], "not a multiple of device batch"),
    (["--eval-every", "0"], "--eval-every must be positive, or -1"),
    (["--depth", "0"], "--depth must be positive"),
    (["--depth", "5"], "use an even depth"),
    (["--num-iterations", "0"], "--num-iterations must be positive, or -1"),
    (["--num-iterations", "-1", "--target-param-data-ratio", "-1"], "no training horizon"),
    (["--mesh", "tensor:8"], "bad --mesh entry"),
    (["--resume"], "no checkpoint in"),
])
def test_bad_flags(base_dir, capsys, extra, message):
    with pytest.raises((SystemExit, ValueError)) as err:
        base.main(ARGS + extra)
    assert message in str(err.value) + capsys.readouterr().err


def test_modern_recipe_run_and_exact_resume(base_dir):
    """--recipe modern: the modern model, optimizer state (NorMuon moments, the weight-decay multiplier) and
    schedule go through checkpoints, and a resume replays the steps exactly."""
    args = ARGS + ["--recipe", "modern", "--model-tag", "m2", "--warmup-steps", "2", "--num-iterations", "6",
                   "--save-every", "3", "--eval-every", "3"]
    base.main(args)
    run_dir = base_dir / "base_checkpoints" / "m2"
    full = read_metrics(run_dir)
    model, _, meta = load_model(str(run_dir))
    assert model.config.recipe == "modern" and model.config.n_embd == 128 and model.config.window_pattern == "SSSL"
    train_config = meta["train_config"]
    assert train_config["warmdown_ratio"] == 0.65 and train_config["final_lr_frac"] == 0.05
    assert train_config["embedding_lr"] == 0.3 and train_config["grad_clip"] == 0.0
    assert 0 < train_config["weight_decay"] != 0.28  # scaled by batch and horizon
    assert full[6]["val_bpb"] < full[0]["val_bpb"]
    shutil.rmtree(run_dir / "6")
    base.main(args + ["--resume"])
    assert_same(read_metrics(run_dir), full, rel=1e-6)


def test_modern_sizing_follows_nanochat():
    """The automatic batch, learning-rate scale and weight decay of the modern recipe (optim.auto_batch)."""
    from types import SimpleNamespace
    from nanochat_jax.model.gpt import config_from_depth
    config = config_from_depth(24, 32768, 2048, recipe="modern")
    args = SimpleNamespace(total_batch_size=-1, target_param_data_ratio=8, weight_decay=0.28, num_iterations=-1,
                           target_flops=-1)
    batch, lr_scale, weight_decay = base.modern_sizing(args, config)
    assert lr_scale == pytest.approx(2 ** 0.5) and batch == 2 ** 20
    d12 = config_from_depth(12, 32768, 2048, recipe="modern")
    assert weight_decay == pytest.approx(0.28 * 2 ** 0.5 * d12.scaling_params() / config.scaling_params())
    args.total_batch_size = batch
    assert base.horizon(args, config) == int(8 * config.scaling_params()) // 2 ** 20 == 5568
    with pytest.raises(SystemExit):
        base.parse_args(["--total-batch-size", "-1"])  # the classic recipe has no automatic batch
