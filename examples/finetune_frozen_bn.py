"""Small-batch fine-tuning with and without bnsurgery.freeze, on scikit-learn's digits.

A small BN convnet (BatchNorm2d features, a Linear-BatchNorm1d head) is trained on 60% of the
digits. It is then fine-tuned with batch size 2, and 1, on 300 images from a shifted domain
(lower contrast, brighter, moved one pixel) and evaluated on the other held-out images of that
domain. With BN in train mode, batches of two give noisy statistics that drift into the running
estimates, and batch size 1 fails outright; frozen BN keeps the pretrained statistics.

Run: python examples/finetune_frozen_bn.py   (CPU, well under two minutes)
"""

from __future__ import annotations

import copy
import time

import torch
from _digits import accuracy, load_digits_tensors, shift_domain, small_bn_convnet, train

import bnsurgery


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    images, labels = load_digits_tensors()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    source, target = order[:1078], order[1078:]
    tune, test = target[:300], target[300:]
    target_images = shift_domain(images, contrast=0.8, brightness=0.1, roll=1)

    pretrained = train(
        small_bn_convnet(), images[source], labels[source], epochs=10, batch_size=32, lr=3e-3
    )
    original = accuracy(pretrained, images[test], labels[test])
    shifted = accuracy(pretrained, target_images[test], labels[test])
    print(f"pretrained: original-domain accuracy {original:.3f}, shifted {shifted:.3f}")

    for batch_size in (2, 1):
        for name in ("BN in train mode", "bnsurgery.freeze"):
            model = copy.deepcopy(pretrained)
            if name == "bnsurgery.freeze":
                bnsurgery.freeze(model)  # in place; stays frozen through model.train()
            try:
                train(
                    model,
                    target_images[tune],
                    labels[tune],
                    epochs=2,
                    batch_size=batch_size,
                    lr=1e-3,
                )
            except ValueError as exc:  # BatchNorm1d in train mode cannot normalise one sample
                print(f"fine-tuned at batch size {batch_size} with {name:17s}: fails: {exc}")
                continue
            acc = accuracy(model, target_images[test], labels[test])
            print(
                f"fine-tuned at batch size {batch_size} with {name:17s}: "
                f"shifted-domain accuracy {acc:.3f}"
            )
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
