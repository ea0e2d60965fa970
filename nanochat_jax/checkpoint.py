"""Our checkpoints: an orbax CheckpointManager directory per run, plus the run's tokenizer.

    <checkpoint_dir>/<step>/params  the parameters (and opt_state: the optimizer state, for training runs)
    <checkpoint_dir>/<step>/meta    JSON: {"model_config": {...}, "step": ..., ...}
    <checkpoint_dir>/tokenizer/     the tokenizer the model was trained with

Orbax writes each step into a temporary directory and renames it when complete, so a crash during a save leaves
the previous steps loadable. Restoring takes a target of ShapeDtypeStructs with shardings, so a checkpoint loads onto
any mesh shape.
"""
import os
from dataclasses import asdict

import jax
import orbax.checkpoint as ocp
from flax import nnx

from nanochat_jax.common import default_dtype
from nanochat_jax.gpt import GPT, GPTConfig
from nanochat_jax.sharding import make_mesh, param_shardings
from nanochat_jax.tokenizer import Tokenizer

STAGE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}


class Checkpointer:
    def __init__(self, checkpoint_dir: str, max_to_keep: int | None = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(checkpoint_dir))
        if not create and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save_tokenizer(self, tokenizer: Tokenizer):
        if jax.process_index() == 0:
            tokenizer.save(os.path.join(self.directory, "tokenizer"))

    def save(self, step: int, items: dict, meta: dict):
        """items: name -> pytree of arrays (e.g. {"params": ..., "opt_state": ...}), each stored on its own so that
        a reader can restore only what it needs. Starts the save: asynchronous by default, wait() to finish."""
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)

    def latest_step(self) -> int | None:
        """The largest step (orbax's own latest_step is the most recently written one)."""
        steps = self.manager.all_steps()
        return max(steps) if steps else None

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            have = self.manager.all_steps()
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory} (steps present: {have})")
        return step

    def meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, targets: dict, step: int | None = None) -> tuple[dict, dict]:
        """targets: item name -> tree of jax.ShapeDtypeStruct (shape, dtype, sharding) for the items wanted.
        Returns ({name: restored tree}, meta)."""
        step = self._step(step)
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        return {name: restored[name] for name in targets}, restored.meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def model_meta(config: GPTConfig, step: int, **extra) -> dict:
    return {"model_config": asdict(config), "step": step, **extra}


def abstract_model(config: GPTConfig, mesh, dtype=None, attn_impl: str | None = None):
    """(graphdef, abstract state, target): target is the parameter tree as ShapeDtypeStructs placed on `mesh`."""
    dtype = default_dtype() if dtype is None else dtype
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                           attn_impl=attn_impl)))
    shardings = nnx.to_pure_dict(param_shardings(state, mesh))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nnx.to_pure_dict(state), shardings)
    return graphdef, state, target


def load_model(checkpoint_dir: str, step: int | None = None, mesh=None, dtype=None, attn_impl: str | None = None):
    """(model, tokenizer, meta) from one of our checkpoint directories; parameters placed on `mesh`
    (default: every device on the data axis, i.e. replicated)."""
    checkpointer = Checkpointer(checkpoint_dir, max_to_keep=None, async_save=False, create=False)
    step = checkpointer._step(step)
    config = GPTConfig(**checkpointer.meta(step)["model_config"])
    graphdef, state, params_target = abstract_model(config, make_mesh() if mesh is None else mesh, dtype, attn_impl)
    restored, meta = checkpointer.restore({"params": params_target}, step)
    nnx.replace_by_pure_dict(state, restored["params"])
    tokenizer = Tokenizer.load(os.path.join(checkpointer.directory, "tokenizer"))
    checkpointer.close()
    return nnx.merge(graphdef, state), tokenizer, meta


def find_model_tag(stage_dir: str) -> str:
    """The deepest d<N> model in a stage directory, else the most recently written one (as nanochat guesses)."""
    tags = [t for t in os.listdir(stage_dir) if os.path.isdir(os.path.join(stage_dir, t))] \
        if os.path.isdir(stage_dir) else []
    if not tags:
        raise FileNotFoundError(f"no checkpoints in {stage_dir}")
    depths = [(int(t[1:]), t) for t in tags if t[:1] == "d" and t[1:].isdigit()]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(stage_dir, t)))


def stage_directory(source: str, model_tag: str | None = None) -> str:
    """The checkpoint directory of a stage's model: source is base | mid | sft | rl; model_tag defaults to the
    deepest model there."""
    if source not in STAGE_DIRS:
        raise ValueError(f"unknown source {source!r}: expected one of {sorted(STAGE_DIRS)}")
    from nanochat_jax.common import get_base_dir
    stage_dir = os.path.join(get_base_dir(), STAGE_DIRS[source])
    try:
        model_tag = model_tag or find_model_tag(stage_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: train the {source} stage first, or import a nanochat checkpoint with "
                                f"`python -m scripts.import_nanochat --src ... --dst {stage_dir}/<tag>`") from e
    return os.path.join(stage_dir, model_tag)


def load_stage(source: str, model_tag: str | None = None, step: int | None = None, mesh=None, dtype=None):
    """(model, tokenizer, meta) of a stage's checkpoint: source is base | mid | sft | rl."""
    return load_model(stage_directory(source, model_tag), step=step, mesh=mesh, dtype=dtype)
