from .utils import LIMIT, clamp


class RunningMean:
    def __init__(self):
        self.count = 0
        self.mean = 0.0

    def push(self, x):
        self.count += 1
        self.mean += (clamp(x) - self.mean) / self.count
        return self.mean


def normalize(values):
    peak = max(abs(clamp(v)) for v in values) or 1
    return [clamp(v) / peak for v in values]


def limit_report():
    from .utils import clamp as clamp_lazily  # a relative import made only when called

    return f"limit {LIMIT}, clamps 99 to {clamp_lazily(99)}"
