"""A running-statistics probe: mean and variance of a layer's activations over many prompts."""

import torch

import nnsight


class RunningStats:
    """Per-feature mean and variance of one layer's hidden states, merged batch by batch.

    The batch moments are computed inside the trace, next to the model; only three
    small results come back per prompt, and they are merged here (Chan et al.'s
    parallel update), so the probe's state lives with the researcher.
    """

    def __init__(self, layer, width):
        self.layer = layer
        self.count = 0
        self.mean = torch.zeros(width)
        self.m2 = torch.zeros(width)

    @staticmethod
    def batch_moments(hidden):
        rows = hidden.reshape(-1, hidden.shape[-1]).detach()
        mean = rows.mean(0)
        return rows.shape[0], mean, ((rows - mean) ** 2).sum(0)

    def observe(self, model, prompt):
        with model.trace(prompt, remote="local"):
            moments = nnsight.save(self.batch_moments(model.transformer.h[self.layer].output))
        self.merge(*moments)

    def merge(self, count, mean, m2):
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta ** 2 * self.count * count / total
        self.count = total

    @property
    def variance(self):
        return self.m2 / max(self.count - 1, 1)

    def surprise(self, model, prompt):
        """Mean absolute z-score of ``prompt``'s activations against the statistics so far."""
        mean, scale = self.mean, self.variance.sqrt() + 1e-6
        with model.trace(prompt, remote="local"):
            hidden = model.transformer.h[self.layer].output[0].detach()
            score = nnsight.save(float(((hidden - mean) / scale).abs().mean()))
        return score
