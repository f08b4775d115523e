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


# The slowest tests (minutes each on 2 cores: real Ray heads, SLURM-local jobs, whole `apb`
# commands, long method runs): `python -m pytest -m "not slow"` skips them.
SLOW_FILES = {"test_ray.py", "test_ray_cluster.py", "test_slurm.py"}
SLOW_TESTS = {"test_apb_eval_evaluates_a_robustbench_checkpoint_as_it_is",
              "test_run_resumes_skipping_finished_cells_and_rerunning_torn_ones"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
