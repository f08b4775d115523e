"""apb_sparse.methods.registry: each method class names its differences and the authors' code (docs/methods.md)."""
from __future__ import annotations

from apb_sparse import methods


def test_method_classes_name_their_differences_and_code():
    for name in ("harp", "flyingbird", "robustbird", "li20", "twinrep",
                 "pwoa", "mad", "hydra", "radmm", "rst"):
        cls = methods.get(name)
        assert cls.notes and cls.code_url.startswith("https://github.com/")
