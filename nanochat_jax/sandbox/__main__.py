"""`python -m nanochat_jax.sandbox --check`: which layers of the code sandbox are active here, and what a call costs."""
from nanochat_jax.sandbox.execution import main

main()
