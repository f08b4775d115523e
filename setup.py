"""Build of apb_sparse and its extension module apb_sparse._C.

C++ CPU kernels are always built.  CUDA kernels (csrc/cuda/*.cu) are added when torch is a CUDA
build and nvcc is found (set APB_SPARSE_NO_CUDA=1 to skip them).  Install torch first, then
``pip install --no-build-isolation -e .``.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """A CUDA toolkit root that really holds cuda_runtime.h.

    torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script
    (/usr/local/bin/nvcc here) the guess is /usr/local, which has no headers or libcudart.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def _nvidia_wheel_includes():
    """Include dirs of the nvidia-* wheels (cusparse.h, cublas_v2.h) that a minimal toolkit lacks
    but ATen/cuda/CUDAContext.h needs."""
    dirs = []
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return dirs
    for base in list(nvidia.__path__):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(os.path.join(inc, "cublas_v2.h")):
                dirs.append(inc)
    return dirs


import torch  # noqa: E402

with_cuda = torch.version.cuda is not None and os.environ.get("APB_SPARSE_NO_CUDA", "0") != "1"
cuda_home = _find_cuda_home() if with_cuda else None
if with_cuda and cuda_home is None:
    print("apb_sparse: WARNING: torch is a CUDA build but no CUDA toolkit (nvcc + cuda_runtime.h) was found; "
          "building the CPU kernels only (set CUDA_HOME to build the CUDA kernels)", file=sys.stderr)
with_cuda = with_cuda and cuda_home is not None
if with_cuda:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
    os.environ["CUDA_HOME"] = cuda_home
    # Without a visible GPU torch's arch helper fails on an empty list, so a default is needed.
    # sm_80 (A100, and by binary compatibility A10 / L4 / L40 / RTX 30xx-40xx) and sm_90
    # (H100 / H200) as native code, plus sm_90 PTX that the driver JIT-compiles for newer GPUs
    # (Blackwell and later), so no GPU fails with "no kernel image".  A GPU session that builds
    # for its own GPU only sets TORCH_CUDA_ARCH_LIST itself (e.g. "9.0").
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# -fno-tree-loop-distribute-patterns: the kernels copy short rows (4 to 64 elements) per register
# tile; GCC would otherwise turn those loops into libc memcpy/memset calls that cost more than
# the copies themselves.
cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno", "-fno-tree-loop-distribute-patterns"]
define_macros = []
include_dirs = [os.path.join(ROOT, "csrc")]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("APB_WITH_CUDA", "1"))
    include_dirs += _nvidia_wheel_includes()
    ext = CUDAExtension(
        "apb_sparse._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"])
else:
    ext = CppExtension(
        "apb_sparse._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

print(f"apb_sparse: building CPU kernels{' + CUDA kernels (CUDA_HOME=' + cuda_home + ', arch ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else ''}",
      file=sys.stderr)

setup(
    name="apb_sparse",
    version="0.1.0",
    description="Adversarial pruning with real sparse inference: sparse conv kernels, pruning methods, benchmark",
    packages=find_packages(include=["apb_sparse", "apb_sparse.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "numpy",
        "scikit-learn",
        "scipy",
        "tqdm",
        "safetensors",
        "matplotlib",
        "pyautoattack>=0.2",
        "secml-torch>=1.5",
    ],
    extras_require={"test": ["pytest", "ninja"], "ray": ["ray>=2.9", "psutil"], "slurm": ["submitit"],
                    "timm": ["timm"]},
    entry_points={"console_scripts": ["apb=apb_sparse.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
