"""``python -m apb_sparse.cli``: the ``apb`` command."""
import sys

from . import main

sys.exit(main())
