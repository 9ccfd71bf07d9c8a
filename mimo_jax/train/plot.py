# `python -m mimo_jax.train.plot`: runs `mimo_jax.cli.plot`, nothing else.
# Its docstring is the command's, which absl prints for --help.
import sys

from mimo_jax.cli.plot import __doc__, main

if __name__ == "__main__":
    main(sys.argv)
