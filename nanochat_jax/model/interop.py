"""Import nanochat (PyTorch) checkpoints, of the classic architecture (nanochat of December 2025) or the modern one
(its time-to-GPT-2 recipe, whose model_config has a "window_pattern"):

    from nanochat_jax.model.interop import import_nanochat
    model, tokenizer, meta = import_nanochat("~/.cache/nanochat/chatsft_checkpoints/d20")

A checkpoint directory holds model_<step>.pt (a state dict), meta_<step>.json (with "model_config") and, for published
models, tokenizer.pkl (a pickled tiktoken Encoding). Only this module needs torch (the `torch` extra).
Unpickling tokenizer.pkl runs code from the file, as nanochat itself does: import only checkpoints you trust.
"""
import glob
import json
import os
import pickle
import re

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


def expected_shapes(config: GPTConfig) -> dict[str, tuple]:
    """nanochat's state-dict keys and their torch shapes ([out, in] for linear layers)."""
    C, D, Vp, K = config.n_embd, config.head_dim, config.padded_vocab_size, config.n_kv_head
    shapes = {"transformer.wte.weight": (Vp, C), "lm_head.weight": (Vp, C)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes |= {p + "attn.c_q.weight": (config.n_head * D, C), p + "attn.c_k.weight": (K * D, C),
                   p + "attn.c_v.weight": (K * D, C), p + "attn.c_proj.weight": (C, config.n_head * D),
                   p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)}
    for i in config.ve_layers():
        shapes |= {f"transformer.h.{i}.attn.ve_gate.weight": (K, VE_GATE_CHANNELS),
                   f"value_embeds.{i}.weight": (Vp, K * D)}
    if config.residual_scalars:
        shapes |= {"resid_lambdas": (config.n_layer,), "x0_lambdas": (config.n_layer,)}
    if config.smear:
        shapes |= {"smear_gate.weight": (1, SMEAR_CHANNELS), "smear_lambda": (1,)}
    if config.backout:
        shapes |= {"backout_lambda": (1,)}
    return shapes


def state_dict_to_params(state_dict: dict[str, np.ndarray], config: GPTConfig) -> dict:
    """A nanochat state dict (numpy, any float dtype) -> our parameter tree (pure dict, fp32, kernels [in, out])."""
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}  # torch.compile's prefix
    shapes = expected_shapes(config)
    missing, unexpected = sorted(shapes.keys() - state_dict.keys()), sorted(state_dict.keys() - shapes.keys())
    if missing or unexpected:
        raise ValueError(f"not a {config.recipe}-architecture nanochat checkpoint: "
                         f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    for key, shape in shapes.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, the model config implies {shape}")
    w = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}

    def stacked(name):  # the kernels of every layer, [n_layer, in, out]
        return {"kernel": np.stack([w[f"transformer.h.{i}.{name}.weight"].T for i in range(config.n_layer)])}

    blocks = {"attn": {name: stacked(f"attn.{name}") for name in ("c_q", "c_k", "c_v", "c_proj")},
              "mlp": {name: stacked(f"mlp.{name}") for name in ("c_fc", "c_proj")}}
    params = {"wte": w["transformer.wte.weight"], "h": blocks, "lm_head": {"kernel": w["lm_head.weight"].T}}
    if ve_layers := config.ve_layers():  # our gate is stacked over every layer: zeros where nanochat has none
        gate = np.zeros((config.n_layer, VE_GATE_CHANNELS, config.n_kv_head), np.float32)
        for i in ve_layers:
            gate[i] = w[f"transformer.h.{i}.attn.ve_gate.weight"].T
        blocks["attn"]["ve_gate"] = {"kernel": gate}
        params["value_embeds"] = np.stack([w[f"value_embeds.{i}.weight"] for i in ve_layers])
    if config.residual_scalars:
        params["resid_lambdas"], params["x0_lambdas"] = w["resid_lambdas"], w["x0_lambdas"]
    if config.smear:
        params["smear_gate"], params["smear_lambda"] = {"kernel": w["smear_gate.weight"].T}, w["smear_lambda"]
    if config.backout:
        params["backout_lambda"] = w["backout_lambda"]
    return params


CLASSIC_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def read_model_config(meta: dict, path: str) -> GPTConfig:
    """A nanochat model_config: the classic keys, or those and "window_pattern" (its current architecture, with every
    modern switch on)."""
    config = meta.get("model_config")
    modern = set(CLASSIC_KEYS) | {"window_pattern"}
    if not isinstance(config, dict) or set(config) not in (set(CLASSIC_KEYS), modern):
        got = sorted(config) if isinstance(config, dict) else config
        raise ValueError(f"{path}: model_config {got} is neither nanochat's classic architecture (the keys "
                         f"{list(CLASSIC_KEYS)}) nor its current one (those and window_pattern)")
    if "window_pattern" not in config:
        return GPTConfig(**config)
    return modern_config(GPTConfig(**config), window_pattern=config["window_pattern"])


def find_tokenizer(checkpoint_dir: str) -> str | None:
    """tokenizer.pkl beside the weights (published models), else nanochat's layout: <base>/tokenizer/tokenizer.pkl
    for <base>/<stage>_checkpoints/<tag>/."""
    for candidate in (os.path.join(checkpoint_dir, "tokenizer.pkl"),
                      os.path.join(checkpoint_dir, "..", "..", "tokenizer", "tokenizer.pkl")):
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
    return None


def import_nanochat(checkpoint_dir: str, step: int | None = None, dtype=jnp.float32, mesh=None):
    """Returns (model, tokenizer or None when no tokenizer.pkl is found, meta dict); the model's weights are fp32,
    placed on `mesh` (default: every device on the data axis, i.e. replicated)."""
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

    # the same form as checkpoint.load_model's: the parameters placed on the mesh by the sharding rules
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
