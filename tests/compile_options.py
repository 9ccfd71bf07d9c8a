"""XLA:CPU compile options for the tests that compile many small (often sharded) programs."""

# No LLVM optimisation and no fusion emitters: the same numbers, and roughly half the compile plus
# first-run time of these small programs.
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
