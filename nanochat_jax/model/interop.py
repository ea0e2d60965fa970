"""Import nanochat (PyTorch) checkpoints, of the classic architecture (nanochat of December 2025) or the modern one
(its time-to-GPT-2 recipe, whose model_config has a "window_pattern"): `model, tokenizer, meta = import_nanochat(dir)`
for a directory of model_<step>.pt, meta_<step>.json (with "model_config") and, for published models, tokenizer.pkl
(a pickled tiktoken Encoding). Only this module needs torch (the `torch` extra).
Unpickling tokenizer.pkl runs code from the file, as nanochat itself does: import only checkpoints you trust.
"""
import glob
import json
import os
import pickle
import re
from functools import reduce
from operator import getitem

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.model.gpt import GPT, SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig, modern_config
from nanochat_jax.model.sharding import abstract_params, make_mesh, shardings_of
from nanochat_jax.data.tokenizer import Tokenizer


def find_last_step(checkpoint_dir: str) -> int:
    steps = [int(m.group(1)) for f in glob.glob(os.path.join(checkpoint_dir, "model_*.pt"))
             if (m := re.fullmatch(r"model_(\d{6,})\.pt", os.path.basename(f)))]
    if not steps:
        raise FileNotFoundError(f"no nanochat checkpoint (model_<step>.pt) in {checkpoint_dir}")
    return max(steps)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("importing nanochat checkpoints needs torch: pip install 'nanochat-jax[torch]' "
                          "(on CPU-only machines: pip install torch==2.13.0 first)") from e
    return torch


def nanochat_layout(config: GPTConfig) -> dict[str, tuple[tuple, str, object]]:
    """nanochat's state-dict keys -> (their torch shape, [out, in] for linear layers; our parameter's path; the index
    in it: the layer of a stacked tensor, or ... for the whole): the one table the import checks and converts by."""
    C, D, Vp, K, N = config.n_embd, config.head_dim, config.padded_vocab_size, config.n_kv_head, config.n_head
    layout = {"transformer.wte.weight": ((Vp, C), "wte", ...), "lm_head.weight": ((Vp, C), "lm_head.kernel", ...)}
    block = {"attn.c_q": (N * D, C), "attn.c_k": (K * D, C), "attn.c_v": (K * D, C), "attn.c_proj": (C, N * D),
             "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
    for i in range(config.n_layer):
        layout |= {f"transformer.h.{i}.{name}.weight": (shape, f"h.{name}.kernel", i) for name, shape in block.items()}
    for j, i in enumerate(config.ve_layers()):  # our gate is stacked over every layer: zeros where nanochat has none
        layout[f"transformer.h.{i}.attn.ve_gate.weight"] = ((K, VE_GATE_CHANNELS), "h.attn.ve_gate.kernel", i)
        layout[f"value_embeds.{i}.weight"] = ((Vp, K * D), "value_embeds", j)
    if config.residual_scalars:
        layout |= {name: ((config.n_layer,), name, ...) for name in ("resid_lambdas", "x0_lambdas")}
    if config.smear:
        layout |= {"smear_gate.weight": ((1, SMEAR_CHANNELS), "smear_gate.kernel", ...),
                   "smear_lambda": ((1,), "smear_lambda", ...)}
    if config.backout:
        layout["backout_lambda"] = ((1,), "backout_lambda", ...)
    return layout


def state_dict_to_params(state_dict: dict[str, np.ndarray], config: GPTConfig) -> dict:
    """A nanochat state dict (numpy, any float dtype) -> our parameter tree (pure dict, fp32, kernels [in, out])."""
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}  # torch.compile's prefix
    layout = nanochat_layout(config)
    missing, unexpected = sorted(layout.keys() - state_dict.keys()), sorted(state_dict.keys() - layout.keys())
    if missing or unexpected:
        raise ValueError(f"not a {config.recipe}-architecture nanochat checkpoint: "
                         f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    abstract = nnx.state(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), nnx.to_pure_dict(abstract))
    for key, (shape, path, index) in layout.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, the model config implies {shape}")
        value = np.asarray(state_dict[key], dtype=np.float32)
        reduce(getitem, path.split("."), params)[index] = value.T if path.endswith("kernel") else value
    return params


