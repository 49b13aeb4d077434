"""Literal copies of the seed's FixedHiddenMLP and NestMLP with eager (not lazy) Linears, so
tests can build them with known shapes; ``reduce='sum'`` is the nested example's variant."""
import torch
import torch.nn.functional as TF
from torch import nn


class SeedFixedHiddenMLP(nn.Module):
    def __init__(self, reduce=None):
        super().__init__()
        self.rand_weight = torch.rand((20, 20), requires_grad=False)
        self.linear = nn.Linear(20, 20)
        self.reduce = reduce

    def forward(self, X):
        X = self.linear(X)
        X = TF.relu(torch.mm(X, self.rand_weight) + 1)
        X = self.linear(X)
        while X.abs().sum() > 1:
            X /= 2
        return X.sum() if self.reduce == "sum" else X


class SeedNestMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.linear = nn.Linear(32, 16)

    def forward(self, X):
        return self.linear(self.net(X))
