"""`python -m kvbatch.cli`."""

import sys

from kvbatch.cli import main

sys.exit(main())
