"""Evaluate a base model: the CORE metric on the eval bundle, train/val bits per byte, and a few greedy samples.

    python -m evals.base                                  # the latest base model (-i mid|sft|rl for another stage)
    python -m evals.base --checkpoint ~/.cache/nanochat/base_checkpoints/d20   # a nanochat checkpoint (needs torch)
    python -m evals.base --max-per-task 100 --eval-tokens 0 --json-out core.json  # a quick CORE only

$NANOCHAT_BASE_DIR/eval_bundle/ is downloaded when missing; bpb reads base_data/'s shards (train: first, val: last).
"""
import argparse
import functools
import glob
import json
import os
import shutil
import tempfile
import time
import urllib.request
import zipfile

import jax

from nanochat_jax.evaluation import core as core_eval
from nanochat_jax.evaluation import report
from nanochat_jax.evaluation.bits_per_byte import bits_per_byte, loss_sums, print_samples, unigram_bpb
from nanochat_jax.training.checkpoint import STAGE_DIRS, load_model, stage_directory
from nanochat_jax.common import (CompileCount, get_base_dir, init_distributed, parse_dtype, print0, run_entry_point,
                                 use_compilation_cache)
from nanochat_jax.data.dataloader import pretraining_batches
from nanochat_jax.data.dataset import check_shards, standin_corpus
from nanochat_jax.model.sharding import make_mesh
from nanochat_jax.training.stages import check_flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CORE, bpb and samples of a base model")
    p.add_argument("--checkpoint", default=None, help="a directory of ours or nanochat's (default: --source's latest)")
    p.add_argument("-i", "--source", choices=sorted(STAGE_DIRS), default="base")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (CORE)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens per bpb split (0: skip bpb)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per device for bpb")
    p.add_argument("--max-seq-len", type=int, default=None, help="bpb row length (default: the model's context)")
    p.add_argument("--no-core", action="store_true", help="skip CORE")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--mesh", default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    check_flags(p, args, positive=("batch_size", "device_batch_size", "max_seq_len"), every=("max_per_task",),
                nonnegative=("eval_tokens",))
    return args


def load(args, mesh, dtype):
    """(model, tokenizer, description) from --checkpoint (ours or nanochat's) or the stage's latest."""
    directory = args.checkpoint or stage_directory(args.source, args.model_tag)
    if glob.glob(os.path.join(os.path.expanduser(directory), "model_*.pt")):  # nanochat's format
        from nanochat_jax.model.interop import import_nanochat
        model, tokenizer, meta = import_nanochat(directory, args.step, dtype=dtype, mesh=mesh)
        if tokenizer is None:
            raise SystemExit(f"no tokenizer.pkl next to {directory} nor in nanochat's <base>/tokenizer/")
        return model, tokenizer, f"nanochat {directory} step {meta['step']}"
    model, tokenizer, meta = load_model(directory, args.step, mesh=mesh, dtype=dtype)
    return model, tokenizer, f"{directory} step {meta['step']}"


def eval_bundle_dir() -> str:
    bundle = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.exists(os.path.join(bundle, "core.yaml")):
        return bundle
    print0(f"downloading the eval bundle from {core_eval.EVAL_BUNDLE_URL}")
    with tempfile.TemporaryDirectory(dir=get_base_dir()) as tmp:
        try:
            archive = os.path.join(tmp, "eval_bundle.zip")
            urllib.request.urlretrieve(core_eval.EVAL_BUNDLE_URL, archive)
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except Exception as e:
            raise FileNotFoundError(f"no eval bundle at {bundle} and could not download {core_eval.EVAL_BUNDLE_URL} "
                                    f"({type(e).__name__}: {e}): unzip it there (core.yaml, eval_data/, "
                                    "eval_meta_data.csv)") from e
        shutil.move(os.path.join(tmp, "eval_bundle"), bundle)
    return bundle


def core(model, tokenizer, args, mesh) -> dict:
    bundle = eval_bundle_dir()
    tasks, baselines = core_eval.load_bundle(bundle)
    most_shots = max(task["num_fewshot"][0] for task in tasks)
    if 0 < args.max_per_task <= most_shots:
        raise SystemExit(f"--max-per-task {args.max_per_task}: the few-shot examples are drawn from the same examples, "
                         f"so it must exceed the largest few-shot count ({most_shots})")
    results, centered = {}, {}
    for task in tasks:
        t0, label = time.time(), task["label"]
        data = core_eval.load_task_data(bundle, task, args.max_per_task)
        correct = core_eval.evaluate_task(model, tokenizer, data, task["icl_task_type"], task["num_fewshot"][0],
                                          task.get("continuation_delimiter", " "), args.batch_size, mesh)
        results[label] = sum(correct) / len(correct)
        centered[label] = core_eval.centered(results[label], baselines[label])
        print0(f"{label:<32} {task['num_fewshot'][0]:>2}-shot {task['icl_task_type']:<17} accuracy "
               f"{results[label]:.4f} | centered {centered[label]:+.4f} | {len(data)} examples, {time.time() - t0:.0f}s")
    return {"core_metric": sum(centered.values()) / len(centered), "results": results, "centered_results": centered}


def bpb(model, tokenizer, args) -> dict:
    seq_len = args.max_seq_len or model.config.sequence_len
    rows_per_process = args.device_batch_size * jax.local_device_count()
    num_batches = max(1, args.eval_tokens // (rows_per_process * jax.process_count() * seq_len))
    token_bytes = tokenizer.token_bytes()
    batches = functools.partial(pretraining_batches, tokenizer, rows_per_process=rows_per_process, seq_len=seq_len)
    out = {}
    for split in ("train", "val"):
        out[f"{split}_bpb"] = bits_per_byte(loss_sums(model, batches(split), num_batches, token_bytes))
        print0(f"{split} bpb: {out[f'{split}_bpb']:.4f}")
    out["unigram_bpb"] = unigram_bpb(batches("train"), batches("val"), num_batches, token_bytes,
                                     tokenizer.get_vocab_size())
    print0(f"unigram bpb (token frequencies alone, the level to get below): {out['unigram_bpb']:.4f}")
    return out


def main(argv=None):
    init_distributed()  # multi-host runs only (NANOCHAT_MULTIHOST=1)
    args = parse_args(argv)
    use_compilation_cache()  # a second evaluation reads its programs back
    if args.eval_tokens > 0:
        check_shards()  # a bad shard is one line now, not a traceback after the model has loaded and compiled
    mesh, dtype = make_mesh(args.mesh), parse_dtype(args.dtype)
    try:
        model, tokenizer, description = load(args, mesh, dtype)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print0(f"evaluating {description}")
    summary = {"model": description}
    if args.eval_tokens > 0:
        summary |= bpb(model, tokenizer, args)
    if not args.no_core:
        with CompileCount() as compiled:  # bounded by the row-length buckets, not one per example
            summary |= core(model, tokenizer, args, mesh)
        print0(f"CORE metric: {summary['core_metric']:.4f} ({compiled})")
    print_samples(model, tokenizer)
    report.log(report.BASE_EVALUATION, {"model": description},
               {report.CORE: summary.get("core_metric"), "train bpb": summary.get("train_bpb"),
                "val bpb": summary.get("val_bpb"), "unigram bpb (no context)": summary.get("unigram_bpb")},
               summary.get("centered_results", {}), report.standin(standin_corpus() if args.eval_tokens > 0 else None))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    run_entry_point(main)
