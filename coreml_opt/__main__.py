"""`python -m coreml_opt` runs the `coreml-opt` command line."""
import sys

from .cli import main

sys.exit(main())
