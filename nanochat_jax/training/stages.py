"""What the training entry points share: the flag groups and their checks, building the trainer, the previous
stage's checkpoint, starting or resuming a run, and wandb.

A chat stage (train.mid, train.sft, train.rl) reads the latest checkpoint of the stage before it (--source,
--model-tag, --step) and writes to $NANOCHAT_BASE_DIR/<stage dir>/<the same model tag>/. It starts from those
parameters with a fresh optimizer; --resume continues its own latest checkpoint instead (parameters, optimizer state,
data position).
"""
import argparse
import os
from dataclasses import asdict

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.training.checkpoint import STAGE_DIRS, Checkpointer, complete_steps, stage_directory
from nanochat_jax.common import get_base_dir, parse_dtype, print0
from nanochat_jax.model.gpt import GPT, REMAT_POLICIES, GPTConfig, config_from_meta
from nanochat_jax.recipes import RECIPES
from nanochat_jax.training.optim import build_optimizer
from nanochat_jax.model.sharding import make_mesh, parse_mesh_spec
from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.training.trainer import Trainer, TrainState


def add_optimizer_flags(p: argparse.ArgumentParser, grad_clip: float | None = None,
                        weight_decay: float | None = None):
    """The learning rates and the rest; None (the default) is the model's recipe's value (recipes.RECIPES)."""
    p.add_argument("--embedding-lr", type=float, default=None, help="default: classic 0.2, modern 0.3")
    p.add_argument("--unembedding-lr", type=float, default=None, help="default: classic 0.004, modern 0.008")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon's (default 0.02)")
    p.add_argument("--scalar-lr", type=float, default=None, help="modern recipe: the x0 scalars' (resid: x 0.01; 0.5)")
    p.add_argument("--weight-decay", type=float, default=weight_decay, help="classic: AdamW's (default 0); modern: "
                   "Muon's cautious decay, scaled by batch and horizon, cosine to 0 (default 0.28)")
    p.add_argument("--grad-clip", type=float, default=grad_clip, help="global-norm clip, 0: off (default: classic "
                   "1.0, modern 0)")


def fill_optimizer_defaults(args, recipe: str):
    """The optimizer flags left unset take the recipe's values (so the run's meta records what was used)."""
    for name, value in RECIPES[recipe].optimizer.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def add_chat_stage_flags(p: argparse.ArgumentParser, sources: list[str], device_batch_size: int,
                         init_lr_frac: float, eval_every: int):
    p.add_argument("--source", choices=sources, default=sources[-1], help="the stage to start from")
    p.add_argument("--model-tag", default=None, help="the source model, e.g. d20 (default: the newest complete one); "
                   "the output goes under the same tag")
    p.add_argument("--step", type=int, default=None, help="the source checkpoint's step (default: the latest)")
    p.add_argument("--device-batch-size", type=int, default=device_batch_size, help="rows per device per micro-step")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one epoch of the data)")
    add_optimizer_flags(p, grad_clip=0.0, weight_decay=0.0)  # nanochat clips only in pretraining
    p.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="learning rates x this")
    p.add_argument("--eval-every", type=int, default=eval_every, help="steps between evaluations (-1: only at the end)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    add_run_flags(p)


def add_run_flags(p: argparse.ArgumentParser):
    p.add_argument("--resume", action="store_true", help="continue from this run's latest checkpoint")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="compute dtype (default: by backend)")
    p.add_argument("--mesh", default=None, help="data:8 | fsdp:8 | data:2,fsdp:4 ... (default: all devices on data)")
    p.add_argument("--remat", choices=sorted(REMAT_POLICIES), default="none", help="what the backward pass keeps of "
                   "each block: none (matmul and attention outputs), dots (matmul outputs: attention runs twice), "
                   "full (block inputs only; least memory)")
    p.add_argument("--run", default=None, help="wandb run name (logging is off unless given and wandb is installed)")
    p.add_argument("--seed", type=int, default=0)