CLASSIC_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def read_model_config(meta: dict, path: str) -> GPTConfig:
    """A nanochat model_config: the classic keys, or those and "window_pattern" (every modern switch on)."""
    config = meta.get("model_config")
    if not isinstance(config, dict) or set(config) not in (set(CLASSIC_KEYS), {*CLASSIC_KEYS, "window_pattern"}):
        got = sorted(config) if isinstance(config, dict) else config
        raise ValueError(f"{path}: model_config {got} is neither nanochat's classic architecture (the keys "
                         f"{list(CLASSIC_KEYS)}) nor its current one (those and window_pattern)")
    model = GPTConfig(**config)
    return modern_config(model, window_pattern=model.window_pattern) if "window_pattern" in config else model


def find_tokenizer(checkpoint_dir: str) -> str | None:
    """tokenizer.pkl beside the weights (published models), else nanochat's layout: <base>/tokenizer/tokenizer.pkl
    for <base>/<stage>_checkpoints/<tag>/."""
    candidates = (os.path.join(checkpoint_dir, "tokenizer.pkl"),
                  os.path.join(checkpoint_dir, "..", "..", "tokenizer", "tokenizer.pkl"))
    return next((os.path.normpath(path) for path in candidates if os.path.exists(path)), None)


def import_nanochat(checkpoint_dir: str, step: int | None = None, dtype=jnp.float32, mesh=None):
    """(model, tokenizer or None without a tokenizer.pkl, meta): fp32 weights placed on `mesh` (default: replicated)."""
    checkpoint_dir = os.path.expanduser(checkpoint_dir)
    torch = _torch()
    step = find_last_step(checkpoint_dir) if step is None else step
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    for path in (model_path, meta_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"missing {path} (nanochat writes model_<step>.pt and meta_<step>.json together)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    config = read_model_config(meta, meta_path)
    state_dict = torch.load(model_path, map_location="cpu", weights_only=True)
    params = state_dict_to_params({k: v.float().numpy() for k, v in state_dict.items()}, config)

    graphdef, target = abstract_params(lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype),
                                       make_mesh() if mesh is None else mesh)
    model = nnx.merge(graphdef, jax.device_put(params, shardings_of(target)))

    tokenizer = None
    if (tok_path := find_tokenizer(checkpoint_dir)) is not None:
        with open(tok_path, "rb") as f:
            tokenizer = Tokenizer(pickle.load(f))
        if tokenizer.get_vocab_size() != config.vocab_size:
            raise ValueError(f"{tok_path} has {tokenizer.get_vocab_size()} tokens but the model expects "
                             f"{config.vocab_size}")
    return model, tokenizer, meta


def write_random_nanochat(directory: str, tokenizer, TorchGPT, TorchConfig, std: float = 0.3, **config):
    """A nanochat GPT (nanochat.gpt's classes, passed in) with random weights everywhere (nanochat's init zeroes the
    head, which would hide differences), saved with the tokenizer for the parity scripts; returns it in eval mode."""
    torch = _torch()
    config = dict(sequence_len=2048, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1,
                  n_embd=128) | config
    torch.manual_seed(0)
    ref_model = TorchGPT(TorchConfig(**config))
    ref_model.init_weights()
    with torch.no_grad():
        for param in ref_model.parameters():
            param.normal_(0, std)
    ref_model.eval()
    torch.save(ref_model.state_dict(), os.path.join(directory, "model_000000.pt"))
    with open(os.path.join(directory, "meta_000000.json"), "w") as f:
        json.dump({"model_config": config, "step": 0}, f)
    with open(os.path.join(directory, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tokenizer.enc, f)
    return ref_model
