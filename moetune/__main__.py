"""`python -m moetune ...` and `accelerate launch -m moetune train RECIPE`."""

import sys

from moetune.cli import main


sys.exit(main())
