"""Independent numpy (float64) references: attention, RoPE and the whole nanochat GPT forward from a torch-style
state dict ([out, in] weights). Written from the architecture description, sharing no code with nanochat_jax."""
import numpy as np


def naive_attention(q, k, v, offsets=None):
    """q [B,T,N,D], k/v [B,S,K,D]; query i of row b at position offsets[b]+i sees keys j <= that position."""
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


def gpt_forward(sd: dict, cfg: dict, idx: np.ndarray) -> np.ndarray:
    """nanochat's classic GPT forward in float64 numpy; sd uses nanochat's key names."""
    w = {k.removeprefix("_orig_mod."): np.asarray(v, np.float64) for k, v in sd.items()}
    B, T = idx.shape
    C, N, K = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    D = C // N
    angles = rope_angles(T, D).astype(np.float32)
    cos, sin = bf16_round(np.cos(angles)), bf16_round(np.sin(angles))
    x = rms(w["transformer.wte.weight"][idx])
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = rms(x)
        q = (h @ w[p + "attn.c_q.weight"].T).reshape(B, T, N, D)
        k = (h @ w[p + "attn.c_k.weight"].T).reshape(B, T, K, D)
        v = (h @ w[p + "attn.c_v.weight"].T).reshape(B, T, K, D)
        q, k = rms(rotate(q, cos, sin)), rms(rotate(k, cos, sin))
        x = x + naive_attention(q, k, v).reshape(B, T, C) @ w[p + "attn.c_proj.weight"].T
        h = np.maximum(rms(x) @ w[p + "mlp.c_fc.weight"].T, 0) ** 2
        x = x + h @ w[p + "mlp.c_proj.weight"].T
    logits = (rms(x) @ w["lm_head.weight"].T)[..., : cfg["vocab_size"]]
    return 15 * np.tanh(logits / 15)


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)
    C, N, K = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    D, Vp = C // N, -(-cfg["vocab_size"] // 64) * 64
    shapes = {"transformer.wte.weight": (Vp, C), "lm_head.weight": (Vp, C)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        shapes |= {p + "attn.c_q.weight": (N * D, C), p + "attn.c_k.weight": (K * D, C),
                   p + "attn.c_v.weight": (K * D, C), p + "attn.c_proj.weight": (C, N * D),
                   p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)}
    return {k: (rng.standard_normal(s) * std).astype(np.float32) for k, s in shapes.items()}
