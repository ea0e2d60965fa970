"""Ahead-of-time compilation: the report of scripts/aot_compile on this machine's devices, the memory check a
training run makes at start (with a memory limit set through NANOCHAT_DEVICE_MEMORY), and, where libtpu is
installed, a real TPU compile for a v5e-8 topology; where the CUDA plugin is, real GPU compiles for 8 H100s (no GPU):
a tiny modern model's kernels, and the speedrun's own defaults against the memory JAX will have."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, tiny_config
from nanochat_jax.measure import aot
from nanochat_jax.model.gpt import GPT
from nanochat_jax.training.optim import build_optimizer
from nanochat_jax.model.sharding import make_mesh
from nanochat_jax.training.trainer import Trainer
from scripts import aot_compile

TINY = ["--depth", "2", "--vocab-size", "512", "--seq-len", "128", "--device-batch-size", "2",
        "--total-batch-size", "4096"]


def test_report_on_local_devices(tmp_path):
    out = aot_compile.main(TINY + ["--mesh", "fsdp:8", "--dtype", "float32", "--json-out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == out
    train = out["train"]
    assert train["grad_accum_steps"] == 2 and train["model_flops_per_step"] == 4096 * aot_compile.config_from_depth(
        2, 512, 128).flops_per_token()
    for name in ("train", "prefill", "decode"):
        assert out[name]["peak_bytes"] >= out[name]["temp_bytes"] > 0 and out[name]["compile_s"] >= 0
        assert out[name]["fits"] is None  # a CPU has no memory limit to check against
    with pytest.raises(SystemExit):
        aot_compile.parse_args(["--programs", "train,sample"])


def test_refused_bytes_reads_the_compiler_message():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(40.07G) exceeds available HBM (15.75G).")
    assert aot.refused_bytes(message) == int(40.07 * 2**30)
    assert aot.largest_fitting(lambda b: b <= 3, 16) == 2


def test_training_memory_check_refuses_and_names_the_batch_that_fits(monkeypatch):
    cfg = tiny_config(sequence_len=64)
    make = lambda: GPT(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    trainer = Trainer.create(make, build_optimizer(cfg.n_embd), make_mesh("data:8"))
    peak = {rows: aot.memory(aot.compile_timed(trainer.step, *trainer.step_args(rows * 8, 64))[0])
            ["peak_bytes"] for rows in (2, 4)}
    assert peak[2] < peak[4]
    monkeypatch.setenv("NANOCHAT_DEVICE_MEMORY", str((peak[2] + peak[4]) / 2 / 2**30))
    with pytest.raises(SystemExit, match="the largest that fits is --device-batch-size 2"):
        aot.check_training_memory(trainer, 4, 64, 1)
    monkeypatch.setenv("NANOCHAT_DEVICE_MEMORY", str(peak[4] * 2 / 2**30))
    assert aot.check_training_memory(trainer, 4, 64, 1)["peak_bytes"] == peak[4]
    # the run then steps through the executable compiled by the check: the jitted step never compiles
    state = trainer.init_state(make)
    params, opt_state = state.params, state.opt_state
    tokens = np.random.default_rng(0).integers(0, 100, (1, 32, 65)).astype(np.int32)
    batch = jax.device_put({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, trainer.batch_sharding())
    _, _, out = trainer.run_step(params, opt_state, batch, 1.0, 0.9)
    assert np.isfinite(float(out["loss"])) and trainer.step._cache_size() == 0
    monkeypatch.setenv("NANOCHAT_DEVICE_MEMORY", "lots")
    with pytest.raises(SystemExit, match="NANOCHAT_DEVICE_MEMORY"):
        aot.device_memory_bytes(jax.devices()[0])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="the TPU compiler (pip install 'jax[tpu]')")
def test_tiny_model_compiles_for_a_v5e_8(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_PLATFORMS"))}
    result = subprocess.run([sys.executable, "-m", "scripts.aot_compile", "--topology", "v5e:2x4", "--mesh", "fsdp:8",
                             "--json-out", str(tmp_path / "tpu.json"), "--depth", "2", "--vocab-size", "512",
                             "--seq-len", "256", "--device-batch-size", "2", "--total-batch-size", "8192"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            # compile only: another libtpu process (its lock file) is no reason to fail
                            env=env | {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "tpu.json").read_text())
    assert out["chips"] == 8 and out["device_kind"].startswith("TPU v5")
    train = out["train"]
    assert train["attention"] == "splash" and train["fits"] is True and 0 < train["estimated_mfu"] < 100
    assert train["roofline_flops_per_chip"] >= train["model_flops_per_step"] / 8 * 0.9  # all the work is counted


def test_hlo_kernels_reads_gemms_fp8_and_cudnn_attention():
    """The counts from a hand-written fragment of optimized GPU HLO: a bf16 GEMM fusion, an FP8 one (its operands
    converted inside a nested fusion), a cuBLAS call, cuDNN attention forward and backward; dots inside fusion
    computations are not counted again."""
    hlo = """HloModule m

%nested (p0: f32[16,32]) -> f8e4m3fn[16,32] {
  %p0 = f32[16,32]{1,0} parameter(0)
  ROOT %c = f8e4m3fn[16,32]{1,0} convert(%p0)
}

