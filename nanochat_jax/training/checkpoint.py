"""Our checkpoints: an orbax CheckpointManager directory per run, plus the run's tokenizer.

    <checkpoint_dir>/<step>/{params, meta}  the parameters; JSON {"model_config": {...}, "step": ..., ...}
    <checkpoint_dir>/<step>/{opt_state, data}  training runs: the optimizer, each process's data position (JSON)
    <checkpoint_dir>/tokenizer/

Orbax writes a step aside and renames it when complete, so a crash mid-save leaves the earlier steps loadable."""
import glob
import os
import sys
from dataclasses import asdict

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from nanochat_jax.common import get_base_dir, parse_dtype, print0
from nanochat_jax.model.gpt import GPT, GPTConfig, config_from_meta
from nanochat_jax.model.sharding import abstract_params, make_mesh
from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.training.trainer import LoopState, TrainState

STAGE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}


class Checkpointer:
    def __init__(self, checkpoint_dir: str, max_to_keep: int | None = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(checkpoint_dir))
        if not create and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save))

    def save_tokenizer(self, tokenizer: Tokenizer):
        if jax.process_index() == 0:
            tokenizer.save(os.path.join(self.directory, "tokenizer"))

    def save(self, step: int, items: dict, meta: dict, **args):
        """items: name -> pytree of arrays, an item each; args: more orbax items. Asynchronous by default (wait())."""
        args |= {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)

    def latest_step(self) -> int | None:
        """The largest step (orbax's own latest_step is the most recently written one)."""
        return max(self.manager.all_steps(), default=None)

    def resolve_step(self, step: int | None) -> int:
        """`step` if this directory holds it (None: the latest), else FileNotFoundError naming the steps present."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory} (a run that stopped before it "
                                    "saved leaves none)")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory} (steps present: "
                                    f"{self.manager.all_steps()})")
        return step

    def meta(self, step: int | None = None) -> dict:
        return self.restore({}, step)[1]

    def restore(self, targets: dict, step: int | None = None, **args) -> tuple[dict, dict]:
        """targets: name -> tree of ShapeDtypeStructs with shardings (any mesh); args: more items -> (trees, meta)."""
        step = self.resolve_step(step)
        args |= {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        return {name: restored[name] for name in targets}, restored.meta

    def save_training(self, state: TrainState, data_position, meta: dict):
        self.save(state.step, {"params": state.params, "opt_state": state.opt_state},
                  {**meta, "step": state.step, "loop_state": asdict(state.loop)},
                  data=grain.checkpoint.CheckpointSave(_Position(data_position)))

    def restore_training(self, step: int, abstract_params, abstract_opt_state, batches) -> TrainState:
        """The run saved at `step`, onto the abstract trees' shardings; `batches` is moved to its saved position."""
        saved = glob.glob(os.path.join(self.directory, str(step), "data", "process_*-of-*.json"))
        if not saved:
            raise SystemExit(f"--resume: step {step} of {self.directory} holds no data position (saved before "
                             "positions were an item of their own, or not by a training run): it loads as a model "
                             "(--source, load_model) but cannot be resumed")
        if len(saved) != jax.process_count():
            raise SystemExit(f"--resume: step {step} of {self.directory} holds the data positions of {len(saved)} "
                             f"processes, this run has {jax.process_count()}: the data cannot be split differently")
        position = _Position()
        restored, meta = self.restore({"params": abstract_params, "opt_state": abstract_opt_state}, step,
                                      data=grain.checkpoint.CheckpointRestore(position))
        batches.set_state(position.get_state())
        return TrainState(restored["params"], restored["opt_state"], step, LoopState(**meta["loop_state"]))

    def begin(self, args, fresh, trainer, batches, config: GPTConfig, num_iterations: int) -> TrainState:
        """The state a run trains from: `fresh()` in an empty directory; with --resume, the latest checkpoint once
        checked to be this run's (a position means nothing under another --mixture, --task), `batches` moved there."""
        step = self.latest_step()
        if not args.resume:
            if step is not None:
                raise SystemExit(f"{self.directory} already holds checkpoints (steps {self.manager.all_steps()}): "
                                 "continue it with --resume, or move that directory away to start over")
            return fresh()
        if step is None:
            raise SystemExit(f"--resume: no checkpoint in {self.directory}")
        saved = self.meta(step)
        if "loop_state" not in saved:
            raise SystemExit(f"--resume: step {step} in {self.directory} is not a training checkpoint "
                             "(no optimizer or data state; an imported model?)")
        if config_from_meta(saved["model_config"]) != config:
            raise SystemExit(f"--resume: {self.directory} holds a model {saved['model_config']}, but this run "
                             f"makes {asdict(config)}; use the same model flags or another --model-tag")
        for flag in (name for name in ("mixture", "task") if hasattr(args, name)):
            was, value = saved.get("train_config", {}).get(flag, getattr(args, flag)), getattr(args, flag)
            if was != value:
                raise SystemExit(f"--resume: the run was trained with --{flag} {was}, not {value}")
        if step > num_iterations:
            raise SystemExit(f"--resume: the checkpoint is at step {step}, beyond this run's {num_iterations} "
                             "steps (a smaller --num-iterations or a different batch size?)")
        state = self.restore_training(step, trainer.abstract_params, trainer.abstract_opt_state, batches)
        print0(f"resumed from step {step} of {self.directory}")
        return state

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


