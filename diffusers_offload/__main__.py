"""`python -m diffusers_offload`: the same command line as `diffusers-offload`."""

import sys

from .cli import main

sys.exit(main())