%gemm_bf16 (a: bf16[16,32], b: bf16[32,8]) -> bf16[16,8] {
  %a = bf16[16,32]{1,0} parameter(0)
  %b = bf16[32,8]{1,0} parameter(1)
  ROOT %d = bf16[16,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%gemm_fp8 (x: f32[16,32], y: f8e4m3fn[32,8]) -> f32[16,8] {
  %x = f32[16,32]{1,0} parameter(0)
  %q = f8e4m3fn[16,32]{1,0} fusion(%x), kind=kCustom, calls=%nested
  %y = f8e4m3fn[32,8]{1,0} parameter(1)
  ROOT %d8 = f32[16,8]{1,0} dot(%q, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: bf16[16,32], b: bf16[32,8], x: f32[16,32], y: f8e4m3fn[32,8]) -> bf16[16,8] {
  %a = bf16[16,32]{1,0} parameter(0)
  %b = bf16[32,8]{1,0} parameter(1)
  %x = f32[16,32]{1,0} parameter(2)
  %y = f8e4m3fn[32,8]{1,0} parameter(3)
  %g1 = bf16[16,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_bf16
  %g2 = f32[16,8]{1,0} fusion(%x, %y), kind=kCustom, calls=%gemm_fp8
  %cb = (bf16[16,8]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  %at = (bf16[1,1,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"mask_type": "CAUSAL", "sliding_window_length": 513}}
  %bw = (bf16[1,1,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={"cudnn_fmha_backend_config": {"mask_type": "CAUSAL", "sliding_window_length": 0}}
  ROOT %r = bf16[16,8]{1,0} add(%g1, %g1)
}
"""
    assert aot.hlo_kernels(hlo) == {"matmuls": 3, "fp8_matmuls": 1, "cudnn_attention_calls": 1,
                                    "cudnn_attention_backward_calls": 1,
                                    "cudnn_attention_masks": ["backward CAUSAL", "forward CAUSAL window 513"]}


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="XLA's GPU compiler (pip install 'jax[cuda12]')")
def test_tiny_model_compiles_for_8_h100s_with_cudnn_attention_and_fp8(tmp_path):
    """No GPU here: the GPU compiler itself, as users run it (JAX_PLATFORMS=cpu), for a modern model (sliding
    windows) with FP8 matmuls; the HLO it writes holds cuDNN attention for both windows and FP8 GEMMs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "scripts.aot_compile", "--topology", "h100:8", "--recipe", "modern",
                             "--fp8", "--depth", "2", "--vocab-size", "512", "--seq-len", "1024",
                             "--device-batch-size", "1", "--total-batch-size", "8192", "--programs", "train,decode",
                             "--json-out", str(tmp_path / "gpu.json"), "--hlo-out", str(tmp_path / "hlo")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "gpu.json").read_text())
    assert out["chips"] == 8 and out["device_kind"] == "NVIDIA H100 80GB HBM3"
    train = out["train"]
    assert train["attention"] == "cudnn" and train["fits"] is True and train["memory_fraction"] == 0.75
    assert train["hbm_bytes"] == int(aot.GPUS["h100"][0] * 0.75)
    # the short window (256 positions + the query's own) and the full causal one, forward and backward, in cuDNN
    assert train["cudnn_attention_masks"] == ["backward CAUSAL", "backward CAUSAL window 257", "forward CAUSAL",
                                              "forward CAUSAL window 257"]
    # the block matmuls (one scan body) and the head, forward and both gradients, in FP8; the optimizer's are not
    assert train["fp8_matmuls"] == 6 * 3 + 4 and train["matmuls"] > train["fp8_matmuls"]
    hlo = (tmp_path / "hlo" / "train.hlo.txt").read_text()
    assert aot.hlo_kernels(hlo)["fp8_matmuls"] == train["fp8_matmuls"] and "__cudnn$fmhaSoftmax" in hlo
    assert out["decode"]["fits"] is True and (tmp_path / "hlo" / "decode.hlo.txt").exists()


def speedrun_rows(recipe: str) -> int:
    """The rows per GPU scripts/speedrun.sh uses by default for its default depth of a recipe."""
    text = open(os.path.join(REPO_ROOT, "scripts", "speedrun.sh")).read()
    pattern = (r'DEVICE_BATCH_SIZE:-\$\(\[ "\$DEPTH" -le 20 \] && echo (\d+)' if recipe == "classic"
               else r'modern\).*?DEVICE_BATCH_SIZE="\$\{DEVICE_BATCH_SIZE:-(\d+)\}"')
    return int(re.search(pattern, text, re.S).group(1))


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="XLA's GPU compiler (pip install 'jax[cuda12]')")
@pytest.mark.parametrize("recipe,depth", [("classic", 20), ("modern", 24)])
def test_the_speedrun_defaults_fit_an_h100_with_room_to_spare(recipe, depth):
    """speedrun.sh's own rows per GPU (remat none, modern with FP8), compiled for 8 H100s: at least 10% of JAX's
    share of the GPU left over."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")} | {"JAX_PLATFORMS": "cpu"}
    argv = ["--topology", "h100:8", "--recipe", recipe, "--depth", str(depth), "--device-batch-size",
            str(speedrun_rows(recipe)), "--programs", "train"] + (["--fp8"] if recipe == "modern" else [])
    result = subprocess.run([sys.executable, "-m", "scripts.aot_compile", *argv], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    train = json.loads(result.stdout)["train"]
    assert train["fits"] and train["headroom"] >= 0.10, train
    assert train["cudnn_attention_calls"] == (1 if recipe == "classic" else 2)  # not recomputed in the backward pass
    if recipe == "modern":
        assert train["fp8_matmuls"] == 22
