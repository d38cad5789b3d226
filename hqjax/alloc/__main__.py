"""``python -m hqjax.alloc``: see :mod:`hqjax.alloc.cli`."""

import sys

from hqjax.alloc.cli import main

if __name__ == "__main__":
    sys.exit(main())
