"""Training: optimiser, train state, the jitted step, the loop, workdir, AOT compiles."""