def check_flags(p: argparse.ArgumentParser, args, positive=(), every=(), nonnegative=()):
    """Flags that must be positive (or unset), that take a positive number or -1, and that must be >= 0."""
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in nonnegative:
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in every:
        if getattr(args, name) == 0 or getattr(args, name) < -1:
            p.error(f"--{name.replace('_', '-')} must be positive, or -1")
    if getattr(args, "num_iterations", -1) == 0 or getattr(args, "num_iterations", -1) < -1:
        p.error("--num-iterations must be positive, or -1")
    check_mesh(p, args)


def check_mesh(p: argparse.ArgumentParser, args):
    """--mesh well formed and covering this run's devices, or argparse's one-line error (before anything compiles)."""
    if getattr(args, "mesh", None):
        try:
            parse_mesh_spec(args.mesh, jax.device_count())
        except ValueError as e:
            p.error(str(e))


def batch_geometry(args, num_devices: int) -> int:
    """Gradient-accumulation steps that reach --total-batch-size from --device-batch-size rows on every device."""
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * num_devices
    if args.total_batch_size % tokens_per_micro_step:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} is not a multiple of device batch x sequence x "
                         f"devices = {args.device_batch_size} x {args.max_seq_len} x {num_devices} = "
                         f"{tokens_per_micro_step}")
    return args.total_batch_size // tokens_per_micro_step


def make_trainer(args, config: GPTConfig, lr_fraction: float = 1.0, lr_scale: float = 1.0):
    """(trainer, make_model) for a model of `config` under --mesh/--dtype with the flags' learning rates (unset
    ones: the model's recipe's) x lr_fraction (all) x lr_scale (all but the modern smear group's)."""
    dtype = parse_dtype(args.dtype)
    fp8 = getattr(args, "fp8", False)  # (pretraining only; evaluation sees the model without it)
    make_model = lambda fp8=fp8: GPT(config, rngs=nnx.Rngs(args.seed), dtype=dtype, remat=args.remat, fp8=fp8)  # noqa: E731
    fill_optimizer_defaults(args, config.recipe)
    tx = build_optimizer(config.n_embd, args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.weight_decay,
                         args.grad_clip, recipe=config.recipe, scalar_lr=args.scalar_lr, lr_scale=lr_scale,
                         lr_fraction=lr_fraction,
                         muon_dtype=dtype if RECIPES[config.recipe].muon_in_compute_dtype else jnp.bfloat16)
    make_eval = (lambda: make_model(False)) if fp8 else None
    return Trainer.create(make_model, tx, make_mesh(args.mesh), make_eval), make_model


def model_tags_note(source: str) -> str:
    """'; the <source> models here: d4 (steps [..]), ...' for an error message ('' when there are none)."""
    stage_dir = os.path.join(get_base_dir(), STAGE_DIRS[source])
    tags = sorted(t for t in os.listdir(stage_dir) if complete_steps(os.path.join(stage_dir, t))) \
        if os.path.isdir(stage_dir) else []
    return f"; the {source} models here: {', '.join(tags)} (--model-tag)" if tags else ""


class Source:
    """The checkpoint a chat stage starts from."""

    def __init__(self, source: str, model_tag: str | None, step: int | None):
        try:  # a missing model or step: one line naming what there is, before anything compiles
            self.stage, self.directory = source, stage_directory(source, model_tag)
            self.checkpointer = Checkpointer(self.directory, max_to_keep=None, async_save=False, create=False)
            self.step = self.checkpointer.resolve_step(step)
        except FileNotFoundError as e:
            raise SystemExit(f"{e}{model_tags_note(source)}") from None
        self.meta = self.checkpointer.meta(self.step)
        self.config = config_from_meta(self.meta["model_config"])
        self.tokenizer = Tokenizer.load(os.path.join(self.directory, "tokenizer"))
        self.model_tag = os.path.basename(self.directory)

    def params(self, trainer: Trainer):
        """The parameters, placed on the trainer's mesh."""
        return self.checkpointer.restore({"params": trainer.abstract_params}, self.step)[0]["params"]

    def info(self) -> dict:
        return {"stage": self.stage, "directory": self.directory, "step": self.step}


