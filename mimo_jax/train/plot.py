"""`python -m mimo_jax.train.plot`: the command is `mimo_jax.cli.plot`, the library
`mimo_jax.train.curves`; this module only runs the command."""

import sys

from mimo_jax.cli.plot import main

if __name__ == "__main__":
    main(sys.argv)
