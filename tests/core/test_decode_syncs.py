"""Decoding over compressed storage never synchronises with the device: no ``.item()``, ``.cpu()``, ``.tolist()``,
``bool()``/``int()``/``float()`` of a tensor or size-less ``nonzero`` in kvsqueeze's code during decode steps.

On the CPU nothing really synchronises, so the calls are counted: a ``TorchFunctionMode`` records every such call
made from a kvsqueeze source file. Host metadata is exempt: ``KVBlock.lengths`` (int64) and ChannelQ's group sizes
(int16) live on the CPU by design and what derives from them is host arithmetic, so CPU int64/int16 tensors are not
counted (device data — activations, codes, scales, masks, positions — is float, uint8, bool or int32)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import kvsqueeze
from kvsqueeze import CompressedCache
from kvsqueeze.calibration.kvquant import fit_kvquant
from kvsqueeze.core.compat import with_cache
from kvsqueeze.policies.fast_kvzip import Gates, save_gates
from tests.conftest import tiny_model

SRC = str(Path(kvsqueeze.__file__).parent)
T = torch.Tensor
SYNCS = {
    T.item: "item", T.tolist: "tolist", T.cpu: "cpu", T.__bool__: "bool", T.__int__: "int", T.__float__: "float",
    T.__index__: "index", T.nonzero: "nonzero", torch.nonzero: "nonzero", T.numpy: "numpy",
}  # fmt: skip


def host_metadata(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in (torch.long, torch.int16)


class SyncCounter(TorchFunctionMode):
    """Records (name, kvsqueeze file:line) of every device-synchronising call made from kvsqueeze's code."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = SYNCS.get(func)
        if name == "nonzero" and (kwargs.get("size") is not None):
            name = None
        if self.active and name is not None and args and not host_metadata(args[0]):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(str(Path(torch.__file__).parent)):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(SRC):
                where = f"{Path(frame.f_code.co_filename).relative_to(SRC)}:{frame.f_lineno}"
                self.calls.append((name, where))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def fast_kvzip_gates(tmp_path_factory):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("fkz") / "g.safetensors"
    return str(save_gates(Gates.for_model(tiny_model("llama").config), path))


@pytest.fixture(scope="module")
def kvquant_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvquant") / "tiny.json"
    path.write_text(json.dumps(fit_kvquant(tiny_model("llama"), None, n_tokens=64)))
    return str(path)


def step(model, cache, token: torch.Tensor):
    past = cache.get_seq_length()
    mask = torch.ones(1, past + 1, dtype=torch.long)
    return model(input_ids=token, attention_mask=mask, **with_cache(model, cache), use_cache=True).logits


METHODS = [
    ("snapkv:window=8+adakv", 0.5, 0),  # ragged heads
    ("kivi:bits=2,residual=8,group=8", None, 0),  # flushes every 8 steps, inside the counted steps
    ("kvquant:bits=3,config={config}", None, 0),  # every step quantized into the block
    ("snapkv:window=8+kivi:bits=2,residual=8,group=8", 0.5, 0),
    ("snapkv:window=8+adakv+kvquant:bits=3,config={config}", 0.5, 0),  # ragged, positions not consecutive
    ("int:bits=4", None, 0),
    ("qjl", None, 0),
    ("gear", None, 0),
    ("snapkv:window=8+think:prune=0.5", 0.5, 0),
    ("snapkv:window=8+cskv:rank_k=8,rank_v=8,residual=4,group=4", 0.5, 0),
    ("snapkv:window=8+adakv+cskv:rank_k=8,rank_v=8,residual=4,group=4", 0.5, 0),
    ("h2o+interval:every=6,budget=160", None, 6),  # recompresses every 6 steps: those steps may synchronise
    ("a2ats:codebook=16,residual=8", 0.5, 0),  # retrieval: approximate scores from codes, top-K from cold
    ("actqkv:window=8,residual=8", 0.5, 0),  # retrieval: a dynamic cut-off masked, never read back
    ("icecache:group=8,residual=8", 0.5, 0),  # retrieval: decoded tokens join the cluster index every 8 steps
    ("snapkv:window=8+blockwise:block=6,budget=160", None, 6),  # EpiCache's block-wise schedule while decoding
    ("leoam:mass=0.05,chunk=8,residual=8", 0.5, 0),  # retrieval: variable chunks fetched token-exactly
    ("fast_kvzip:gates={gates},buffer=6,decode_window=4", 0.5, 6),  # gates its buffer, evicts every 6 steps
]


IDS = [m[0].split(",config")[0].split(":gates")[0].replace(":window=8", "") for m in METHODS]


@pytest.mark.parametrize(("method", "ratio", "every"), METHODS, ids=IDS)
def test_decode_steps_do_not_synchronise(method, ratio, every, kvquant_config, fast_kvzip_gates):
    model = tiny_model("llama")
    cache = CompressedCache(model, method.format(config=kvquant_config, gates=fast_kvzip_gates), ratio=ratio)
    ids = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 128, (20, 1, 1), generator=torch.Generator().manual_seed(1))
    counter = SyncCounter()
    with torch.no_grad(), counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **with_cache(model, cache), use_cache=True)
        assert all(getattr(layer, "compressed", False) for layer in cache.layers)
        assert every or all(layer.blocks for layer in cache.layers)  # decoding reads compressed blocks
        per_step = []
        for token in tokens:
            before = len(counter.calls)
            counter.active = True
            step(model, cache, token)
            counter.active = False
            per_step.append(counter.calls[before:])
    if every:  # a recompression step may read its statistics back; the steps between them may not
        recompress = {i for i, calls in enumerate(per_step) if calls}
        assert len(recompress) <= len(tokens) // every + 1, per_step
        per_step = [calls for i, calls in enumerate(per_step) if i not in recompress]
        assert len(per_step) >= len(tokens) - len(tokens) // every - 1
    found = sorted({call for calls in per_step for call in calls})
    assert not found, f"{method}: {len(found)} synchronising call sites during decode: {found}"
