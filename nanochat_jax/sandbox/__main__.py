"""`python -m nanochat_jax.sandbox --check`: which layers of the code sandbox are active here, and what a call costs."""
import argparse
import sys

from nanochat_jax.sandbox.execution import check

parser = argparse.ArgumentParser(prog="python -m nanochat_jax.sandbox",
                                 description="the code sandbox: which layers are active here")
parser.add_argument("--check", action="store_true", help="print the mode and its layers, as a program sees them")
parser.add_argument("--unsafe-sandbox", action="store_true", help="allow unsafe mode where kernel mode fails")
args = parser.parse_args()
if not args.check:
    parser.error("nothing to do: pass --check")
sys.exit(check(args.unsafe_sandbox))