def open_chat_stage(args, stage: str) -> tuple[Source, Trainer, Checkpointer]:
    """A chat stage's source checkpoint (--source, --model-tag, --step), its trainer (learning rates x
    --init-lr-frac) and where it writes: $NANOCHAT_BASE_DIR/<stage dir>/<the source's model tag>/. A --max-seq-len
    left unset becomes the model's context."""
    source = Source(args.source, args.model_tag, args.step)
    if getattr(args, "max_seq_len", 0) is None:
        args.max_seq_len = source.config.sequence_len
    trainer, _ = make_trainer(args, source.config, args.init_lr_frac)
    return source, trainer, Checkpointer(os.path.join(get_base_dir(), STAGE_DIRS[stage], source.model_tag))


def epoch_steps(args, num_examples: int, per_step: int) -> int:
    """--num-iterations when given, else the steps of --num-epochs passes over num_examples at per_step a step."""
    return args.num_iterations if args.num_iterations > 0 else max(1, num_examples // per_step * args.num_epochs)


def run_meta(args, config: GPTConfig, source: Source | None = None) -> dict:
    """What every checkpoint of the run records besides its step and metrics."""
    return {"model_config": asdict(config), "train_config": vars(args)} | ({} if source is None else
                                                                          {"source": source.info()})


def begin_run(args, trainer: Trainer, checkpointer: Checkpointer, batches, tokenizer, config: GPTConfig,
              num_iterations: int, source: Source | None = None, make_model=None) -> TrainState:
    """The state a run trains from. With --resume: the run's latest checkpoint (params, optimizer state, the loop's
    totals), and `batches` moved to its data position. Else step 0 of a new run, in a directory holding no
    checkpoints: the source's params with a fresh optimizer (a chat stage), or a fresh model (pretraining)."""
    if not args.resume:
        if checkpointer.latest_step() is not None:
            raise SystemExit(f"{checkpointer.directory} already holds checkpoints (steps "
                             f"{checkpointer.manager.all_steps()}): continue it with --resume, or move that directory "
                             "away to start over")
        checkpointer.save_tokenizer(tokenizer)
        return trainer.start_from(source.params(trainer)) if source is not None else trainer.init_state(make_model)
    step = checkpointer.latest_step()
    if step is None:
        raise SystemExit(f"--resume: no checkpoint in {checkpointer.directory}")
    saved = checkpointer.meta(step)
    if "loop_state" not in saved:
        raise SystemExit(f"--resume: step {step} in {checkpointer.directory} is not a training checkpoint "
                         "(no optimizer or data state; an imported model?)")
    if config_from_meta(saved["model_config"]) != config:
        raise SystemExit(f"--resume: {checkpointer.directory} holds a model {saved['model_config']}, but this run "
                         f"makes {asdict(config)}; use the same model flags or another --model-tag")
    # a saved data position means nothing under another data flag (mid/sft's --mixture, rl's --task)
    saved_config = saved.get("train_config", {})
    for flag in ("mixture", "task"):
        if flag in saved_config and saved_config[flag] != getattr(args, flag, None):
            raise SystemExit(f"--resume: the run was trained with --{flag} {saved_config[flag]}, not "
                             f"{getattr(args, flag, None)}")
    if step > num_iterations:
        raise SystemExit(f"--resume: the checkpoint is at step {step}, beyond this run's {num_iterations} "
                         "steps (a smaller --num-iterations or a different batch size?)")
    state = checkpointer.restore_training(step, trainer.abstract_params, trainer.abstract_opt_state, batches)
    print0(f"resumed from step {step} of {checkpointer.directory}")
    return state


def start_wandb(args, project: str):
    """A wandb run when --run is given and wandb is installed (process 0 only), else None."""
    if not args.run or jax.process_index() != 0:
        return None
    try:
        import wandb
    except ImportError:
        print0("--run given but wandb is not installed: logging to metrics.jsonl only")
        return None
    return wandb.init(project=project, name=args.run, config=vars(args))
