"""The kvsqueeze benchmark harness: offline tasks, one captured prefill per sample, sweeps, tables and plots.

- ``tasks/``   — deterministic (seeded) sample generators, one module per task family, each documenting its task;
- ``scoring``  — string-match scores (RULER / kvpress) and continuous metrics;
- ``capture``  — run the exact prefill once, then build every method's compressed cache from the captured tensors;
- ``batch``    — decode the compressed caches of one sample's cells together, one batch row per cache;
- ``runner``   — the sweep: cells (sample × method × ratio), resume, atomic rows, executors;
- ``report``   — ``summary.csv``, ``summary.md`` and PNG plots from ``results.jsonl``;
- ``cli``      — ``kvsqueeze bench`` and ``kvsqueeze report``.
"""
