LIMIT = 10


def clamp(x, low=-LIMIT, high=LIMIT):
    return max(low, min(high, x))
