"""Model conversion: one package for everything that turns a model into another form.

* :mod:`.layouts`: the registry of deployment layouts (dense, unstructured CSR, structured block)
  with their layer classes and expected costs;
* :mod:`.sparsify`: ``sparsify`` (swap layers, keep the model's own forward), ``densify``,
  ``sparsity_report``, converters for custom layer classes;
* :mod:`.masks`: ``magnitude_masks`` and ``apply_masks``;
* :mod:`.fuse`: the one ``torch.fx`` tracer, BatchNorm folding, ReLU / residual epilogues;
* :mod:`.compact`: physical channel removal;
* :mod:`.deploy` / :mod:`.deployed`: ``deploy`` and the frozen ``DeployedModel`` it returns;
* :mod:`.export`: ``export_onnx``.

Data flows one way: layouts <- sparsify <- (masks, compact, deploy, export); nothing here imports
the benchmark (``apb_sparse.bench``).
"""
from .compact import channel_groups, compact, zero_dead_batchnorm
from .deploy import deploy
from .deployed import MAX_TRACES, DeployedModel
from .export import export_onnx
from .layouts import LAYOUTS, Layout, layout_of, register_layout
from .masks import apply_masks, magnitude_masks
from .sparsify import (LayerChoice, SparsityReport, densify, register_converter, sparsify, sparsity_report,
                       unregister_converter)

__all__ = ["sparsify", "densify", "sparsity_report", "deploy", "DeployedModel", "MAX_TRACES", "export_onnx",
           "compact", "channel_groups", "zero_dead_batchnorm", "magnitude_masks", "apply_masks", "Layout",
           "LAYOUTS", "register_layout", "layout_of", "register_converter", "unregister_converter",
           "LayerChoice", "SparsityReport"]
