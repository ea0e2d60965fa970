"""A training stage, declared once: its flags and their checks, trainer, engine, start or resume, and ending.

A chat stage (train.mid, sft, rl) starts from the --source stage's checkpoint with a fresh optimizer and writes under
the same model tag; --resume continues its own latest checkpoint. Stage.args: a copy of the flags, defaults resolved."""
import argparse
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.common import get_base_dir, parse_dtype, print0
from nanochat_jax.evaluation import report
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT, REMAT_POLICIES, GPTConfig, config_from_meta
from nanochat_jax.model.sharding import make_mesh, parse_mesh_spec
from nanochat_jax.recipes import RECIPES
from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.training.checkpoint import STAGE_DIRS, Checkpointer, complete_steps, stage_directory
from nanochat_jax.training.loop import Eval, run
from nanochat_jax.training.optim import Schedule, build_optimizer
from nanochat_jax.training.trainer import Trainer, TrainState


def add_optimizer_flags(p: argparse.ArgumentParser, grad_clip: float | None = None, weight_decay: float | None = None):
    """The learning rates and the rest; None (the default) is the model's recipe's value (recipes.RECIPES)."""
    p.add_argument("--embedding-lr", type=float, default=None, help="default: classic 0.2, modern 0.3")
    p.add_argument("--unembedding-lr", type=float, default=None, help="default: classic 0.004, modern 0.008")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon's (default 0.02)")
    p.add_argument("--scalar-lr", type=float, default=None, help="modern recipe: the x0 scalars' (resid: x 0.01; 0.5)")
    p.add_argument("--weight-decay", type=float, default=weight_decay, help="classic: AdamW's (default 0); modern: "
                   "Muon's cautious decay, scaled by batch and horizon, cosine to 0 (default 0.28)")
    p.add_argument("--grad-clip", type=float, default=grad_clip, help="global-norm clip, 0: off (classic 1, modern 0)")


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
                   "each block: none (matmul, attention outputs), dots (matmul outputs), full (inputs; least memory)")
    p.add_argument("--run", default=None, help="wandb run name (logging is off unless given and wandb is installed)")
    p.add_argument("--seed", type=int, default=0)


def check_flags(p: argparse.ArgumentParser, args, positive=(), every=(), nonnegative=()):
    """positive: > 0 or unset; nonnegative: >= 0; every: > 0 or -1 (+ --eval-every, --save-every, --num-iterations)."""
    every += tuple(n for n in ("eval_every", "save_every", "num_iterations") if hasattr(args, n) and n not in every)
    rules = ((positive, lambda v: v is not None and v <= 0, "must be positive"),
             (nonnegative, lambda v: v < 0, "must be >= 0"),
             (every, lambda v: v == 0 or v < -1, "must be positive, or -1"))
    for names, broken, rule in rules:
        for name in names:
            if broken(getattr(args, name)):
                p.error(f"--{name.replace('_', '-')} {rule}")
    if getattr(args, "mesh", None):  # well formed and covering this run's devices, before anything compiles
        try:
            parse_mesh_spec(args.mesh, jax.device_count())
        except ValueError as e:
            p.error(str(e))


def micro_steps(what: str, total: int, device_batch_size: int, sequence_len: int | None = None) -> int:
    """Accumulation steps reaching `total` (rows, or tokens of sequence_len) from device_batch_size rows a device."""
    parts = {"device batch": device_batch_size, "sequence": sequence_len, "devices": jax.device_count()}
    parts = {name: n for name, n in parts.items() if n is not None}
    per_micro_step = math.prod(parts.values())
    if total % per_micro_step:
        raise SystemExit(f"{what} {total} is not a multiple of {' x '.join(parts)} = "
                         f"{' x '.join(map(str, parts.values()))} = {per_micro_step}")
    return total // per_micro_step


