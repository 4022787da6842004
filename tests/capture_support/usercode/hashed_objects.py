"""Objects whose iteration order depends on the hash seed, next to code and tensors:
the bundle bytes must not."""
import mymethods
import myclasses

WORDS = {f"word-{i}" for i in range(40)}


def build():
    import numpy as np
    import torch

    return {
        "words": WORDS,
        "frozen": frozenset(WORDS),
        "nested": {frozenset({"a", "b", "c"}): {"x", "y", "z"}},
        "functions": [mymethods.make_counter(3), mymethods.scale_and_shift, mymethods.cube],
        "config": myclasses.TrainConfig(),
        "color": myclasses.Color.RED,
        "class": myclasses.Rectangle,
        "tensor": torch.arange(6.0).reshape(2, 3).t(),
        "array": np.arange(5),
    }


def iteration_order():
    return list(WORDS)
