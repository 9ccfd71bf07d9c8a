# `python -m mimo_jax.ablate`: runs `mimo_jax.cli.ablate`, nothing else.
# Its docstring is the command's, which absl prints for --help.
import sys

from mimo_jax.cli.ablate import __doc__, main

if __name__ == "__main__":
    main(sys.argv)