def epoch_steps(args, num_examples: int, per_step: int) -> int:
    return args.num_iterations if args.num_iterations > 0 else max(1, num_examples // per_step * args.num_epochs)


class Source:
    """The checkpoint a chat stage starts from."""

    def __init__(self, source: str, model_tag: str | None, step: int | None):
        try:  # a missing model or step: one line naming what there is, before anything compiles
            self.stage, self.directory = source, stage_directory(source, model_tag)
            self.checkpointer = Checkpointer(self.directory, max_to_keep=None, async_save=False, create=False)
            self.step = self.checkpointer.resolve_step(step)
        except FileNotFoundError as e:  # (and the models there are)
            stage_dir = os.path.join(get_base_dir(), STAGE_DIRS[source])
            tags = sorted(t for t in os.listdir(stage_dir) if complete_steps(os.path.join(stage_dir, t))) \
                if os.path.isdir(stage_dir) else []
            note = f"; the {source} models here: {', '.join(tags)} (--model-tag)" if tags else ""
            raise SystemExit(f"{e}{note}") from None
        self.config = config_from_meta(self.checkpointer.meta(self.step)["model_config"])
        self.tokenizer = Tokenizer.load(os.path.join(self.directory, "tokenizer"))

    def params(self, trainer: Trainer):  # placed on the trainer's mesh
        return self.checkpointer.restore({"params": trainer.abstract_params}, self.step)[0]["params"]


class Stage:
    """One run of a stage: its resolved flags, model config, tokenizer, trainer and checkpoint directory."""

    def __init__(self, name: str, args, config: GPTConfig, tokenizer, checkpoint_dir: str, source: Source | None = None,
                 lr_fraction: float = 1.0, lr_scale: float = 1.0):  # (lr_*: see build_optimizer)
        self.name, self.config, self.tokenizer, self.source = name, config, tokenizer, source
        recipe = RECIPES[config.recipe]
        unset = {k: v for k, v in recipe.optimizer.items() if getattr(args, k, None) is None}  # recorded in the meta
        self.args = args = argparse.Namespace(**(vars(args) | unset))
        dtype = parse_dtype(args.dtype)
        fp8 = getattr(args, "fp8", False)  # (pretraining only; evaluation sees the model without it)
        self.make_model = lambda fp8=fp8: GPT(config, rngs=nnx.Rngs(args.seed), dtype=dtype, remat=args.remat, fp8=fp8)
        tx = build_optimizer(config.n_embd, recipe=config.recipe, lr_scale=lr_scale, lr_fraction=lr_fraction,
                             muon_dtype=dtype if recipe.muon_in_compute_dtype else jnp.bfloat16,
                             **{k: getattr(args, k) for k in recipe.optimizer})
        self.trainer = Trainer.create(self.make_model, tx, make_mesh(args.mesh),
                                      (lambda: self.make_model(False)) if fp8 else None)
        self.checkpointer = Checkpointer(checkpoint_dir)
        self._engine = self.wandb_run = None

    @classmethod
    def chat(cls, name: str, args) -> "Stage":
        """From the --source checkpoint, lrs x --init-lr-frac, under its model tag; --max-seq-len unset: its context."""
        source = Source(args.source, args.model_tag, args.step)
        if getattr(args, "max_seq_len", 0) is None:
            args = argparse.Namespace(**(vars(args) | {"max_seq_len": source.config.sequence_len}))
        directory = os.path.join(get_base_dir(), STAGE_DIRS[name], os.path.basename(source.directory))
        return cls(name, args, source.config, source.tokenizer, directory, source, args.init_lr_frac)

    def engine(self, model) -> Engine:
        """The stage's one engine (its programs compile once), sampling from `model`."""
        if self._engine is None:
            self._engine = Engine(model, self.tokenizer)
        self._engine.use(model)
        return self._engine

    def train(self, batches, num_iterations: int, evals: list[Eval], **schedule) -> TrainState:
        """Resume (--resume: the checkpointer checks it) or start, then the loop; schedule: Schedule's keywords."""
        def fresh():
            self.checkpointer.save_tokenizer(self.tokenizer)
            trainer, source = self.trainer, self.source
            return trainer.start_from(source.params(trainer)) if source else trainer.init_state(self.make_model)
        state = self.checkpointer.begin(self.args, fresh, self.trainer, batches, self.config, num_iterations)
        if self.args.run and jax.process_index() == 0:  # wandb logging
            try:
                import wandb
            except ImportError:
                print0("--run given but wandb is not installed: logging to metrics.jsonl only")
            else:
                project = "nanochat-jax" + ("" if self.name == "base" else f"-{self.name}")
                self.wandb_run = wandb.init(project=project, name=self.args.run, config=vars(self.args))
        return run(self, state, batches, num_iterations, Schedule(num_iterations, **schedule), evals)

    def finish(self, state: TrainState, section: str, results: dict, standin: str | None):
        """The report card's section for this run (with its training time and directory), and wandb's end."""
        last = state.loop.last_eval | ({} if state.loop.min_val_bpb is None else
                                       {"minimum val_bpb": state.loop.min_val_bpb})
        print0("".join(f"{k} {v:.4f} | " for k, v in last.items()) + f"training time "
               f"{state.loop.total_time / 60:.2f}m | checkpoints in {self.checkpointer.directory}")
        report.log(section, vars(self.args), {"checkpoint_dir": self.checkpointer.directory, **results,
                                              "training time (min)": state.loop.total_time / 60},
                   report.standin(standin))
        if self.wandb_run is not None:
            self.wandb_run.finish()
