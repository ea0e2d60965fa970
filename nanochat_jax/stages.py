"""What the training entry points share: common flags, building the trainer, starting from the previous stage's
checkpoint, resuming a run, and wandb.

A chat stage (train.mid, train.sft, train.rl) reads the latest checkpoint of the stage before it (--source,
--model-tag, --step) and writes to $NANOCHAT_BASE_DIR/<stage dir>/<the same model tag>/. It starts from those
parameters with a fresh optimizer; --resume continues its own latest checkpoint instead (parameters, optimizer state,
data position).
"""
import argparse
import os
from dataclasses import asdict, dataclass
from typing import Any

import jax
from flax import nnx

from nanochat_jax.checkpoint import STAGE_DIRS, Checkpointer, stage_directory
from nanochat_jax.common import get_base_dir, parse_dtype, print0
from nanochat_jax.gpt import GPT, REMAT_POLICIES, GPTConfig
from nanochat_jax.optim import build_optimizer
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.trainer import Trainer


def add_chat_stage_flags(p: argparse.ArgumentParser, sources: list[str], device_batch_size: int,
                         init_lr_frac: float, eval_every: int):
    p.add_argument("--source", choices=sources, default=sources[-1], help="the stage to start from")
    p.add_argument("--model-tag", default=None, help="the source model, e.g. d20 (default: the deepest); the output "
                   "goes under the same tag")
    p.add_argument("--step", type=int, default=None, help="the source checkpoint's step (default: the latest)")
    p.add_argument("--device-batch-size", type=int, default=device_batch_size, help="rows per device per micro-step")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one epoch of the data)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="learning rates x this")
    p.add_argument("--grad-clip", type=float, default=0.0, help="global-norm clip (0: off, as nanochat)")
    p.add_argument("--eval-every", type=int, default=eval_every, help="steps between evaluations (-1: only at the end)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    add_run_flags(p)


def add_run_flags(p: argparse.ArgumentParser):
    p.add_argument("--resume", action="store_true", help="continue from this run's latest checkpoint")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="compute dtype (default: by backend)")
    p.add_argument("--mesh", default=None, help="data:8 | fsdp:8 | data:2,fsdp:4 ... (default: all devices on data)")
    p.add_argument("--remat", choices=sorted(REMAT_POLICIES), default="none", help="what the backward pass keeps of "
                   "each block: none (all activations), dots (matmul outputs), full (block inputs only; least memory)")
    p.add_argument("--run", default=None, help="wandb run name (logging is off unless given and wandb is installed)")
    p.add_argument("--seed", type=int, default=0)


def check_flags(p: argparse.ArgumentParser, args, positive=(), every=()):
    """Flags that must be positive, and flags that take a positive number or -1."""
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in every:
        if getattr(args, name) == 0 or getattr(args, name) < -1:
            p.error(f"--{name.replace('_', '-')} must be positive, or -1")
    if getattr(args, "num_iterations", -1) == 0 or getattr(args, "num_iterations", -1) < -1:
        p.error("--num-iterations must be positive, or -1")


def batch_geometry(args, num_devices: int) -> int:
    """Gradient-accumulation steps that reach --total-batch-size from --device-batch-size rows on every device."""
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * num_devices
    if args.total_batch_size % tokens_per_micro_step:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} is not a multiple of device batch x sequence x "
                         f"devices = {args.device_batch_size} x {args.max_seq_len} x {num_devices} = "
                         f"{tokens_per_micro_step}")
    return args.total_batch_size // tokens_per_micro_step


def make_trainer(args, config: GPTConfig, lr_scale: float = 1.0):
    """(trainer, make_model) for a model of `config` under --mesh/--dtype with the flags' learning rates."""
    dtype = parse_dtype(args.dtype)
    make_model = lambda: GPT(config, rngs=nnx.Rngs(args.seed), dtype=dtype, remat=args.remat)  # noqa: E731
    tx = build_optimizer(config.n_embd, args.embedding_lr * lr_scale, args.unembedding_lr * lr_scale,
                         args.matrix_lr * lr_scale, args.weight_decay, args.grad_clip)
    return Trainer.create(make_model, tx, make_mesh(args.mesh)), make_model


