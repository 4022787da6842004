"""Stands in for a heavy package the researcher has but the destination does not."""


def fancy_plot(values):
    return f"plot of {len(values)} values"
