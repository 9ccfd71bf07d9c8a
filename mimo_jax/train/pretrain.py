# `python -m mimo_jax.train.pretrain`: runs `mimo_jax.cli.pretrain`, nothing else.
# Its docstring is the command's, which absl prints for --help.
import sys

from mimo_jax.cli.pretrain import __doc__, main

if __name__ == "__main__":
    main(sys.argv)
