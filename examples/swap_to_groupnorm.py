"""Swap BatchNorm for GroupNorm on scikit-learn's digits, with and without repair.

A small BN convnet is trained on 60% of the digits. Its BN layers are then swapped for GroupNorm
(which works at batch size 1): once plainly, keeping each BN's scale and shift, and once with
repair (``calibrate=``), which fits each GroupNorm's per-channel scale and shift by least
squares so that its output matches the BN it replaces on 512 unlabelled images. Accuracies are
printed right after the swap and after a short fine-tune (200 steps at batch size 1).

Run: python examples/swap_to_groupnorm.py   (CPU, well under a minute)
"""

from __future__ import annotations

import copy
import time

import torch
from _digits import accuracy, load_digits_tensors, small_bn_convnet, train

import bnsurgery


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    images, labels = load_digits_tensors()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train_idx, tune_idx, test_idx = order[:1078], order[1078:1278], order[1278:]

    model = train(
        small_bn_convnet(), images[train_idx], labels[train_idx], epochs=10, batch_size=32, lr=3e-3
    )
    original = accuracy(model, images[test_idx], labels[test_idx])
    print(f"BatchNorm model          : accuracy {original:.3f}")
    calibration = images[train_idx[:512]].split(64)  # images only: no labels are used
    for name, kwargs in (
        ("GroupNorm, plain swap", {}),
        ("GroupNorm, repaired", {"calibrate": calibration}),
    ):
        swapped = bnsurgery.swap(copy.deepcopy(model), "groupnorm", **kwargs)
        before = accuracy(swapped, images[test_idx], labels[test_idx])
        train(swapped, images[tune_idx], labels[tune_idx], epochs=1, batch_size=1, lr=3e-5)
        after = accuracy(swapped, images[test_idx], labels[test_idx])
        print(f"{name:25s}: accuracy {before:.3f} after the swap, {after:.3f} after fine-tuning")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
