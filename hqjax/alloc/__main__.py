"""``python -m hqjax.alloc``: see :mod:`hqjax.alloc.cli`."""

import sys

from hqjax.alloc.cli import main

sys.exit(main())
