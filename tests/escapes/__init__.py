"""The escape suite: attempts as data (attempts.py), the test-side observer
that judges them by effect (witness.py), and confined workers to run them in:
the runner's own worker (via_runner.py) and a minimal child around
``sandbox.enter`` (child.py, driven by harness.py)."""
