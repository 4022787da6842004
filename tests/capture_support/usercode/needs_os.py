"""Functions that import modules when called: the destination's policy decides."""


def working_directory():
    import os

    return os.getcwd()


def square_root(x):
    import math

    return math.sqrt(x)
