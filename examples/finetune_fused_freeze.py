"""Fine-tuning with frozen BN computed inside its conv (``freeze(fuse=True)``), on digits.

The small BN convnet of ``finetune_frozen_bn.py`` is trained on 60% of scikit-learn's digits,
then fine-tuned on 300 images of a shifted domain with its BN statistics frozen and the BN
affine trainable (``train_affine=True``, the usual detector fine-tuning setting), twice: with a
plain freeze, and with each frozen BN fused into the conv or linear before it. Both reach the
same accuracy (the same function and gradients, to float rounding); the fused model keeps less
for the backward pass, because no layer's unnormalised output is stored: the memory is counted
exactly, as every tensor autograd saves in one forward pass (parameters excluded).

Run: python examples/finetune_fused_freeze.py   (CPU, well under a minute)
"""

from __future__ import annotations

import copy
import time

import torch
from _digits import accuracy, load_digits_tensors, shift_domain, small_bn_convnet, train

import bnsurgery


def saved_for_backward_mb(model: torch.nn.Module, x: torch.Tensor) -> float:
    """What autograd keeps from one training forward pass of ``model`` on ``x``, in MB."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x)
    return sum(kept.values()) / 2**20


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
    before = accuracy(pretrained, target_images[test], labels[test])
    print(f"pretrained: shifted-domain accuracy {before:.3f}")

    results = {}
    for name, fuse in (("plain freeze", False), ("fused freeze", True)):
        model = copy.deepcopy(pretrained)
        bnsurgery.freeze(model, train_affine=True, fuse=fuse, example_inputs=images[:2])
        if fuse:
            report = bnsurgery.last_report(model)
            print(f"fused: {', '.join(f'{bn} into {layer}' for bn, layer in report.fused)}")
        memory = saved_for_backward_mb(model, target_images[:512])
        train(model, target_images[tune], labels[tune], epochs=3, batch_size=16, lr=1e-3)
        acc = accuracy(model, target_images[test], labels[test])
        results[name] = (acc, memory)
        print(
            f"{name}: shifted-domain accuracy {acc:.3f}; kept for backward at batch 512: "
            f"{memory:.2f} MB"
        )
    (plain_acc, plain_mb), (fused_acc, fused_mb) = results.values()
    print(
        f"fused freeze keeps {fused_mb / plain_mb:.2f} of the plain freeze's activation memory "
        f"({plain_mb - fused_mb:.2f} MB less at batch 512); accuracy {fused_acc:.3f} against "
        f"{plain_acc:.3f}"
    )
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
