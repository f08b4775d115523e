"""Typed wrappers over torch.ops.apb_sparse.* (placeholder until the extension lands)."""
def available() -> bool:
    return False
