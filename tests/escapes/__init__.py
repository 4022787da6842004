"""The escape suite: attempts as data (attempts.py), the test-side observer
that judges them by effect (witness.py), and a confined worker to run them in
(child.py, driven by harness.py)."""
