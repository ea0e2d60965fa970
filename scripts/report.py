"""The report card: `reset` at the start of a run, `generate` at the end (see nanochat_jax/report.py).

    python -m scripts.report reset
    python -m scripts.report generate     # -> $NANOCHAT_BASE_DIR/report/report.md
"""
import argparse

from nanochat_jax import report


def main(argv=None):
    p = argparse.ArgumentParser(description="reset or generate the report card")
    p.add_argument("command", choices=["reset", "generate"])
    args = p.parse_args(argv)
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.report_dir()}")
    else:
        print(f"report written to {report.generate()}")


if __name__ == "__main__":
    main()
