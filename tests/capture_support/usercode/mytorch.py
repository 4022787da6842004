"""A researcher's torch code: modules, a dataset, and a function using server functions."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Probe(nn.Module):
    """A linear probe with a learned scale and a running-mean buffer."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.scale = nn.Parameter(torch.ones(d_out))
        self.register_buffer("running_mean", torch.zeros(d_out))

    def forward(self, x):
        return F.relu(self.proj(x)) * self.scale + self.running_mean


class TiedLM(nn.Module):
    """One submodule reachable under two names, and an unembedding tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.alias = self.body
        self.unembed = nn.Linear(4, 10, bias=False)
        self.unembed.weight = self.embed.weight

    def forward(self, ids):
        return self.unembed(self.body(self.embed(ids)))


class WindowDataset(Dataset):
    def __init__(self, series, width):
        self.series = series
        self.width = width

    def __len__(self):
        return len(self.series) - self.width + 1

    def __getitem__(self, index):
        return self.series[index:index + self.width]


def leaky(x, slope=0.1):
    return F.relu(x) - slope * F.relu(-x)
