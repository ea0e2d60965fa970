"""Reinforcement learning on GSM8K: on-policy REINFORCE with the mean reward of each question as the baseline.

    python -m train.rl                                  # after train.sft, on one GPU host
    python -m train.rl --examples-per-step 2 --num-samples 4 --device-batch-size 1 --max-new-tokens 32 \\
        --num-iterations 4 --eval-every 2 --eval-examples 4   # a tiny run on a CPU

Each step takes --examples-per-step GSM8K train questions, samples --num-samples completions of each with the engine
(temperature 1, top-k 50, calculator on), rewards a correct final answer with 1, and takes one optimizer step on the
policy-gradient loss of the sampled tokens (see nanochat_jax.rl); learning rates x 0.05 decaying linearly to 0 over
one epoch. Every --eval-every steps: pass@1..k on GSM8K test with k = --device-batch-size samples at temperature 1.
Starts from the latest SFT checkpoint (or --source mid); writes $NANOCHAT_BASE_DIR/chatrl_checkpoints/<model tag>/
with metrics.jsonl. Sampling runs on the local devices, so this stage runs in one process (one host).
--task Arithmetic trains on the local stand-in (tasks/local.py) instead, for a machine with no network.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.chat_eval import generative_outcomes, pass_at_k
from nanochat_jax import report
from nanochat_jax.checkpoint import model_meta
from nanochat_jax.common import print0, single_host_only
from nanochat_jax.dataloader import to_global_array
from nanochat_jax.engine import Engine
from nanochat_jax.loop import trim_metrics, write_metrics
from nanochat_jax.optim import lr_multiplier
from nanochat_jax.rl import policy_batch, rollouts
from nanochat_jax.stages import Source, add_chat_stage_flags, check_flags, start_chat_stage, start_wandb
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.local import Arithmetic


TASKS = {"GSM8K": lambda split: GSM8K(split=split),  # --task: split -> the task
         "Arithmetic": lambda split: Arithmetic(size=8_000 if split == "train" else 500, split=split)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL on GSM8K")
    add_chat_stage_flags(p, sources=["mid", "sft"], device_batch_size=8, init_lr_frac=0.05, eval_every=60)
    p.set_defaults(save_every=60)
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step")
    p.add_argument("--num-samples", type=int, default=16, help="completions per question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-epochs", type=int, default=1, help="epochs of GSM8K train when --num-iterations is -1")
    p.add_argument("--eval-examples", type=int, default=400, help="GSM8K test questions for pass@k")
    p.add_argument("--task", choices=sorted(TASKS), default="GSM8K",
                   help="GSM8K, or the local stand-in Arithmetic (generated word problems; no network needed)")
    args = p.parse_args(argv)
    check_flags(p, args, positive=("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens",
                                   "top_k", "num_epochs", "eval_examples"), every=("eval_every", "save_every"))
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    single_host_only("train.rl")
    source = Source(args.source, args.model_tag, args.step)
    config, tokenizer = source.config, source.tokenizer
    rows_per_micro_step = args.device_batch_size * jax.device_count()
    if (args.examples_per_step * args.num_samples) % rows_per_micro_step:
        raise SystemExit(f"--examples-per-step x --num-samples = {args.examples_per_step * args.num_samples} "
                         f"sequences do not split into micro-steps of device batch x devices = {rows_per_micro_step}")
    train_task, val_task = TASKS[args.task]("train"), TASKS[args.task]("test")
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        max(1, len(train_task) // args.examples_per_step * args.num_epochs)
    stage = start_chat_stage(args, "rl", source, num_steps)
    trainer, checkpointer = stage.trainer, stage.checkpointer
    print0(f"RL {source.directory} (step {source.step}) -> {checkpointer.directory} | {args.examples_per_step} "
           f"questions x {args.num_samples} samples per step | {num_steps:,} steps")
    params, opt_state, start_step, loop_state = stage.params, stage.opt_state, stage.start_step, stage.loop_state
    loop_state = loop_state or {"total_time": 0.0, "last_eval": {}}
    metrics_path = os.path.join(checkpointer.directory, "metrics.jsonl")
    trim_metrics(metrics_path, start_step)
    engine = Engine(trainer.model(params), tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    wandb_run = start_wandb(args, "nanochat-jax-rl")

    def evaluate():
        outcomes = generative_outcomes(engine, tokenizer, val_task, num_samples=args.device_batch_size,
                                       max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=args.top_k,
                                       max_problems=args.eval_examples)
        return {f"pass@{k}": pass_at_k(outcomes, k) for k in range(1, args.device_batch_size + 1)}

    for step in range(start_step, num_steps + 1):
        last = step == num_steps
        record = {}
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            record = evaluate()
            loop_state["last_eval"] = record
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in record.items()))
        if (last or (args.save_every > 0 and step > 0 and step % args.save_every == 0)) and step != start_step:
            checkpointer.save(step, {"params": params, "opt_state": opt_state},
                              model_meta(config, step, **loop_state["last_eval"], train_config=vars(args),
                                         source=source.info(), loop_state=loop_state))
        if last:
            if record:
                write_metrics(metrics_path, {"step": step, **record}, wandb_run)
            break

        t0 = time.time()
        step_rollouts = []
        for j in range(args.examples_per_step):
            index = (step * args.examples_per_step + j) % len(train_task)
            step_rollouts.append(rollouts(engine, tokenizer, train_task, index, args.num_samples, args.max_new_tokens,
                                          args.temperature, args.top_k, seed=hash((args.seed, step, index)) & 0x7FFFFFFF))
        t_sample = time.time() - t0
        batch = policy_batch(step_rollouts, rows_per_micro_step, pad_id, config.sequence_len)
        batch = {name: to_global_array(array, trainer.batch_sharding()) for name, array in batch.items()}
        lrm = lr_multiplier(step, num_steps, warmdown_ratio=1.0)
        params, opt_state, out = trainer.step(params, opt_state, batch, jnp.float32(lrm), jnp.float32(0.95))
        engine.params = nnx.state(trainer.model(params))
        loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
        dt = time.time() - t0
        if step > start_step:
            loop_state["total_time"] += dt
        reward = float(np.mean([r.rewards.mean() for r in step_rollouts]))
        length = float(np.mean([len(s) - r.prompt_len for r in step_rollouts for s in r.sequences]))
        print0(f"step {step:05d}/{num_steps:05d} | reward {reward:.3f} | completion length {length:.1f} | "
               f"loss {loss:.5f} | lrm {lrm:.3f} | sampling {t_sample:.1f}s | step {dt:.1f}s")
        write_metrics(metrics_path, {"step": step, "reward": reward, "completion_length": length, "loss": loss,
                                     "lr": lrm, "grad_norm": grad_norm, "num_tokens": int(out["num_tokens"]),
                                     "dt": dt, **record}, wandb_run)
    checkpointer.wait()
    print0(f"training time {loop_state['total_time'] / 60:.2f}m | checkpoints in {checkpointer.directory}")
    report.log("Chat RL", vars(args), {"checkpoint_dir": checkpointer.directory, "steps": num_steps,
                                       **loop_state["last_eval"], "training time (min)": loop_state["total_time"] / 60},
               report.standin(None if args.task == "GSM8K" else "Arithmetic: generated on this machine (tasks/local.py)"))
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main()
