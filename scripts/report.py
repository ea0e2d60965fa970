"""The report card: `reset` at the start of a run, `generate` at the end (see nanochat_jax/evaluation/report.py).

    python -m scripts.report reset|generate    # generate writes $NANOCHAT_BASE_DIR/report/report.md
    python -m scripts.report expect --line "what this model can and cannot do" --chat-file reply.txt --scores-of rl
"""
import argparse
from pathlib import Path

from nanochat_jax.common import run_entry_point
from nanochat_jax.evaluation import report


def main(argv=None):
    p = argparse.ArgumentParser(description="reset or generate the report card")
    p.add_argument("command", choices=["reset", "expect", "generate"])
    p.add_argument("--line", default=None, help="expect: what the model can and cannot be expected to do")
    p.add_argument("--chat-file", default=None, help="expect: a file holding a question and the model's answer")
    p.add_argument("--scores-of", default=None, choices=sorted(report.STAGES), help="expect: add a stage's chat scores")
    args = p.parse_args(argv)
    if args.command == "reset":
        archive = report.reset()
        print(f"report reset: {report.report_dir()}" + (f" (the last run's report is kept in {archive})"
                                                         if archive else ""))
    elif args.command == "expect":
        if not args.line:
            p.error("expect needs --line")
        text = Path(args.chat_file).read_text(encoding="utf-8") if args.chat_file else ""
        chat = " / ".join(part.strip() for part in text.split("\n") if part.strip())
        line = args.line
        if args.scores_of and (scores := report.scores_line(args.scores_of)):
            line += f"; {scores}"
        report.log(report.EXPECTATIONS, {"in one line": line}, {"a question and its answer": chat} if chat else {})
        print(f"expectations logged: {line}")
    else:
        print(f"report written to {report.generate()}")


if __name__ == "__main__":
    run_entry_point(main)
