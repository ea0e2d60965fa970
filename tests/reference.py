"""Independent numpy (float64) references: attention, RoPE and the whole nanochat GPT forward from a torch-style
state dict ([out, in] weights), classic and with each of the modern recipe's switches. Written from the architecture
description, sharing no code with nanochat_jax."""
import numpy as np


def naive_attention(q, k, v, offsets=None, window=None):
    """q [B,T,N,D], k/v [B,S,K,D]; query i of row b at position p = offsets[b]+i sees keys j <= p (and, with a
    window w, j >= p - w)."""
    B, T, N, D = q.shape
    K = k.shape[2]
    offsets = np.zeros(B, int) if offsets is None else np.asarray(offsets)
    k = np.repeat(k, N // K, axis=2)
    v = np.repeat(v, N // K, axis=2)
    out = np.zeros((B, T, N, D))
    for b in range(B):
        for h in range(N):
            scores = q[b, :, h] @ k[b, :, h].T / np.sqrt(D)
            for i in range(T):
                scores[i, offsets[b] + i + 1:] = -np.inf
                if window is not None:
                    scores[i, :max(0, offsets[b] + i - window)] = -np.inf
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
    return out


def rope_angles(T, D, base=10000.0):
    inv_freq = base ** (-np.arange(0, D, 2) / D)
    return np.arange(T)[:, None] * inv_freq[None, :]  # [T, D/2]


def rotate(x, cos, sin):
    """x [B,T,H,D]; the pair (x[i], x[i+D/2]) turns by -angle: (a cos + b sin, -a sin + b cos)."""
    d = x.shape[-1] // 2
    a, b = x[..., :d], x[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return np.concatenate([a * c + b * s, -a * s + b * c], axis=-1)


def rms(x):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.finfo(np.float32).eps)


def bf16_round(x):
    """Round float values to bfloat16 (nearest even), as nanochat stores its RoPE tables."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def has_ve(i, n_layer):
    return i % 2 == (n_layer - 1) % 2


def layer_windows(seq_len, n_layer, pattern):
    short = int(np.ceil(seq_len / 4 / 128)) * 128
    sizes = [short if pattern[i % len(pattern)] == "S" else seq_len for i in range(n_layer)]
    return sizes[:-1] + [seq_len]


def gpt_forward(sd: dict, cfg: dict, idx: np.ndarray) -> np.ndarray:
    """nanochat's GPT forward in float64 numpy; sd uses nanochat's key names. cfg: the model config, with any of
    the modern switches (rope_base, qk_scale, window_pattern, value_embeds, residual_scalars, smear, backout)."""
    w = {k.removeprefix("_orig_mod."): np.asarray(v, np.float64) for k, v in sd.items()}
    B, T = idx.shape
    C, N, K, L = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["n_layer"]
    D = C // N
    modern = cfg.get("recipe", "classic") == "modern"  # (the recipe by name: its tables are in the compute dtype)
    angles = rope_angles(T, D, cfg.get("rope_base", 10000.0)).astype(np.float32)
    cos, sin = np.cos(angles).astype(np.float64), np.sin(angles).astype(np.float64)
    if not modern:  # the classic tables are bf16
        cos, sin = bf16_round(cos), bf16_round(sin)
    pattern = cfg.get("window_pattern")
    windows = layer_windows(cfg["sequence_len"], L, pattern) if pattern else [None] * L
    x = rms(w["transformer.wte.weight"][idx])
    if cfg.get("smear"):
        gate = w["smear_lambda"] * sigmoid(x[:, 1:, :24] @ w["smear_gate.weight"].T)
        x = np.concatenate([x[:, :1], x[:, 1:] + gate * x[:, :-1]], axis=1)
    x0, x_mid = x, None
    for i in range(L):
        p = f"transformer.h.{i}."
        if cfg.get("residual_scalars"):
            x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ w[p + "attn.c_q.weight"].T).reshape(B, T, N, D)
        k = (h @ w[p + "attn.c_k.weight"].T).reshape(B, T, K, D)
        v = (h @ w[p + "attn.c_v.weight"].T).reshape(B, T, K, D)
        if cfg.get("value_embeds") and has_ve(i, L):
            gate = 3 * sigmoid(h[..., :12] @ w[p + "attn.ve_gate.weight"].T)
            v = v + gate[..., None] * w[f"value_embeds.{i}.weight"][idx].reshape(B, T, K, D)
        q, k = rms(rotate(q, cos, sin)) * cfg.get("qk_scale", 1.0), rms(rotate(k, cos, sin)) * cfg.get("qk_scale", 1.0)
        x = x + naive_attention(q, k, v, window=windows[i]).reshape(B, T, C) @ w[p + "attn.c_proj.weight"].T
        h = np.maximum(rms(x) @ w[p + "mlp.c_fc.weight"].T, 0) ** 2
        x = x + h @ w[p + "mlp.c_proj.weight"].T
        if i == L // 2:
            x_mid = x
    if cfg.get("backout"):
        x = x - w["backout_lambda"] * x_mid
    logits = (rms(x) @ w["lm_head.weight"].T)[..., : cfg["vocab_size"]]
    return 15 * np.tanh(logits / 15)


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.3) -> dict:
    """Random weights for every parameter of cfg's architecture (nanochat's names and torch shapes)."""
    rng = np.random.default_rng(seed)
    C, N, K, L = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["n_layer"]
    D, Vp = C // N, -(-cfg["vocab_size"] // 64) * 64
    shapes = {"transformer.wte.weight": (Vp, C), "lm_head.weight": (Vp, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes |= {p + "attn.c_q.weight": (N * D, C), p + "attn.c_k.weight": (K * D, C),
                   p + "attn.c_v.weight": (K * D, C), p + "attn.c_proj.weight": (C, N * D),
                   p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)}
        if cfg.get("value_embeds") and has_ve(i, L):
            shapes |= {p + "attn.ve_gate.weight": (K, 12), f"value_embeds.{i}.weight": (Vp, K * D)}
    if cfg.get("residual_scalars"):
        shapes |= {"resid_lambdas": (L,), "x0_lambdas": (L,)}
    if cfg.get("smear"):
        shapes |= {"smear_gate.weight": (1, 24), "smear_lambda": (1,)}
    if cfg.get("backout"):
        shapes |= {"backout_lambda": (1,)}
    out = {k: (rng.standard_normal(s) * std).astype(np.float32) for k, s in shapes.items()}
    for name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):  # scalars near their init
        if name in out:
            out[name] = (out[name] + {"resid_lambdas": 1.0, "x0_lambdas": 0.1}.get(name, 0.3)).astype(np.float32)
    return out
