"""Test models: the four models of the article the project grew from (../shared/seeds),
and small cases for each fold placement."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import seed_models


class SimpleCNN(nn.Module):
    """Seed model: conv -> BatchNorm2d -> ReLU."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)))


class SimpleMLP(nn.Module):
    """Seed model: Linear -> BatchNorm1d -> ReLU."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 5)
        self.bn = nn.BatchNorm1d(5)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.fc(x)))


def sequential_model() -> nn.Sequential:
    """Seed model: the article's nn.Sequential (expects 3x32x32)."""
    return seed_models.sequential()


#: Seed model: the article's CIFAR-10 classifier (expects 3x32x32).
CIFAR10Model = seed_models.CIFAR10Model


#: name -> (factory, per-sample input size)
SEEDS = {
    "SimpleCNN": (SimpleCNN, (3, 32, 32)),
    "SimpleMLP": (SimpleMLP, (10,)),
    "Sequential": (sequential_model, (3, 32, 32)),
    "CIFAR10Model": (CIFAR10Model, (3, 32, 32)),
}


def simple_cnn(width: int = 16) -> nn.Module:
    """Factory for CLI tests (``tests.models:simple_cnn``, ``...:simple_cnn(width=8)``)."""
    return SimpleCNN(width)


class Residual(nn.Module):
    """conv output used by BN and by the residual add: the BN must not fold into conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConvDifferentBN(nn.Module):
    """One conv module called twice, each call followed by a different BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


class SharedConvSameBN(nn.Module):
    """One conv and one BN, both called twice in the same pair: foldable at both sites."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) - self.bn(self.conv(x.flip(-1)))


class ReluBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


class InplaceAfterConv(nn.Module):
    """The conv output is changed in place before the BN sees it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()
        return self.bn(y)


class MutatedThroughView(nn.Module):
    """The conv output is changed through a view: only the version counter shows it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y[:, :2].mul_(3.0)
        return self.bn(y)


class FunctionalConv(nn.Module):
    """A conv written with F.conv2d on the module's own parameters."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight, self.bias, padding=1))


class DictInOut(nn.Module):
    """Dict input, tuple-with-dict output, ModuleList and ModuleDict containers."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)])
        self.norms = nn.ModuleDict({"a": nn.BatchNorm2d(8), "b": nn.BatchNorm2d(8)})
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        x = self.norms["a"](self.convs[0](batch["image"]))
        feat = self.norms["b"](self.convs[1](torch.relu(x)))
        return self.head(feat.mean((2, 3))), {"feat": feat}


class DataDependent(nn.Module):
    """Data-dependent control flow: symbolic tracing fails, the runtime walk works."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y * 2
        return y


def no_bn_net() -> nn.Module:
    """Factory: a conv net without any BatchNorm (``tests.models:no_bn_net``)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


def simple_mlp() -> nn.Module:
    """Factory (``tests.models:simple_mlp``): another architecture than ``simple_cnn``."""
    return SimpleMLP()


class KeywordTutorial(nn.Module):
    """Written as tutorials and PyTorch's own tests write it: each BN called by keyword,
    ``bn(input=x)``, Dropout, and a flatten by ``.view`` right after the norm's activation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.relu(self.bn(input=self.conv(x)))
        x = self.drop(x)
        x = x.view(x.size(0), -1)
        return self.bn1d(input=self.fc(x))


def keyword_tutorial() -> nn.Module:
    """Factory (``tests.models:keyword_tutorial``; inputs 3 x 4 x 4)."""
    return KeywordTutorial()


class Shift:
    """A forward hook the model's own code registers: it adds 0.25 to what its module returns
    (so dropping it changes the function) and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return output + 0.25


class HookedInInit(nn.Module):
    """Conv -> BN -> ReLU -> Linear, whose ``__init__`` registers a hook on its BN (inputs
    3 x 4 x 4): a rebuilt checkpoint must fire it on whatever replaced the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 2)
        self.shift = Shift()
        self.bn.register_forward_hook(self.shift)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def hooked_in_init() -> nn.Module:
    """Factory (``tests.models:hooked_in_init``)."""
    return HookedInInit()
