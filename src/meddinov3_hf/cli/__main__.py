"""`python -m meddinov3_hf.cli`: the `meddinov3` command."""

import sys

from . import main

sys.exit(main())