class Source:
    """The checkpoint a chat stage starts from."""

    def __init__(self, source: str, model_tag: str | None, step: int | None):
        self.stage, self.directory = source, stage_directory(source, model_tag)
        self.checkpointer = Checkpointer(self.directory, max_to_keep=None, async_save=False, create=False)
        self.step = self.checkpointer._step(step)
        self.meta = self.checkpointer.meta(self.step)
        self.config = GPTConfig(**self.meta["model_config"])
        self.tokenizer = Tokenizer.load(os.path.join(self.directory, "tokenizer"))
        self.model_tag = os.path.basename(self.directory)

    def params(self, trainer: Trainer):
        """The parameters, placed on the trainer's mesh."""
        return self.checkpointer.restore({"params": trainer.abstract_params}, self.step)[0]["params"]

    def info(self) -> dict:
        return {"stage": self.stage, "directory": self.directory, "step": self.step}


@dataclass
class StageRun:
    trainer: Trainer
    checkpointer: Checkpointer
    params: Any
    opt_state: Any
    start_step: int
    loop_state: dict | None  # None on a fresh start
    data_state: Any  # this process's data-loader state when resuming, else None


def start_chat_stage(args, stage: str, source: Source, num_iterations: int) -> StageRun:
    """The trainer (learning rates x --init-lr-frac) and the state to train from: the source's parameters with a
    fresh optimizer, or with --resume this stage's latest checkpoint."""
    trainer, _ = make_trainer(args, source.config, args.init_lr_frac)
    checkpointer = Checkpointer(os.path.join(get_base_dir(), STAGE_DIRS[stage], source.model_tag))

    def fresh():
        checkpointer.save_tokenizer(source.tokenizer)
        params = source.params(trainer)
        return params, trainer.init_opt_state(params)

    state = resume_or_start(args.resume, checkpointer, trainer, source.config, num_iterations, fresh,
                            same_data={k: getattr(args, k) for k in ("mixture", "task") if hasattr(args, k)})
    return StageRun(trainer, checkpointer, *state)


def resume_or_start(resume: bool, checkpointer: Checkpointer, trainer: Trainer, config: GPTConfig,
                    num_iterations: int, fresh, same_data: dict | None = None):
    """(params, opt_state, start_step, loop_state, data_state). With resume: the latest checkpoint of this run (its
    loop_state, and this process's data-loader state, or None); else fresh() -> (params, opt_state) from step 0, which
    refuses to mix into a directory that already holds checkpoints. same_data: training flags that must match the
    saved run's for its data position to mean anything (e.g. the mixture)."""
    if not resume:
        if checkpointer.latest_step() is not None:
            raise SystemExit(f"{checkpointer.directory} already holds checkpoints (steps "
                             f"{checkpointer.manager.all_steps()}): continue it with --resume, or move that directory "
                             "away to start over")
        params, opt_state = fresh()
        return params, opt_state, 0, None, None
    start_step = checkpointer.latest_step()
    if start_step is None:
        raise SystemExit(f"--resume: no checkpoint in {checkpointer.directory}")
    saved = checkpointer.meta(start_step)
    if "loop_state" not in saved:
        raise SystemExit(f"--resume: step {start_step} in {checkpointer.directory} is not a training checkpoint "
                         "(no optimizer or data state; an imported model?)")
    if saved["model_config"] != asdict(config):
        raise SystemExit(f"--resume: {checkpointer.directory} holds a model {saved['model_config']}, but this run "
                         f"makes {asdict(config)}; use the same model flags or another --model-tag")
    saved_config = saved.get("train_config", {})
    for flag, value in (same_data or {}).items():
        if flag in saved_config and saved_config[flag] != value:
            raise SystemExit(f"--resume: the run was trained with --{flag} {saved_config[flag]}, not {value}")
    if start_step > num_iterations:
        raise SystemExit(f"--resume: the checkpoint is at step {start_step}, beyond this run's {num_iterations} "
                         "steps (a smaller --num-iterations or a different batch size?)")
    data_states = saved["loop_state"].get("data_states")
    if data_states is not None and len(data_states) != jax.process_count():
        raise SystemExit(f"--resume: the run was saved by {len(data_states)} processes, this one has "
                         f"{jax.process_count()}: the data position cannot be split differently")
    state, meta = checkpointer.restore({"params": trainer.abstract_params, "opt_state": trainer.abstract_opt_state},
                                       start_step)
    loop_state = meta["loop_state"]
    data_states = loop_state.pop("data_states", None)
    print0(f"resumed from step {start_step} of {checkpointer.directory}")
    return (state["params"], state["opt_state"], start_step, loop_state,
            None if data_states is None else data_states[jax.process_index()])


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
