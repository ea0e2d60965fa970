"""The code sandbox's cost per call: the median and 90th percentile of --repeats round trips (start, limits, output
back, clean-up) of a trivial, a printing and a CPU-bound program; and HumanEval's canonical solutions through it.

    python -m scripts.bench_sandbox                                   # this sandbox, the mode this machine gets
    python -m scripts.bench_sandbox --humaneval ../shared/data/task_data/humaneval/test.jsonl
    python -m scripts.bench_sandbox --impl /tmp/old_execution.py      # another execute_code (e.g. an older commit's)
"""
import argparse
import importlib.util
import json
import statistics
import time


def load_execute_code(path: str | None):
    if path is None:  # this package's, and which mode it runs in
        from nanochat_jax.sandbox.execution import describe, execute_code
        print(describe())
        return execute_code
    spec = importlib.util.spec_from_file_location("other_execution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.execute_code


def timings(execute_code, code: str, repeats: int) -> tuple[float, float, str]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        status = execute_code(code).status
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sorted(times)[int(0.9 * (len(times) - 1))], status


def humaneval(execute_code, path: str) -> dict:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    failed, t0 = [], time.perf_counter()
    for row in rows:
        program = f"{row['prompt']}{row['canonical_solution']}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
        result = execute_code(program)
        if not result.success:
            failed.append((row["task_id"], result.status, result.error))
    seconds = time.perf_counter() - t0
    return {"problems": len(rows), "passed": len(rows) - len(failed), "seconds": seconds,
            "per_problem_ms": 1000 * seconds / max(len(rows), 1), "failed": failed}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default=None, help="a file defining execute_code to measure instead of this package's")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--humaneval", default=None, help="HumanEval's test.jsonl: run every canonical solution")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be positive")
    execute_code = load_execute_code(args.impl)
    out = {"impl": args.impl or "nanochat_jax.sandbox.execution"}
    for name, code in (("trivial", "pass"), ("print", "print('hello')"),
                       ("cpu", "s = 0\nfor i in range(2_000_000):\n    s += i\nprint(s)")):
        median, p90, status = timings(execute_code, code, args.repeats)
        out[name] = {"median_ms": 1000 * median, "p90_ms": 1000 * p90, "status": status}
        print(f"{name:>8}: median {1000 * median:7.1f} ms   p90 {1000 * p90:7.1f} ms   ({status})")
    if args.humaneval:
        out["humaneval"] = he = humaneval(execute_code, args.humaneval)
        print(f"HumanEval canonical solutions: {he['passed']}/{he['problems']} pass, {he['seconds']:.1f} s "
              f"({he['per_problem_ms']:.0f} ms per problem)")
        for task_id, status, error in he["failed"]:
            print(f"  {task_id}: {status}: {error}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
