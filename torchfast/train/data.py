"""Data for the `torchfast train` job: scikit-learn's digits (shipped with it: nothing to download)
and synthetic images of a chosen size (for benchmarking)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def digits_datasets(val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset, int, int]:
    """(train, val, in_channels, num_classes): 1,797 8x8 grey images of digits, scaled to [0, 1],
    split stratified by class."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise RuntimeError("the digits data set ships with scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(torch.arange(len(y)).numpy(), test_size=val_fraction, random_state=seed,
                                          stratify=y.numpy())
    idx_train, idx_val = torch.as_tensor(idx_train), torch.as_tensor(idx_val)
    return TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_val], y[idx_val]), 1, 10


def synthetic_datasets(samples: int = 2048, image_size: int = 32, channels: int = 3, num_classes: int = 10,
                       seed: int = 0) -> tuple[TensorDataset, TensorDataset, int, int]:
    """Random images with random labels (for timing; accuracy means nothing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, channels, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (samples,), generator=g)
    n_val = max(samples // 5, 1)
    return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val]), channels, num_classes


def loaders(train: TensorDataset, val: TensorDataset, batch_size: int, sampler=None) -> tuple[DataLoader, DataLoader]:
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=False)
    return train_loader, DataLoader(val, batch_size=max(batch_size, 256))
