# `python -m mimo_jax.data.to_array_record`: runs `mimo_jax.cli.to_array_record`, nothing else.
# Its docstring is the command's, which absl prints for --help.
import sys

from mimo_jax.cli.to_array_record import __doc__, main

if __name__ == "__main__":
    main(sys.argv)
