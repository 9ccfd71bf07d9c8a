"""`python -m mimo_jax.plan`: the command is `mimo_jax.cli.plan`, the library
`mimo_jax.train.memory_plan`; this module only runs the command."""

import sys

from mimo_jax.cli.plan import main

if __name__ == "__main__":
    main(sys.argv)
