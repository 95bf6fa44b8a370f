"""Augmentation randomness that depends only on (seed, epoch, sample index).

The transforms draw from the global RNGs. Seeding each sample from (seed, epoch, index) inside a forked RNG makes a
sample's augmentation independent of worker count, process count, dataloader prefetching and resumption, and leaves
the global RNG (used by the model's denoising noise) untouched by data loading. That is what lets a resumed run
reproduce an uninterrupted one exactly.

The training loop sets the epoch itself (``dataset.set_epoch(epoch)``) before it creates the epoch's iterator.
Accelerate's ``DataLoaderShard.set_epoch`` passes the epoch on to the dataset only while the sampler is not sharded
(one process), so on several processes every epoch would otherwise repeat epoch 0's augmentations. DataLoader workers
receive the dataset, epoch included, when the iterator starts them; persistent workers would keep the first epoch's.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset


class EpochSeededDataset(Dataset):
    """Wraps a map-style dataset; ``set_epoch`` (called by the training loop before each epoch) changes every sample's
    seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # Distinct, well-mixed seed per (seed, epoch, index); numpy's SeedSequence does the mixing.
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed the CUDA generator, which fork_rng(devices=[])
            # does not restore (the model's denoising noise on a GPU), and costs a captured stack trace per call.
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name: str):
        # Forward dataset attributes (num_classes, label_to_category_id, ...); guard against recursion on unpickling.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
