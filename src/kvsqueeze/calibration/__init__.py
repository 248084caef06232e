"""Offline calibrations, cached per model under the cache directory: ``store`` (calibration text, per-model cache,
atomic JSON), ``heads`` (retrieval/semantic heads and layer profiles: RazorAttention, CompressKV, PrefixKV),
``kvquant`` (nuq datatypes), ``kvtuner`` (per-layer bit pairs), ``cskv`` (low-rank bases)."""
