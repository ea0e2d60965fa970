"""Evaluate a chat model: ARC-Easy, ARC-Challenge, MMLU (categorical: the answer letter with the highest logit),
GSM8K, HumanEval (its tests run in the sandbox), SpellingBee (generative: sampled, tool use on); with all six,
nanochat's ChatCORE. The local stand-ins (tasks/local.py) run offline, never in ChatCORE.

    python -m evals.chat -i sft                          # all six tasks on the latest SFT model
    python -m evals.chat -i mid -a "ARC-Easy|GSM8K" -x 100 --json-out mid.json
    python -m evals.chat -i sft -a "Arithmetic|LocalSpellingBee" -x 50     # offline
"""
import argparse
import json
import time

from nanochat_jax.sandbox import execution
from nanochat_jax.evaluation import report
from nanochat_jax.evaluation.chat_tasks import categorical_outcomes, generative_outcomes
from nanochat_jax.training.checkpoint import STAGE_DIRS, load_stage
from nanochat_jax.common import (CompileCount, parse_dtype, print0, run_entry_point, single_host_only,
                                 use_compilation_cache)
from nanochat_jax.inference.engine import Engine
from nanochat_jax.training.stages import check_flags
from nanochat_jax.tasks.registry import CHAT_TASKS, CHATCORE_TASKS, STANDINS, chatcore


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="evaluate a chat model")
    p.add_argument("-i", "--source", choices=sorted(STAGE_DIRS), default="sft", help="which stage's model")
    p.add_argument("-a", "--task-name", default=None, help="tasks separated by | (default: all six)")
    p.add_argument("-g", "--model-tag", default=None, help="e.g. d20 (default: the newest complete checkpoint)")
    p.add_argument("-s", "--step", type=int, default=None, help="default: the latest")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="completions per problem (pass@n)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per batch (categorical tasks)")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--json-out", default=None, help="write the results here as JSON")
    p.add_argument("--unsafe-sandbox", action="store_true", help="where the kernel sandbox is unavailable, run "
                   "HumanEval's programs in its weaker unsafe mode (see nanochat_jax/sandbox/execution.py)")
    args = p.parse_args(argv)
    names = list(CHATCORE_TASKS) if args.task_name is None else args.task_name.split("|")
    if unknown := [n for n in names if n not in CHAT_TASKS]:
        p.error(f"unknown task(s) {unknown}: choose from {'|'.join(CHATCORE_TASKS)} (or the local stand-ins "
                f"{'|'.join(STANDINS)})")
    args.tasks = names
    check_flags(p, args, positive=("max_new_tokens", "num_samples", "batch_size", "max_problems", "top_k"),
                nonnegative=("temperature",))
    return args


def main(argv=None):
    args = parse_args(argv)
    single_host_only("evals.chat")
    use_compilation_cache()  # a second evaluation reads its programs back
    if "HumanEval" in args.tasks:  # before the model loads: say which sandbox runs its programs, or stop here
        execution.require(args.unsafe_sandbox, "HumanEval")
    model, tokenizer, meta = load_stage(args.source, args.model_tag, args.step, dtype=parse_dtype(args.dtype))
    engine = Engine(model, tokenizer)
    results, chance, forms = {}, {}, {}
    for name in args.tasks:
        task, t0 = CHAT_TASKS[name].make("test"), time.time()
        with CompileCount() as compiled:  # bounded by the length buckets, not one per problem
            if task.eval_type == "categorical":
                outcomes = categorical_outcomes(model, tokenizer, task, args.batch_size, args.max_problems)
            else:
                outcomes = [any(o) for o in generative_outcomes(
                    engine, tokenizer, task, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                    args.max_problems, forms=forms.setdefault(name, {}))]
        results[name], chance[name] = sum(outcomes) / len(outcomes), CHAT_TASKS[name].chance
        shape = "" if name not in forms else (f"; well-formed replies {100 * forms[name]['well_formed']:.0f}%, "
                                              f"calling the tool {100 * forms[name]['tool_calls']:.0f}%")
        print0(f"{name}: {sum(outcomes)}/{len(outcomes)} = {100 * results[name]:.2f}% (chance "
               f"{100 * chance[name]:.0f}%{shape}; {time.time() - t0:.0f}s, {compiled})")
    summary = {"source": args.source, "step": meta["step"], "results": results, "chance": chance, "forms": forms,
               "ChatCORE": chatcore(results)}
    if summary["ChatCORE"] is not None:
        print0(f"ChatCORE: {summary['ChatCORE']:.4f}")
    report.log(report.chat_evaluation(args.source), {"model step": meta["step"], "max problems": args.max_problems},
               results, {f"{name} chance": c for name, c in chance.items()},
               {f"{name} {what}": form[key] for name, form in forms.items()
                for what, key in zip(report.FORMS, ("well_formed", "tool_calls"))},
               {report.CHATCORE: summary["ChatCORE"]},
               report.standin("; ".join(f"{name}: generated on this machine (tasks/local.py)" for name in results
                                        if name in STANDINS)))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary | {"config": {k: v for k, v in vars(args).items() if k != "tasks"}}, f, indent=2)
    return summary


if __name__ == "__main__":
    run_entry_point(main)
