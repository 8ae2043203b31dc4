"""``python -m hpattn_dist``: the ``hpattn-dist`` command line (see :mod:`hpattn_dist.cli`)."""

import sys

from hpattn_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
