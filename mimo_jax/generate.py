"""`python -m mimo_jax.generate`: the command is `mimo_jax.cli.generate`; this module only runs
it. The libraries are `mimo_jax.loading` and `mimo_jax.inference` (`mimo_jax.generate`, after
`import mimo_jax`, is the generation function, not this module)."""

import sys

from mimo_jax.cli.generate import main

if __name__ == "__main__":
    main(sys.argv)
