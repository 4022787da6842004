"""sourcebox benchmarks: what source bundles cost against pickle, cloudpickle and dill.

``make bench`` (``python -m benchmarks``) measures payload sizes, dumps and loads times
(warm and cold), requests through the worker against a pickling subprocess, tensor
throughput through shared memory, and nnsight trace requests against nnsight's own. It
writes ``benchmarks/results/latest.json``, ``benchmarks/RESULTS.md`` and PNG plots;
``--quick`` is the smoke run ``make test`` uses. docs/BENCHMARKS.md explains the numbers.
"""
