"""The code sandbox for model-written Python: the caller's side (execution) and the sandboxed interpreter's first lines (guard)."""
