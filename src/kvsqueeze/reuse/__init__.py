"""The lifetime axis: caches computed for one request and reused by others (recombined across documents).

One paper per module: :mod:`kvsqueeze.reuse.kvlink`, :mod:`kvsqueeze.reuse.ape`, :mod:`kvsqueeze.reuse.batchllm`.
Saving, loading and the store are :mod:`kvsqueeze.core.persist` and :mod:`kvsqueeze.store`.
"""
