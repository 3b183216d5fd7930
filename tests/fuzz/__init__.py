"""The fuzzing harness: generators of damaged and hostile files, and an oracle that runs the real CLI on them.

Layout: ``seeds`` writes small valid files, ``mutate`` (bytes and JSON), ``onnx_cases``,
``engine_cases`` and ``viewer_cases`` turn a seed into one hostile case, ``oracle`` runs the CLI
commands of a case inside a worker and judges them, ``worker`` is that worker process, and
``runner`` spreads cases over workers with a per-case timeout. ``tests/fuzz/test_fuzz_quick.py``
is the CI run and ``scripts/fuzz.py`` the long one.
"""
