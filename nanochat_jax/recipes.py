"""The recipes, nanochat of December 2025 (classic) and its time-to-GPT-2 recipe (modern), each chosen once
(`train.base --recipe`), recorded in every checkpoint's model config, and carrying all that differs between them."""
from dataclasses import dataclass

MODERN_SWITCHES = dict(rope_base=100000.0, qk_scale=1.2, window_pattern="SSSL", value_embeds=True,
                       residual_scalars=True, smear=True, backout=True)


@dataclass(frozen=True)
class AdamGroup:
    """One AdamW group (optim.LABELS names them)."""
    lr_flag: str | None  # its lr: lr x this flag's value x the batch's lr scale (None: lr alone)
    lr: float
    betas: tuple[float, float]
    weight_decay: float | None  # None: --weight-decay's
    width_scaled: bool = True  # x (n_embd / 768)^-0.5 (tuned at 768)


@dataclass(frozen=True)
class Recipe:
    name: str
    switches: dict  # GPTConfig fields it sets on top of the classic model (config_from_depth)
    width_multiple: int  # the width, 64 x depth, rounded up to a multiple of this (head dim exactly 128)
    uniform_init: bool  # nanochat's current init: uniform +-sqrt(3/C) matrices, 0.8 x the embedding (else normal)
    bf16_rope: bool  # the RoPE tables rounded to bf16, as classic nanochat stores them (else the compute dtype)
    horizon_params: str  # what --target-param-data-ratio counts: "num_params" (all) or "scaling_params"
    batch_from_horizon: bool  # --total-batch-size -1 sizes the batch, the lrs and Muon's decay from the horizon
    muon: str  # the Muon variant (optim.MUON_VARIANTS)
    muon_in_compute_dtype: bool  # orthogonalise in the compute dtype (else always bf16)
    adam: dict  # the AdamW groups by label: AdamGroup
    optimizer: dict  # the optimizer flags' defaults
    schedule: dict  # train.base's schedule and sizing flags' defaults
    vocab_size: int  # the tokenizer it trains


RECIPES = {
    "classic": Recipe("classic", {}, 1, uniform_init=False, bf16_rope=True, horizon_params="num_params",
                      batch_from_horizon=False, muon="classic", muon_in_compute_dtype=False,
                      adam={"embedding": AdamGroup("embedding_lr", 1.0, (0.8, 0.95), None),
                            "unembedding": AdamGroup("unembedding_lr", 1.0, (0.8, 0.95), None)},
                      optimizer=dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0,
                                     scalar_lr=0.5, grad_clip=1.0),
                      schedule=dict(total_batch_size=524288, target_param_data_ratio=20, warmup_steps=0,
                                    warmdown_ratio=0.2, final_lr_frac=0.0), vocab_size=65536),
    "modern": Recipe("modern", MODERN_SWITCHES, 128, uniform_init=True, bf16_rope=False,
                     horizon_params="scaling_params", batch_from_horizon=True, muon="modern",
                     muon_in_compute_dtype=True,  # nanochat's current per-group settings (fixed weight decays):
                     adam={"unembedding": AdamGroup("unembedding_lr", 1.0, (0.8, 0.96), 0.01),
                           "embedding": AdamGroup("embedding_lr", 1.0, (0.8, 0.995), 0.001),
                           "value_embeds": AdamGroup("embedding_lr", 0.5, (0.8, 0.995), 0.01),
                           "resid": AdamGroup("scalar_lr", 0.01, (0.8, 0.95), 0.05, width_scaled=False),
                           "x0": AdamGroup("scalar_lr", 1.0, (0.96, 0.95), 0.0, width_scaled=False),
                           "smear": AdamGroup(None, 0.2, (0.8, 0.95), 0.0, width_scaled=False)},
                     optimizer=dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, weight_decay=0.28,
                                    scalar_lr=0.5, grad_clip=0.0),
                     schedule=dict(total_batch_size=-1, target_param_data_ratio=12, warmup_steps=40,
                                   warmdown_ratio=0.65, final_lr_frac=0.05), vocab_size=32768)}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {tuple(RECIPES)}")
    return RECIPES[name]
