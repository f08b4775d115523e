import pytest
import torch

import apb_sparse  # noqa: F401  (loads the ops)

# Tests compare against F.conv2d / F.linear at float32 tolerances: no TF32 on GPUs.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "apb_sparse::sparse_conv2d", "CUDA")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_ready(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
