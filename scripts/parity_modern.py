"""Our modern recipe against nanochat's current code (PyTorch), in fp32 on the same random weights, printing the largest
relative difference of each: an imported checkpoint's logits (the full forward past the short window, our KV-cache
decode), three steps of its fused Muon and a short training run of both from its init (against our Trainer.step).

    git clone https://github.com/karpathy/nanochat /tmp/nanochat_head && pip install torch filelock   # HEAD (92d63d4)
    python -m scripts.parity_modern --nanochat /tmp/nanochat_head      # with $NANOCHAT_BASE_DIR/tokenizer/
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from nanochat_jax.model.gpt import GPT, init_cache
from nanochat_jax.model.interop import read_model_config, state_dict_to_params
from nanochat_jax.training.optim import MODERN_MUON, Schedule, build_optimizer, muon
from nanochat_jax.model.sharding import make_mesh
from nanochat_jax.training.trainer import Trainer
from scripts import nanochat_parser, parse_with_checkout, random_pair


def relative(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def logits(torch, n_layer: int, T: int = 320) -> dict:
    tokenizer, _, ref, model = random_pair(std=0.05, sequence_len=512, n_layer=n_layer, n_head=2, n_kv_head=1,
                                           n_embd=128, window_pattern="SSSL")
    idx = np.random.default_rng(0).integers(0, tokenizer.get_vocab_size(), (2, T))
    with torch.no_grad():
        expected = ref(torch.tensor(idx)).float().numpy()
    full = np.asarray(jax.jit(lambda i: model(i))(jnp.asarray(idx)))
    step = jax.jit(lambda i, c, p: model.forward_cached(i, c, p))
    out, cache = step(jnp.asarray(idx[:, :200]), init_cache(model.config, 2, 512), jnp.zeros(2, jnp.int32))
    outs = [out]
    for t in range(200, T):
        out, cache = step(jnp.asarray(idx[:, t:t + 1]), cache, jnp.full(2, t, jnp.int32))
        outs.append(out)
    return {"forward": relative(full, expected), "cached decode": relative(jnp.concatenate(outs, 1), expected)}


def muon_steps(torch, nanochat_optim, shape=(2, 96, 256), steps: int = 3) -> float:
    """nanochat's muon_step_fused (uncompiled) on torch-layout stacks [L, out, in] against ours on [L, in, out]."""
    rng = np.random.default_rng(0)
    L, out_, in_ = shape
    W = rng.standard_normal(shape).astype(np.float32)
    params = {"w": jnp.asarray(W.transpose(0, 2, 1))}
    tx = muon(0.02, 0.9, variant=MODERN_MUON, weight_decay=0.3, dtype=jnp.float32)
    state = tx.init(params)
    tp, buf = torch.tensor(W), torch.zeros(shape)
    moment = torch.zeros((L, out_, 1) if out_ >= in_ else (L, 1, in_))
    for _ in range(steps):
        g = rng.standard_normal(shape).astype(np.float32)
        updates, state = tx.update({"w": jnp.asarray(g.transpose(0, 2, 1))}, state, params)
        params = {"w": params["w"] + updates["w"]}
        lr = 0.02 * max(1.0, out_ / in_) ** 0.5
        nanochat_optim.muon_step_fused(torch.tensor(g), tp, buf, moment, torch.tensor(0.9), torch.tensor(lr),
                                       torch.tensor(0.3), torch.tensor(0.9), 5, -1 if out_ >= in_ else -2)
    moved = tp.numpy() - W
    return float(np.abs(np.asarray(params["w"]).transpose(0, 2, 1) - W - moved).max() / np.abs(moved).max())


def training(torch, TorchGPT, TorchConfig, steps: int = 30, rows: int = 4, T: int = 256) -> list[tuple]:
    """Both from nanochat's init plus a little noise (without it the zero projections leave the final norm blind to the
    residual scalars, whose rounding-noise gradients Adam's first steps blow up, differently in each), on a cycle of 4
    random batches (so the loss falls), with its current learning rates and schedules: the two losses at each step."""
    cfg = dict(sequence_len=T, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")
    torch.manual_seed(0)
    ref = TorchGPT(TorchConfig(**cfg))
    ref.init_weights()
    with torch.no_grad():
        for param in ref.parameters():
            param.add_(0.02 * torch.randn_like(param))
    wd = 0.28
    opt = ref.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=wd, scalar_lr=0.5)
    config = read_model_config({"model_config": cfg}, "parity")
    params = state_dict_to_params({k: v.float().numpy().copy() for k, v in ref.state_dict().items()}, config)
    make = lambda: GPT(config, rngs=nnx.Rngs(0))  # noqa: E731
    trainer = Trainer.create(make, build_optimizer(config.n_embd, 0.3, 0.008, 0.02, wd, grad_clip=0.0, recipe="modern",
                                                   muon_dtype=jnp.float32), make_mesh(devices=jax.devices()[:1]))
    state = trainer.start_from(jax.device_put(jax.tree.map(jnp.asarray, params), trainer.params_sharding))
    schedule = Schedule(steps, warmdown_ratio=0.65, final_lr_frac=0.05, warmup_steps=5, modern=True)
    data = np.random.default_rng(0).integers(0, 512, (4, rows, T + 1))
    losses = []
    for step in range(steps):
        tokens = data[step % 4]
        lrm, momentum, wd_mult = schedule(step)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, wd * wd_mult
        loss = ref(torch.tensor(tokens[:, :-1]), torch.tensor(tokens[:, 1:]))
        loss.backward()
        loss = loss.detach()
        opt.step()
        ref.zero_grad(set_to_none=True)
        batch = jax.device_put({"inputs": tokens[None, :, :-1].astype(np.int32),
                                "targets": tokens[None, :, 1:].astype(np.int32)}, trainer.batch_sharding())
        state.params, state.opt_state, out = trainer.run_step(state.params, state.opt_state, batch, lrm, momentum,
                                                              wd_mult)
        losses.append((float(loss), float(out["loss"])))
    return losses


def main(argv=None):
    parse_with_checkout(nanochat_parser(__doc__, "a checkout of nanochat's current code"), argv)
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")  # its compute dtype on this machine: fp32 like ours
    import torch
    from nanochat import optim as nanochat_optim
    from nanochat.gpt import GPT as TorchGPT, GPTConfig as TorchConfig
    for name in ("muon_step_fused", "adamw_step_fused"):  # its kernels uncompiled: no C++ toolchain needed
        fused = getattr(nanochat_optim, name)
        setattr(nanochat_optim, name, getattr(fused, "_torchdynamo_orig_callable", fused))

    for n_layer in (4, 5):  # value embeddings on odd layers (even depth) or on even ones (odd depth)
        for name, err in logits(torch, n_layer).items():
            print(f"d{n_layer} logits, {name}: max relative difference {err:.2e}")
    for shape in ((2, 96, 256), (2, 256, 96)):
        print(f"Muon {shape} (torch [L, out, in]), 3 steps: max relative difference of the moves "
              f"{muon_steps(torch, nanochat_optim, shape):.2e}")
    losses = training(torch, TorchGPT, TorchConfig)
    for step, (theirs, ours) in enumerate(losses):
        if step % 5 == 0 or step == len(losses) - 1:
            print(f"training step {step:2d}: loss nanochat {theirs:.6f}, ours {ours:.6f}")
    print(f"training: max relative loss difference {max(abs(a - b) / a for a, b in losses):.2e}")


if __name__ == "__main__":
    main()
