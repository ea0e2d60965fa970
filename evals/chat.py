"""Evaluate a chat model: ARC-Easy, ARC-Challenge, MMLU (categorical: the answer letter with the highest logit),
GSM8K, HumanEval, SpellingBee (generative: sampled with the engine, tool use on; HumanEval's tests run in the
sandbox, nanochat_jax/execution.py: kernel mode, or with --unsafe-sandbox the weaker unsafe mode where the kernel
refuses namespaces); with all six, ChatCORE (the mean accuracy centered by each task's chance level, as nanochat computes it).
Two LOCAL STAND-INS for a machine with no network, never in ChatCORE: Arithmetic (generated word problems in GSM8K's
format) and LocalSpellingBee (SpellingBee over words from Python's docstrings); see nanochat_jax/tasks/local.py.

    python -m evals.chat -i sft                          # all six tasks on the latest SFT model
    python -m evals.chat -i mid -a "ARC-Easy|GSM8K" -x 100 --json-out mid.json
    python -m evals.chat -i sft -a "Arithmetic|LocalSpellingBee" -x 50     # offline
"""
import argparse
import json
import time
from functools import partial

from nanochat_jax import execution, report
from nanochat_jax.chat_eval import categorical_outcomes, generative_outcomes
from nanochat_jax.checkpoint import STAGE_DIRS, load_stage
from nanochat_jax.common import parse_dtype, print0, single_host_only
from nanochat_jax.engine import Engine
from nanochat_jax.tasks.choice import ARC, MMLU
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.local import EVAL_TASKS
from nanochat_jax.tasks.spelling import SpellingBee

TASKS = {
    "ARC-Easy": partial(ARC, "ARC-Easy", "test"),
    "ARC-Challenge": partial(ARC, "ARC-Challenge", "test"),
    "MMLU": partial(MMLU, "all", "test"),
    "GSM8K": partial(GSM8K, "main", "test"),
    "HumanEval": HumanEval,
    "SpellingBee": partial(SpellingBee, size=256, split="test"),
}
CHANCE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
STANDINS = EVAL_TASKS


def chatcore(results: dict) -> float | None:
    """The mean of (accuracy - chance) / (1 - chance) over nanochat's six tasks; None unless all six were evaluated."""
    if not set(CHANCE) <= set(results):
        return None
    return sum((results[name] - chance) / (1 - chance) for name, chance in CHANCE.items()) / len(CHANCE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="evaluate a chat model")
    p.add_argument("-i", "--source", choices=sorted(STAGE_DIRS), default="sft", help="which stage's model")
    p.add_argument("-a", "--task-name", default=None, help="tasks separated by | (default: all six)")
    p.add_argument("-g", "--model-tag", default=None, help="e.g. d20 (default: the deepest)")
    p.add_argument("-s", "--step", type=int, default=None, help="default: the latest")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="completions per problem (pass@n)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per batch (categorical tasks)")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--json-out", default=None, help="write the results here as JSON")
    p.add_argument("--unsafe-sandbox", action="store_true",
                   help="where the kernel sandbox is unavailable, run HumanEval's programs in the weaker unsafe mode "
                        "(see nanochat_jax/execution.py) instead of refusing")
    args = p.parse_args(argv)
    names = list(TASKS) if args.task_name is None else args.task_name.split("|")
    unknown = [n for n in names if n not in TASKS and n not in STANDINS]
    if unknown:
        p.error(f"unknown task(s) {unknown}: choose from {'|'.join(TASKS)} (or the local stand-ins "
                f"{'|'.join(STANDINS)})")
    args.tasks = names
    for name in ("max_new_tokens", "num_samples", "batch_size", "max_problems", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    single_host_only("evals.chat")
    if "HumanEval" in args.tasks:  # before the model loads: say which sandbox runs its programs, or stop here
        execution.require(args.unsafe_sandbox, "HumanEval")
    model, tokenizer, meta = load_stage(args.source, args.model_tag, args.step, dtype=parse_dtype(args.dtype))
    engine = Engine(model, tokenizer)
    results = {}
    for name in args.tasks:
        task, t0 = (TASKS | STANDINS)[name](), time.time()
        if task.eval_type == "categorical":
            outcomes = categorical_outcomes(model, tokenizer, task, args.batch_size, args.max_problems)
        else:
            outcomes = [any(o) for o in generative_outcomes(
                engine, tokenizer, task, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                args.max_problems)]
        results[name] = sum(outcomes) / len(outcomes)
        print0(f"{name}: {sum(outcomes)}/{len(outcomes)} = {100 * results[name]:.2f}% ({time.time() - t0:.0f}s)")
    summary = {"source": args.source, "step": meta["step"], "results": results, "ChatCORE": chatcore(results)}
    if summary["ChatCORE"] is not None:
        print0(f"ChatCORE: {summary['ChatCORE']:.4f}")
    report.log(f"Chat evaluation {args.source}", {"model step": meta["step"], "max problems": args.max_problems},
               results, {"ChatCORE": summary["ChatCORE"]},
               report.standin("; ".join(f"{name}: generated on this machine (tasks/local.py)" for name in results
                                        if name in STANDINS)))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary | {"config": {k: v for k, v in vars(args).items() if k != "tasks"}}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
