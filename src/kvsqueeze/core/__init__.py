"""The core: storage, the attention binding, the one compression pipeline, and the cache.

``context`` (what a compression step sees), ``storage`` (blocks and byte accounting), ``attention_math`` (partials
merged by log-sum-exp), ``masks`` (transformers' masks as visibility), ``layer`` (one layer's storage and attention),
``compressor`` (the pipeline), ``binding`` (attention call ↔ cache), ``architectures`` (what is accepted),
``cache`` (``CompressedCache``).
"""
