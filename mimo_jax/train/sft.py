# `python -m mimo_jax.train.sft`: runs `mimo_jax.cli.sft`, nothing else.
# Its docstring is the command's, which absl prints for --help.
import sys

from mimo_jax.cli.sft import __doc__, main

if __name__ == "__main__":
    main(sys.argv)
