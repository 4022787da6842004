"""The fuzz harness of issue 11: ``python -m fuzz`` (``make fuzz``).

- ``fuzz.bundles``: mutated bundles (bit flips, truncations, splices, every header field
  with every msgpack type, deep nesting, huge declared sizes, out-of-range frame and node
  references, hand-written hostile nodes) decoded in child processes with time and memory
  limits, under the default policy, ``capture.DATA_ONLY`` and a restrictive profile.
- ``fuzz.sockets``: hostile peers on a live server (bad greetings, huge prefixes,
  truncations, slow readers and writers, many idle connections), each followed by a
  well-behaved client that must be served.
- ``fuzz.soak``: the load test (``make soak``).
"""
