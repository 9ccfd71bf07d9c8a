"""`python -m mimo_jax.summary`: the command is `mimo_jax.cli.summary`, the library
`mimo_jax.model.param_count`; this module only runs the command (`mimo_jax.summary`, after
`import mimo_jax`, is the library function)."""

import sys

from mimo_jax.cli.summary import main

if __name__ == "__main__":
    main(sys.argv)
