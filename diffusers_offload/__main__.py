"""`python -m diffusers_offload`: the same command line as `diffusers-offload`."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (docs tools, test collectors) must not run the CLI
    sys.exit(main())
