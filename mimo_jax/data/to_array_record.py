"""`python -m mimo_jax.data.to_array_record`: the command is `mimo_jax.cli.to_array_record`, the
library `mimo_jax.data.token_shards`; this module only runs the command."""

import sys

from mimo_jax.cli.to_array_record import main

if __name__ == "__main__":
    main(sys.argv)
