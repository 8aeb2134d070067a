"""Shared by the examples: scikit-learn's bundled digits (no download) and a small BN convnet."""

from __future__ import annotations

import torch
from torch import nn


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digit images as (N, 1, 8, 8) floats in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target)


def shift_domain(
    images: torch.Tensor, contrast: float = 0.5, brightness: float = 0.4, roll: int = 1
) -> torch.Tensor:
    """A new "camera": changed contrast and brightness, moved ``roll`` pixels to the right."""
    moved = torch.roll(images, shifts=roll, dims=-1)
    return moved * contrast + brightness


def small_bn_convnet(num_classes: int = 10) -> nn.Sequential:
    """Conv-BN-ReLU features and a Linear-BatchNorm1d head, like the article's CIFAR model."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def train(
    model: nn.Module, images, labels, *, epochs: int, batch_size: int, lr: float, seed: int = 0
):
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss_fn(model(images[idx]), labels[idx]).backward()
            optimizer.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images, labels) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())
