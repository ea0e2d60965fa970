"""Import of nanochat checkpoints: a state dict of numpy arrays saved the way nanochat saves it, compared with an
independent numpy forward of nanochat's architecture; then conversion to our format and loading onto a mesh."""
import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import logits_of, run_module
from nanochat_jax.training.checkpoint import load_model
from nanochat_jax.model.gpt import GPTConfig
from nanochat_jax.model.interop import import_nanochat
from nanochat_jax.model.sharding import make_mesh
from reference import gpt_forward, random_state_dict

torch = pytest.importorskip("torch", reason="torch is optional (the 'torch' extra): only nanochat import needs it")

CFG = dict(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)


def write_nanochat_checkpoint(directory, tokenizer=None, step=7, cfg=CFG, state_dict=None, prefix="_orig_mod."):
    """What nanochat's checkpoint_manager writes: model_<step:06d>.pt (torch.save of the state dict; torch.compile
    prefixes the keys with _orig_mod.), meta_<step:06d>.json with model_config, and tokenizer.pkl for published models."""
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = random_state_dict(cfg) if state_dict is None else state_dict
    torch.save({prefix + k: torch.from_numpy(v) for k, v in state_dict.items()}, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(json.dumps({"model_config": cfg, "step": step, "val_bpb": 1.0}))
    if tokenizer is not None:
        (directory / "tokenizer.pkl").write_bytes(pickle.dumps(tokenizer.enc))
    return state_dict


def test_import_matches_reference_forward(tmp_path, tokenizer):
    sd = write_nanochat_checkpoint(tmp_path / "d2", tokenizer)
    write_nanochat_checkpoint(tmp_path / "d2", step=3, state_dict={k: v * 0 for k, v in sd.items()})  # older step
    model, tok, meta = import_nanochat(str(tmp_path / "d2"))
    assert meta["step"] == 7 and tok.encode("hello world") == tokenizer.encode("hello world")
    idx = np.random.default_rng(0).integers(0, 512, (2, 24))
    expected = gpt_forward(sd, CFG, idx)
    out = np.asarray(logits_of(model, jnp.asarray(idx)))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4
    # an explicit step, and bf16 weights (nanochat casts the embedding to bf16 on GPU) load as fp32
    model3, _, _ = import_nanochat(str(tmp_path / "d2"), step=3)
    assert not np.any(np.asarray(model3.wte[...]))


def test_bf16_weights_and_no_prefix(tmp_path):
    sd = random_state_dict(CFG, seed=1)
    d = tmp_path / "ck"
    d.mkdir()
    tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
    tsd["transformer.wte.weight"] = tsd["transformer.wte.weight"].bfloat16()
    torch.save(tsd, d / "model_000001.pt")
    (d / "meta_000001.json").write_text(json.dumps({"model_config": CFG}))
    model, tok, _ = import_nanochat(str(d))
    assert tok is None and model.wte[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(model.wte[...]), tsd["transformer.wte.weight"].float().numpy())


MODERN = dict(sequence_len=512, vocab_size=512, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SSL")


def test_import_of_the_current_architecture(tmp_path):
    """A checkpoint of nanochat's current model (value embeddings on layers 0 and 2, scalars, smear, backout, the
    window pattern in its meta): logits as the numpy forward with every modern switch."""
    switches = dict(rope_base=100000.0, qk_scale=1.2, value_embeds=True, residual_scalars=True, smear=True,
                    backout=True)
    sd = write_nanochat_checkpoint(tmp_path / "m", cfg=MODERN, state_dict=random_state_dict(MODERN | switches, std=0.2))
    assert "value_embeds.0.weight" in sd and "value_embeds.1.weight" not in sd
    model, _, meta = import_nanochat(str(tmp_path / "m"))
    assert model.config.recipe == "modern" and model.config.ve_layers() == [0, 2]
    idx = np.random.default_rng(0).integers(0, 512, (2, 160))  # past the short window (128)
    expected = gpt_forward(sd, MODERN | switches | {"recipe": "modern"}, idx)
    out = np.asarray(logits_of(model, jnp.asarray(idx)), np.float64)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4
    # a classic state dict under a modern meta names what is missing
    write_nanochat_checkpoint(tmp_path / "mixed", cfg=MODERN, state_dict=random_state_dict(MODERN))
    with pytest.raises(ValueError, match="not a modern-architecture nanochat checkpoint: missing keys"):
        import_nanochat(str(tmp_path / "mixed"))


def test_other_architectures_and_missing_files_are_refused(tmp_path):
    newer = dict(CFG, window_pattern="SSSL", attn_softcap=50)  # a config neither classic nor current
    write_nanochat_checkpoint(tmp_path / "new", cfg=newer, state_dict=random_state_dict(CFG))
    with pytest.raises(ValueError, match="neither nanochat's classic architecture"):
        import_nanochat(str(tmp_path / "new"))
    sd = random_state_dict(CFG)
    sd["resid_lambdas"] = np.ones(2, np.float32)
    write_nanochat_checkpoint(tmp_path / "extra", state_dict=sd)
    with pytest.raises(ValueError, match="unexpected keys \\['resid_lambdas'\\]"):
        import_nanochat(str(tmp_path / "extra"))
    sd = random_state_dict(CFG)
    sd["lm_head.weight"] = sd["lm_head.weight"][:, :64]
    write_nanochat_checkpoint(tmp_path / "shape", state_dict=sd)
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        import_nanochat(str(tmp_path / "shape"))
    with pytest.raises(FileNotFoundError, match="model_<step>.pt"):
        import_nanochat(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="meta_000007.json"):
        (tmp_path / "new" / "meta_000007.json").unlink()
        import_nanochat(str(tmp_path / "new"))


def test_import_script_writes_our_checkpoint(tmp_path, tokenizer):
    sd = write_nanochat_checkpoint(tmp_path / "src", tokenizer)
    dst = tmp_path / "dst"
    run_module("scripts.import_nanochat", "--src", str(tmp_path / "src"), "--dst", str(dst), check=True)
    model, tok, meta = load_model(str(dst), mesh=make_mesh("fsdp:8"))
    assert meta["step"] == 7 and GPTConfig(**meta["model_config"]) == GPTConfig(**CFG) and tok.get_vocab_size() == 512
    assert model.h.mlp.c_fc.kernel[...].sharding.spec[1] == "fsdp"
    idx = np.random.default_rng(2).integers(0, 512, (8, 16))
    np.testing.assert_allclose(np.asarray(logits_of(model, jnp.asarray(idx))), gpt_forward(sd, CFG, idx),
                               rtol=1e-4, atol=1e-4)
    (tmp_path / "src" / "tokenizer.pkl").unlink()
    result = run_module("scripts.import_nanochat", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "x"))
    assert result.returncode != 0 and "no tokenizer.pkl" in result.stderr
