"""Reinforcement learning on GSM8K: on-policy REINFORCE with the mean reward of each question as the baseline.

    python -m train.rl                                  # after train.sft, on one GPU host
    python -m train.rl --examples-per-step 2 --num-samples 4 --device-batch-size 1 --max-new-tokens 32 \\
        --num-iterations 4 --eval-every 2 --eval-examples 4   # a tiny run on a CPU

Reward 1 for a correct answer (training/reinforce.py); learning rates x 0.05, down to 0; one host (local sampling)."""
import argparse

from nanochat_jax.evaluation import report
from nanochat_jax.evaluation.chat_tasks import generative_outcomes, pass_at_k
from nanochat_jax.common import print0, run_entry_point, single_host_only
from nanochat_jax.training.loop import Eval
from nanochat_jax.training.reinforce import RolloutBatches
from nanochat_jax.training.stages import Stage, add_chat_stage_flags, check_flags, epoch_steps, micro_steps
from nanochat_jax.tasks.registry import CHAT_TASKS

RL_TASKS = sorted(name for name, info in CHAT_TASKS.items() if info.has_reward)


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
    p.add_argument("--task", choices=RL_TASKS, default="GSM8K", help="or the local stand-in Arithmetic (no network)")
    args = p.parse_args(argv)
    check_flags(p, args, positive=("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens",
                                   "top_k", "num_epochs", "eval_examples"), nonnegative=("temperature",))
    return args


def main(argv=None):
    args = parse_args(argv)
    single_host_only("train.rl")
    stage = Stage.chat("rl", args)
    args, tokenizer = stage.args, stage.tokenizer
    sequences = args.examples_per_step * args.num_samples
    accum_steps = micro_steps("--examples-per-step x --num-samples =", sequences, args.device_batch_size)
    task = CHAT_TASKS[args.task]
    train_task, val_task = task.make("train"), task.make("test")
    num_steps = epoch_steps(args, len(train_task), args.examples_per_step)
    print0(f"RL {stage.source.directory} (step {stage.source.step}) -> {stage.checkpointer.directory} | "
           f"{args.examples_per_step} questions x {args.num_samples} samples per step in {accum_steps} micro-steps | "
           f"{num_steps:,} steps")

    rollouts = RolloutBatches(lambda params: stage.engine(stage.trainer.model(params)), tokenizer, train_task,
                              args.examples_per_step, args.num_samples, args.max_new_tokens, args.temperature,
                              args.top_k, args.seed, sequences // accum_steps)

    def pass_at(model):  # k = 1 .. device batch samples per question, at temperature 1
        outcomes = generative_outcomes(stage.engine(model), tokenizer, val_task, num_samples=args.device_batch_size,
                                       max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=args.top_k,
                                       max_problems=args.eval_examples)
        return {f"pass@{k}": pass_at_k(outcomes, k) for k in range(1, args.device_batch_size + 1)}

    state = stage.train(rollouts, num_steps, [Eval(args.eval_every, pass_at)], warmdown_ratio=1.0, momentum=0.95)
    stage.finish(state, report.RL, {"steps": num_steps, **state.loop.last_eval},
                 f"{args.task}: generated on this machine (tasks/local.py)" if task.standin else None)


if __name__ == "__main__":
    run_entry_point(main)
