"""Raises from shipped code: the loading side's traceback must point here."""


def check_positive(x):
    if x <= 0:
        raise ValueError(f"expected a positive number, got {x}")  # RAISE
    return x


def doubled_positive(x):
    return 2 * check_positive(x)  # CALL


class Validator:
    def validate(self, x):
        return doubled_positive(x)  # METHOD


halved_positive = lambda v: check_positive(v) / 2  # noqa: E731 LAMBDA
