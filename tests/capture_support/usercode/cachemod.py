"""Module-level state shared by the functions of one module."""
CACHE = {}
LOOKUPS = 0


def put(key, value):
    CACHE[key] = value


def get(key, default=None):
    global LOOKUPS
    LOOKUPS += 1
    return CACHE.get(key, default)


def lookups():
    return LOOKUPS
