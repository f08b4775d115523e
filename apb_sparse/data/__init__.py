"""Datasets as [0, 1] image tensors: ``get_dataset(name, data_dir=None, download=False)``."""
from .datasets import (DEBIAN_FASHION_MNIST_DIR, DIGITS_SPLIT_SEED, SYNTHETIC_SEED, SYNTHETIC_SIZES,
                       DatasetBundle, DatasetNotFoundError, available_datasets, default_data_dir,
                       get_dataset)

__all__ = ["DatasetBundle", "DatasetNotFoundError", "get_dataset", "available_datasets",
           "default_data_dir", "DEBIAN_FASHION_MNIST_DIR", "DIGITS_SPLIT_SEED", "SYNTHETIC_SEED",
           "SYNTHETIC_SIZES"]
