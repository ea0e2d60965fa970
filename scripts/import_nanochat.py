"""Convert a nanochat (PyTorch) checkpoint directory into one of ours (needs torch: pip install 'nanochat-jax[torch]');
it loads with training.checkpoint.load_model(DIR), its tokenizer from DIR/tokenizer/.

    python -m scripts.import_nanochat --src ~/.cache/nanochat/chatsft_checkpoints/d20 --dst DIR [--step N]
"""
import argparse
import os

from flax import nnx

from nanochat_jax.common import run_entry_point
from nanochat_jax.training.checkpoint import Checkpointer, model_meta
from nanochat_jax.model.interop import find_last_step, import_nanochat


def main():
    parser = argparse.ArgumentParser(description="import a nanochat checkpoint")
    parser.add_argument("--src", required=True, help="nanochat's directory of model_<step>.pt, meta_<step>.json")
    parser.add_argument("--dst", required=True, help="our checkpoint directory to write")
    parser.add_argument("--step", type=int, default=None, help="step to import (default: the latest)")
    args = parser.parse_args()

    step = find_last_step(os.path.expanduser(args.src)) if args.step is None else args.step
    model, tokenizer, meta = import_nanochat(args.src, step=step)
    if tokenizer is None:
        raise SystemExit(f"no tokenizer.pkl next to {args.src} nor in nanochat's <base>/tokenizer/: "
                         "copy the tokenizer.pkl the model was trained with into the source directory")
    checkpointer = Checkpointer(args.dst, max_to_keep=None, async_save=False)
    if step in checkpointer.manager.all_steps():
        raise SystemExit(f"{checkpointer.directory} already holds step {step}: choose another --dst")
    checkpointer.save_tokenizer(tokenizer)
    our_meta = model_meta(model.config, step, imported_from=os.path.abspath(args.src), nanochat_meta=meta)
    checkpointer.save(step, {"params": nnx.to_pure_dict(nnx.state(model))}, our_meta)
    checkpointer.wait()
    print(f"imported {args.src} (step {step}, {model.config}) into {checkpointer.directory}")


if __name__ == "__main__":
    run_entry_point(main)
