"""The code sandbox for model-written Python: execution.py (the caller's side), guard.py (the sandboxed side)."""
