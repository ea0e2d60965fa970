"""What the compiler and the clock say: ahead-of-time compiles for TPU/GPU targets, and speed on random weights."""
