"""User code holding live resources: none of it can be rebuilt elsewhere, so capturing it
must fail early with a clear CaptureError."""
import os
import threading


class Job:
    def __init__(self, config):
        self.config = config


LOG = open(os.devnull, "w")


def log_line(message):
    LOG.write(message + "\n")


def make_guarded_counter():
    lock = threading.Lock()
    count = 0

    def increment():
        nonlocal count
        with lock:
            count += 1
        return count

    return increment