class _Position(grain.DatasetIterator):
    """A data position for grain's orbax handler (JSON, a file per process): the loop's, not the live iterator's."""

    def __init__(self, state=None):
        super().__init__()
        self.state = state

    def __next__(self):
        raise StopIteration

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def model_meta(config: GPTConfig, step: int, **extra) -> dict:
    return {"model_config": asdict(config), "step": step, **extra}


def load_model(checkpoint_dir: str, step: int | None = None, mesh=None, dtype=None):
    """(model, tokenizer, meta) from one of our checkpoint directories, placed on `mesh` (default: replicated)."""
    checkpointer = Checkpointer(checkpoint_dir, max_to_keep=None, async_save=False, create=False)
    step = checkpointer.resolve_step(step)
    config = config_from_meta(checkpointer.meta(step)["model_config"])
    dtype = parse_dtype(None) if dtype is None else dtype
    graphdef, target = abstract_params(lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype),
                                       make_mesh() if mesh is None else mesh)
    restored, meta = checkpointer.restore({"params": target}, step)
    tokenizer = Tokenizer.load(os.path.join(checkpointer.directory, "tokenizer"))
    checkpointer.close()
    return nnx.merge(graphdef, restored["params"]), tokenizer, meta


def complete_steps(checkpoint_dir: str) -> list[int]:
    """The steps of a checkpoint directory written to the end (orbax names a step by its number once complete)."""
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n, "meta")))


def stage_directory(source: str, model_tag: str | None = None) -> str:
    """A stage's checkpoint directory (base|mid|sft|rl); no model_tag: the tag with the newest complete checkpoint."""
    if source not in STAGE_DIRS:
        raise ValueError(f"unknown source {source!r}: expected one of {sorted(STAGE_DIRS)}")
    stage_dir = os.path.join(get_base_dir(), STAGE_DIRS[source])
    if model_tag:
        return os.path.join(stage_dir, model_tag)
    tags = sorted(t for t in os.listdir(stage_dir) if os.path.isdir(os.path.join(stage_dir, t))) \
        if os.path.isdir(stage_dir) else []
    complete = {t: steps[-1] for t in tags if (steps := complete_steps(os.path.join(stage_dir, t)))}
    if not complete:
        empty = f" ({', '.join(tags)}: no complete checkpoint)" if tags else ""
        raise FileNotFoundError(f"no checkpoints in {stage_dir}{empty}: train the {source} stage first, or import a "
                                "nanochat checkpoint with `python -m scripts.import_nanochat --src ... --dst "
                                f"{stage_dir}/<tag>`")
    tag = max(complete, key=lambda t: os.path.getmtime(os.path.join(stage_dir, t, str(complete[t]))))
    skipped = sorted(set(tags) - set(complete))
    print(f"using {os.path.join(stage_dir, tag)}, step {complete[tag]}: the newest complete checkpoint"
          + (f" (passed over, with none complete: {', '.join(skipped)})" if skipped else "")
          + " (--model-tag picks another)", file=sys.stderr)
    return os.path.join(stage_dir, tag)


def load_stage(source: str, model_tag: str | None = None, step: int | None = None, mesh=None, dtype=None):
    return load_model(stage_directory(source, model_tag), step=step, mesh=mesh, dtype=dtype)
