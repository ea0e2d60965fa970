"""Evaluation: CORE, bits per byte, the chat tasks' scoring, and the report card."""
