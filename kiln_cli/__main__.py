"""`python -m kiln_cli ...` is the `kiln` command."""

import sys

from kiln_cli.main import main

sys.exit(main())
