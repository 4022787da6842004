"""Imports a package the destination lacks, at top level; only some functions use it."""
import stub_heavy_pkg
from stub_heavy_pkg import fancy_plot


def mean(values):
    return sum(values) / len(values)


def plot(values):
    return fancy_plot(values) + " via " + stub_heavy_pkg.__name__
