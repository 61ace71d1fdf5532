"""`python -m attnc`: the command line.

input:  argv.
output: the exit code of `attnc.cli.main`.
does not: anything else.
"""

import sys

from .cli import main

sys.exit(main())
