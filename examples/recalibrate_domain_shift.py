"""AdaBN on scikit-learn's digits: recalibrate BN statistics on unlabelled target images.

A small BN convnet is trained on the original digits, then evaluated on a shifted domain
(lower contrast, brighter background). bnsurgery.recalibrate recomputes every BN's running
statistics over the *unlabelled* target images; no weight changes. Prints both accuracies.

Run: python examples/recalibrate_domain_shift.py   (CPU, a few seconds)
"""

from __future__ import annotations

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
    unlabelled, test = target[:300], target[300:]
    shifted = shift_domain(images, contrast=0.5, brightness=0.4, roll=0)

    model = train(
        small_bn_convnet(), images[source], labels[source], epochs=10, batch_size=32, lr=3e-3
    )
    print(f"original domain accuracy:           {accuracy(model, images[test], labels[test]):.3f}")
    print(f"shifted domain, before recalibrate: {accuracy(model, shifted[test], labels[test]):.3f}")
    batches = shifted[unlabelled].split(32)  # images only: no labels are used
    bnsurgery.recalibrate(model, batches)
    print(f"shifted domain, after recalibrate:  {accuracy(model, shifted[test], labels[test]):.3f}")
    drift = bnsurgery.last_report(model).layers
    print("mean KL(old || new) per layer: " + ", ".join(f"{d.name}={d.mean_kl:.3g}" for d in drift))
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
