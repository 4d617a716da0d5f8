"""`python -m boltz_cp ...` and `torchrun ... -m boltz_cp ...`."""

import sys

from boltz_cp.cli.main import main

sys.exit(main())
