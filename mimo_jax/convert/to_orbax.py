# `python -m mimo_jax.convert.to_orbax`: runs `mimo_jax.cli.to_orbax`, nothing else.
# Its docstring is the command's, which absl prints for --help.
import sys

from mimo_jax.cli.to_orbax import __doc__, main

if __name__ == "__main__":
    main(sys.argv)
