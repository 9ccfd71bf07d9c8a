"""`python -m mimo_jax.train.pretrain`: the command is `mimo_jax.cli.pretrain`, the library
`mimo_jax.train.trainer`; this module only runs the command."""

import sys

from mimo_jax.cli.pretrain import main

if __name__ == "__main__":
    main(sys.argv)
