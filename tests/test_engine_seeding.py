"""EpochSeededDataset: a sample's augmentation depends on (seed, epoch, index) only and leaves the global RNGs alone."""
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from dino.engine.seeding import EpochSeededDataset


class RandomDraws(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return torch.rand(2), random.random(), float(np.random.rand())


def test_sample_depends_on_epoch_and_index_only():
    data = EpochSeededDataset(RandomDraws(), seed=3)
    first = data[1]
    torch.rand(5)  # global draws in between change nothing
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(first, data[1]))
    data.set_epoch(1)
    assert not torch.equal(first[0], data[1][0])


def test_global_rngs_untouched_including_cuda(monkeypatch):
    # torch.manual_seed would reseed the CUDA generator too, which fork_rng(devices=[]) does not restore.
    def forbidden(*args):
        raise AssertionError("a sample reseeded a CUDA generator")

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    EpochSeededDataset(RandomDraws(), seed=3)[2]
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
