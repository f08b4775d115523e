"""apb_sparse: adversarial pruning with real sparse inference."""
from . import ops, nn

__version__ = "0.1.0"
