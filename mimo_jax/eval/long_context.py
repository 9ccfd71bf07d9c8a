# `python -m mimo_jax.eval.long_context`: runs `mimo_jax.cli.long_context`, nothing else.
# Its docstring is the command's, which absl prints for --help. The evaluation itself is
# `mimo_jax.eval.context_eval` (tasks: context_tasks, scoring: context_scoring, outputs:
# context_report).
import sys

from mimo_jax.cli.long_context import __doc__, main

if __name__ == "__main__":
    main(sys.argv)
