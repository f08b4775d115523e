"""apb_sparse.methods.masks (score-mask cache used by HYDRA): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from apb_sparse.methods.masks import cached_ste_topk, topk_mask


def _score_step_paths():
    paths = ["data_write"]
    try:
        p = nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        torch.optim.SGD([p], lr=0.1, fused=True).step()
        paths.append("fused_sgd")
    except (RuntimeError, TypeError, NotImplementedError):  # fused SGD not available on this CPU build
        pass
    return paths


@pytest.mark.parametrize("path", _score_step_paths())
def test_mask_follows_scores_updated_without_a_version_bump(path):
    torch.manual_seed(0)
    s = nn.Parameter(torch.randn(50))
    mask_fn = cached_ste_topk(s, lambda: 10)
    first = mask_fn(None).detach().clone()
    assert torch.equal(first, topk_mask(s.detach().abs(), 10))
    version = s._version
    new = torch.randn(50) * 10
    if path == "data_write":
        s.data.copy_(new)
    else:
        s.grad = (s.detach() - new) / 1.0   # one SGD step of lr 1 lands exactly on `new`
        torch.optim.SGD([s], lr=1.0, fused=True).step()
    assert s._version == version, "the update path must be one that does not bump _version"
    assert torch.allclose(s.detach(), new)
    after = mask_fn(None).detach()
    assert torch.equal(after, topk_mask(new.abs(), 10))
    assert not torch.equal(after, first)


def test_mask_cache_still_reuses_the_sort_between_updates(monkeypatch):
    from apb_sparse.methods import masks

    calls = {"n": 0}
    real = masks.topk_mask

    def counting(scores, k):
        calls["n"] += 1
        return real(scores, k)

    monkeypatch.setattr(masks, "topk_mask", counting)
    s = nn.Parameter(torch.randn(30))
    mask_fn = cached_ste_topk(s, lambda: 5)
    for _ in range(5):
        mask_fn(None)
    assert calls["n"] == 1
    with torch.no_grad():
        s.add_(torch.randn(30))
    mask_fn(None)
    assert calls["n"] == 2
