"""Data for the `torchfast train` job: scikit-learn's digits (shipped with it: nothing to download),
synthetic images of a chosen size (for benchmarking), and a user's own images (an ImageFolder
directory, through torchvision)."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

# ImageNet's channel statistics: what torchvision's models are used to (and as good as any for others)
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def image_folder_datasets(path: str, image_size: int = 64, val_fraction: float = 0.2,
                          seed: int = 0) -> tuple[Dataset, Dataset, int, int]:
    """(train, val, 3, num_classes) from a directory of images, one subdirectory per class
    (torchvision.datasets.ImageFolder). With `train/` and `val/` subdirectories those are the split;
    otherwise `val_fraction` of the images, drawn with `seed`, validate. Images are resized to
    image_size x image_size, RGB, normalised with ImageNet's mean and std; training images are also
    flipped at random."""
    try:
        from torchvision import datasets, transforms
    except ImportError as e:
        raise RuntimeError("training on an image folder needs torchvision: pip install torchvision") from e
    if not os.path.isdir(path):
        raise ValueError(f"--data {path}: not a directory (expected one subdirectory of images per class, or "
                         "'digits' or 'synthetic')")
    resize = [transforms.Resize((image_size, image_size)), transforms.ToTensor(),
              transforms.Normalize(IMAGE_MEAN, IMAGE_STD)]
    train_tf = transforms.Compose([transforms.RandomHorizontalFlip()] + resize)
    val_tf = transforms.Compose(resize)

    def folder(root, transform):
        try:
            return datasets.ImageFolder(root, transform=transform)
        except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images in them
            raise ValueError(f"--data {root}: {e}") from None

    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "val")):
        train, val = folder(os.path.join(path, "train"), train_tf), folder(os.path.join(path, "val"), val_tf)
        if train.classes != val.classes:
            raise ValueError(f"--data {path}: train/ and val/ hold different classes "
                             f"({train.classes} vs {val.classes})")
        return train, val, 3, len(train.classes)
    train_view, val_view = folder(path, train_tf), folder(path, val_tf)
    n = len(train_view)
    if n < 2:
        raise ValueError(f"--data {path}: {n} image(s); need at least 2 (one to train, one to validate)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return Subset(train_view, order[n_val:]), Subset(val_view, order[:n_val]), 3, len(train_view.classes)


def loaders(train: Dataset, val: Dataset, batch_size: int, sampler=None) -> tuple[DataLoader, DataLoader]:
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=False)
    return train_loader, DataLoader(val, batch_size=max(batch_size, 256))
