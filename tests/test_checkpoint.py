import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import logits_of, randomize, tiny_config
from nanochat_jax.training.checkpoint import Checkpointer, load_model, model_meta
from nanochat_jax.model.gpt import GPT
from nanochat_jax.model.sharding import make_mesh, param_shardings


def test_save_on_one_mesh_load_on_another(tmp_path, tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size())
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    state = jax.device_put(state, param_shardings(state, make_mesh("data:8")))
    checkpointer = Checkpointer(str(tmp_path / "run"), max_to_keep=2)
    checkpointer.save_tokenizer(tokenizer)
    for step in (10, 20, 30):
        checkpointer.save(step, {"params": nnx.to_pure_dict(state)}, model_meta(cfg, step, val_bpb=1.5))
    checkpointer.wait()
    assert checkpointer.manager.all_steps() == [20, 30]  # keeps the last two

    loaded, tok, meta = load_model(str(tmp_path / "run"), mesh=make_mesh("data:2,fsdp:4"))
    assert meta == model_meta(cfg, 30, val_bpb=1.5)
    assert tok.encode("hello") == tokenizer.encode("hello")
    assert loaded.h.mlp.c_fc.kernel[...].sharding.spec[1] == "fsdp"
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    idx = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)))
    np.testing.assert_allclose(np.asarray(logits_of(loaded, idx)), np.asarray(logits_of(model, idx)), atol=1e-5)

    with pytest.raises(FileNotFoundError, match="steps present: \\[20, 30\\]"):
        load_model(str(tmp_path / "run"), step=10)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(str(tmp_path / "empty"))


SAVER = """
import sys, time, numpy as np, jax.numpy as jnp
from nanochat_jax.training.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1])
big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32))}
ckpt.save(1, {"params": big}, {"step": 1})
ckpt.wait()
ckpt.save(2, {"params": {"w": big["w"] + 1}}, {"step": 2})
print("saving", flush=True)
time.sleep(60)
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT
    directory = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(directory)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.time() + 30
        while not any(p.name.startswith("2") and "tmp" in p.name for p in directory.iterdir()):
            assert time.time() < deadline, "the step-2 save never started"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)  # mid-save
    finally:
        proc.kill()
        proc.wait()
    ckpt = Checkpointer(str(directory))
    assert ckpt.latest_step() == 1
    target = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
    state, meta = ckpt.restore({"params": target})
    state = state["params"]
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"][:2, :3]),
                                  np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)[:2, :3])
    ckpt.save(2, {"params": state}, {"step": 2})  # the leftover partial save does not get in the way
    ckpt.wait()
    assert ckpt.latest_step() == 2


def test_a_loader_picks_the_newest_complete_checkpoint_and_says_which(tmp_path, monkeypatch, capsys):
    """A run that died before its first save (an empty tag, a deeper one), or in the middle of one (only orbax's
    temporary step directory), is passed over: serve.cli -i base then loads the run that did save."""
    from nanochat_jax.training.checkpoint import STAGE_DIRS, complete_steps, stage_directory
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    stage = tmp_path / STAGE_DIRS["base"]
    cfg = tiny_config()
    checkpointer = Checkpointer(str(stage / "d4"), async_save=False)
    checkpointer.save(5, {"params": nnx.to_pure_dict(nnx.state(GPT(cfg, rngs=nnx.Rngs(0))))}, model_meta(cfg, 5))
    checkpointer.close()
    (stage / "d20").mkdir()  # started later, died before saving
    (stage / "d12" / "7.orbax-checkpoint-tmp-1").mkdir(parents=True)  # died while writing its first step
    assert complete_steps(str(stage / "d4")) == [5] and complete_steps(str(stage / "d12")) == []
    assert stage_directory("base") == str(stage / "d4")
    said = capsys.readouterr().err
    assert "d4, step 5: the newest complete checkpoint" in said and "d12, d20" in said
    import shutil
    shutil.rmtree(stage / "d4")
    with pytest.raises(FileNotFoundError, match="d12, d20: no complete checkpoint"):
        stage_directory("base")
