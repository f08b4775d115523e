"""Which weights a pruning method may prune: the structures and the prunable layers of a model.

**Prunable weights (one rule for every method).**

* ``structure="unstructured"``: the weights of every conv and every linear layer of the model,
  first conv and classifier included (HYDRA's choice). The requested sparsity is the fraction of
  zeros over all of them, so it matches the total of ``apb_sparse.sparsity_report``. Biases,
  BatchNorm parameters and the embedded normalisation are not pruned.
* ``structure="filter"`` (aliases in :mod:`apb_sparse.structures`): whole output filters of every
  conv layer (``groups == 1``). Linear layers stay dense because a row of the classifier is a class.
  The requested sparsity is the fraction of conv weights removed by pruned filters (within one
  filter per layer of rounding). For a pruned filter the conv's mask row, its bias and the
  following BatchNorm channel (weight and bias) are zero and are kept zero during training, so
  ``apb_sparse.compact`` can remove the channel; compact also drops the matching input channels of
  the consumers, so the compacted model is smaller than the filter sparsity alone says. Filters
  feeding a residual addition are only removed by compact if the whole group is pruned.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from ..nn.masked import MaskedConv2d, masked_layers
from ..structures import STRUCTURES, normalize_structure

__all__ = ["STRUCTURES", "normalize_structure", "prunable_layers"]


def prunable_layers(model: nn.Module, structure: str = "unstructured") -> List[Tuple[str, nn.Module]]:
    """The layers whose weights count as prunable (see the module docstring)."""
    structure = normalize_structure(structure)
    layers = list(masked_layers(model))
    if structure == "filter":
        layers = [(n, m) for n, m in layers if isinstance(m, MaskedConv2d) and m.groups == 1]
    return layers
