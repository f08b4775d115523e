"""Adversarial pruning methods on one common recipe.

``available()`` lists the registered names, ``get(name)`` returns the class; every class carries
its taxonomy as ``tags`` (see :class:`TaxonomyTags`) and implements
``prune(model, data, *, sparsity, structure="unstructured", recipe, pretrained=False)``, plus
``notes`` (where it departs from the authors' code) and ``code_url``. What each method computes
compared with its authors' code, and every scale-down for the CPU presets: docs/methods.md.

Example::

    from apb_sparse import methods
    recipe = methods.Recipe(arch="small_cnn", dataset="digits", eps=0.1, steps=5,
                            pretrain_epochs=10, prune_epochs=3, finetune_epochs=5)
    result = methods.get("hydra")().prune(None, sparsity=0.9, recipe=recipe)
    result.model, result.log["sparsity"]
"""
from .base import PruningMethod
from .context import PruneContext, PruneResult
from .masks import global_masks, local_masks, topk_mask
from .recipe import Recipe
from .registry import available, get, register
from .structure import STRUCTURES
from .tags import TaxonomyTags
from .magnitude import LWMGlobal, LWMLocal, RandomPruning
from .radmm import RADMM
from .hydra import HYDRA
from .harp import HARP
from .pwoa import PwoA
from .mad import MAD
from .li20 import Li20
from .rst import RST
from .robustbird import RobustBird
from .twinrep import TwinRep
from .flyingbird import FlyingBird

__all__ = ["Recipe", "TaxonomyTags", "PruneResult", "PruneContext", "PruningMethod", "available",
           "get", "register", "STRUCTURES", "topk_mask", "local_masks", "global_masks",
           "RandomPruning", "LWMLocal", "LWMGlobal", "RADMM", "HYDRA", "HARP", "PwoA", "MAD",
           "Li20", "RST", "RobustBird", "TwinRep", "FlyingBird"]
