"""``python -m hpattn_dist``: the ``hpattn-dist`` command line (see :mod:`hpattn_dist.tools.cli`)."""

import sys

from hpattn_dist.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
