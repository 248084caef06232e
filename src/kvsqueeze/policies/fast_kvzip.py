"""Fast KVzip — "Fast KVzip: Efficient and Accurate LLM Inference with Gated KV Eviction" (Kim, Han, Yun;
arXiv 2601.17668).

KVzip's reconstruction pass is accurate but costs a second pass over the context. Fast KVzip learns, per layer,
a tiny *gate* that predicts KVzip's score of a token from the hidden state entering the attention layer (the
normalised input of ``q_proj``/``k_proj``), so scoring costs almost nothing and runs during chunked prefill and
decoding alike. Only the gates learn; the LLM stays frozen and only runs forward passes (to produce the hidden
states and the KVzip targets).

Gate (the paper's *low-rank sink attention*, :class:`SinkGate`): from the hidden state ``h`` of a token, a
low-rank query per query head of the KV group ``q = RMSNorm(W_q h + b_q)`` and a key per KV head
``k = RMSNorm(W_k h)`` (``dim`` = 16); ``S`` = 16 learned *sink keys* per KV head. The token's score is the
softmax weight of its own key among ``{k} ∪ sinks`` under its own query, with a learned per-(head, group) bias on
the self logit — i.e. ``sigmoid(q.k/√dim + b − logsumexp_s(q.sink_s/√dim))`` — averaged over the group. Scores
lie in (0, 1) like KVzip's max attention.

Training (:func:`train_gates`): binary cross-entropy between the gate's score and the KVzip score (a soft target),
averaged over tokens, summed over heads and layers; SGD with momentum 0.9, learning rate 0.2 with the reference
code's step schedule (1 % warm-up, ×0.5 after half the steps, ×0.25 after three quarters), batches of 1000 tokens,
every 100th token held out.

Use (:class:`FastKVzip`), as in the paper and its reference code:

- *Prefill.* A context of up to ``chunk`` (16k) tokens is one forward: the first ``sinks`` tokens and a recent window
  of ``window_ratio`` (2 %) of the context are kept, the rest is ranked jointly over all layers and heads (as KVzip).
  A longer context is prefilled by ``cache.prefill`` in chunks of ``chunk`` tokens (one forward each, positions
  continuing): the gates score each chunk's tokens as they pass, and after the chunk the tokens that left the recent
  window (``window``, 4096) are evicted, ranked jointly over layers and heads, keeping the fraction
  ``(kept × n − window) / (n − window)`` of them (``kept = 1 − ratio``; the window shrinks to ``kept × n`` when it
  would exceed it), so the whole context keeps the ratio and the cache never holds more than what it kept, the window
  and one chunk. At the last chunk the window is kept whole.
- *Decoding.* The hidden states entering each layer are buffered and gated every ``buffer`` (128) tokens (a forward
  of several tokens, e.g. a question, is gated at once); once a layer's uncompressed tail holds
  ``decode_window + buffer`` tokens (128 + 128), all but the newest ``decode_window`` are judged: the cache's ratio of
  them is evicted, ranked jointly over layers and heads. Between two evictions a decode step never synchronises with
  the device. The buffered hidden states and the tail's gate scores live in the layer's state and count in the
  cache's bytes (up to ``buffer`` hidden states per layer: on SmolLM2 about 3 % of a full cache at 2.3k tokens).
  Forks of a cache (``cache.fork()``, the pipeline's answers) gather their own hidden states.

Wiring: a cache built with ``fast_kvzip`` puts a forward pre-hook on each full-attention module of the model (kept
as long as the cache lives, inert for any cache but it and its forks) that runs the gate on the hidden states
entering the layer. The prefill schedule's whole-context path does the rest (:meth:`FastKVzip.span` says how many
of a layer's oldest tail tokens are due; every layer is parked until the last one has attended, then compressed
through :func:`kvsqueeze.core.compressor.compress_oldest`); the kept tokens are stored ragged, one dense block per
layer (a new one merged into it).

Deviations: the training text is the offline essay collection (the paper: FineWeb-Edu), a few thousand tokens,
so a run takes minutes on a CPU; KVzip targets come from :func:`kvzip_scores_reference`;
:func:`calibrate_fast_kvzip` defaults to 2000 steps of 256 tokens (the reference code: 5000 steps of 1000, about
25 minutes per 1000 steps on this CPU). Decoding: the reference code's decoding experiments hold a fixed token
budget, re-ranking every held token (prompt included) each time; here the ratio applies to each generated token once,
when it leaves the ``decode_window`` (the prefill's kept tokens are not judged again), and with a token budget
instead of a ratio generated tokens stay. Only ``model.generate`` prefills a long prompt in one forward (chunking is
``cache.prefill``'s, hence the pipeline's); the chunked prefill and the decoding-time eviction need the dense codec
and full-attention layers (a chunked prefill refuses others; with another codec generated tokens are encoded as they
come and stay); the benchmark's batched decoding (one forward for many caches) does not run the hooks of each row,
so its rows keep their generated tokens. The first ``sinks`` tokens are protected (the reference code protects the
system prompt). Sliding-window layers keep their newest tokens at the uniform budget (as in
:mod:`kvsqueeze.policies.kvzip`). In the benchmark's captured build (no forward through the cache) the gate scores
come from one extra forward of the context per sample.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr
from torch import nn

from kvsqueeze.calibration.store import model_key
from kvsqueeze.core.compat import passed_cache, with_cache
from kvsqueeze.core.context import PREFILLING, SCRATCH, LayerContext
from kvsqueeze.core.storage import owned
from kvsqueeze.data import essays
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import cache_dir, load_model
from kvsqueeze.policies.base import PREFILL_MEMO, PROTECTED, ContextHost, Scorer
from kvsqueeze.policies.kvzip import (
    RepeatPrompt,
    attention_modules,
    compressed_layers,
    global_counts,
    kvzip_scores_reference,
    repeat_prompt,
)
from kvsqueeze.progress import NO_PROGRESS, Steps
from kvsqueeze.spec import register

FAST_KVZIP_SCORES = "fast_kvzip_scores"  # ctx.shared key: {layer_idx: [B, H, L] gate scores of every layer}
GATE_SCORES = "fast_kvzip_gathered"  # scratch key: gate scores the hooks gathered during the current forward
SPANS = "fast_kvzip_spans"  # scratch key: {layer_idx: SpanPlan} of the layers compressing their oldest tail tokens
TAIL_SCORES = "fast_kvzip_tail_scores"  # layer.state: gate scores [B, H, n] of the oldest n uncompressed tail tokens
TAIL_HIDDEN = "fast_kvzip_tail_hidden"  # layer.state: hidden states [B, m, hidden] of the newest m, not yet scored


# ---- the gate ----------------------------------------------------------------------------------------------
class SinkGate(nn.Module):
    """Low-rank sink-attention gate of one layer: hidden states ``[B, L, hidden]`` → scores ``[B, H, L]`` in (0, 1)."""

    def __init__(self, hidden: int, kv_heads: int, groups: int, dim: int = 16, sinks: int = 16):
        super().__init__()
        self.kv_heads, self.groups, self.dim = kv_heads, groups, dim
        self.q_proj = nn.Linear(hidden, kv_heads * groups * dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.q_norm = nn.RMSNorm(dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim, eps=1e-6)
        self.sink_keys = nn.Parameter(torch.zeros(kv_heads, sinks, dim))
        self.bias = nn.Parameter(torch.zeros(kv_heads, groups))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Self logit minus the log-sum-exp of the sink logits: ``[B, L, H, G]`` (the score is its sigmoid)."""
        B, L, _ = hidden.shape
        h = hidden.to(self.q_proj.weight.dtype)
        q = self.q_norm(self.q_proj(h).view(B, L, self.kv_heads, self.groups, self.dim))
        k = self.k_norm(self.k_proj(h).view(B, L, self.kv_heads, 1, self.dim))
        scale = 1.0 / math.sqrt(self.dim)
        own = (q * k).sum(-1) * scale + self.bias  # [B, L, H, G]
        sink = torch.einsum("blhgd,hsd->blhgs", q, self.sink_keys) * scale
        return own - torch.logsumexp(sink, dim=-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden)).mean(-1).transpose(1, 2)  # [B, H, L]


class Gates(nn.Module):
    """One :class:`SinkGate` per compressed layer of a model."""

    def __init__(self, layers: list[int], hidden: int, kv_heads: int, groups: int, dim: int = 16, sinks: int = 16):
        super().__init__()
        self.layers = list(layers)
        self.shape = {"hidden": hidden, "kv_heads": kv_heads, "groups": groups, "dim": dim, "sinks": sinks}
        self.gates = nn.ModuleDict({str(i): SinkGate(hidden, kv_heads, groups, dim, sinks) for i in self.layers})

    @classmethod
    def for_model(cls, config, dim: int = 16, sinks: int = 16) -> Gates:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        groups = text.num_attention_heads // text.num_key_value_heads
        return cls(compressed_layers(text), text.hidden_size, text.num_key_value_heads, groups, dim, sinks)

    def __getitem__(self, layer: int) -> SinkGate:
        return self.gates[str(layer)]

    @torch.no_grad()
    def scores(self, hidden: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{layer: [B, H, L]}`` from the hidden states entering each layer's attention ``{layer: [B, L, hidden]}``."""
        return {i: self[i](h).float() for i, h in hidden.items()}


# ---- data from the frozen model ----------------------------------------------------------------------------
@torch.no_grad()
def capture_hidden(model, input_ids: torch.Tensor, cache=None) -> dict[int, torch.Tensor]:
    """Hidden states entering each compressed layer's attention ``{layer: [B, L, hidden]}`` from one forward
    (pre-hooks on the attention modules, removed afterwards); ``cache`` (e.g. a ``DynamicCache``) is filled."""
    layers = set(compressed_layers(model.config))
    found: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs):
        idx = int(module.layer_idx)
        if idx in layers:
            found[idx] = (args[0] if args else kwargs["hidden_states"]).detach()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model).values()]
    try:
        model(input_ids=input_ids, **with_cache(model, cache), use_cache=cache is not None, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return found


@dataclass
class GateData:
    """Training pairs: hidden states ``{layer: [N, hidden]}`` and KVzip targets ``{layer: [H, N]}`` (N tokens)."""

    hidden: dict[int, torch.Tensor]
    targets: dict[int, torch.Tensor]

    @property
    def tokens(self) -> int:
        return next(iter(self.targets.values())).shape[-1]


@torch.no_grad()
def gate_data(
    model, contexts: list[torch.Tensor], prompt: RepeatPrompt, start: int = 0, chunk: int = 2000,
    progress: Steps = NO_PROGRESS,
) -> GateData:  # fmt: skip
    """Hidden states and KVzip targets of the tokens ``[start:]`` of each context ``[1, L]`` (forward passes only)."""
    from transformers import DynamicCache

    hidden: dict[int, list[torch.Tensor]] = {}
    targets: dict[int, list[torch.Tensor]] = {}
    for ids in contexts:
        cache = DynamicCache()
        states = capture_hidden(model, ids, cache)
        scores = kvzip_scores_reference(model, ids, chunk, prompt=prompt, start=start, cache=cache)
        for i, s in scores.items():
            hidden.setdefault(i, []).append(states[i][0, start:].float().cpu())
            targets.setdefault(i, []).append(s[0, :, start:].float().cpu())
        progress.advance()
    return GateData({i: torch.cat(h) for i, h in hidden.items()}, {i: torch.cat(t, -1) for i, t in targets.items()})


# ---- training ----------------------------------------------------------------------------------------------
def step_schedule(step: int, steps: int) -> float:
    """The reference code's learning-rate multiplier: warm-up over 1 % of the steps, then 1, 0.5, 0.25."""
    if step < 0.01 * steps:
        return (step + 1) / max(0.01 * steps, 1.0)
    if step < 0.5 * steps:
        return 1.0
    return 0.5 if step < 0.75 * steps else 0.25


def gate_loss(gates: Gates, hidden: dict[int, torch.Tensor], targets: dict[int, torch.Tensor]) -> torch.Tensor:
    """Binary cross-entropy of gate scores vs KVzip targets: mean over tokens, summed over heads and layers."""
    total = torch.zeros(())
    for i in gates.layers:
        logits = gates[i].logits(hidden[i][None])  # [1, N, H, G]
        pred = torch.sigmoid(logits).mean(-1)[0].T.clamp(1e-7, 1 - 1e-7)  # [H, N]
        total = total + F.binary_cross_entropy(pred, targets[i].to(pred.dtype), reduction="none").mean(-1).sum()
    return total


def train_gates(
    gates: Gates,
    data: GateData,
    steps: int = 1000,
    batch: int = 1000,
    lr: float = 0.2,
    momentum: float = 0.9,
    seed: int = 0,
    progress: Steps = NO_PROGRESS,
) -> list[float]:
    """Fit ``gates`` to ``data`` (only the gates learn); returns the training loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(gates.parameters(), lr=lr, momentum=momentum)
    n = data.tokens
    batch = min(batch, n)
    losses = []
    at, epoch = n, None
    gates.train()
    for step in range(steps):
        if at + batch > n:  # a new epoch: shuffle once, then take contiguous slices (views)
            order = torch.randperm(n, generator=gen)
            epoch = ({i: h[order] for i, h in data.hidden.items()}, {i: t[:, order] for i, t in data.targets.items()})
            at = 0
        hidden = {i: h[at : at + batch] for i, h in epoch[0].items()}
        targets = {i: t[:, at : at + batch] for i, t in epoch[1].items()}
        at += batch
        for group in optimizer.param_groups:
            group["lr"] = lr * step_schedule(step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss = gate_loss(gates, hidden, targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        progress.advance()
    gates.eval()
    return losses


def split_every(data: GateData, every: int = 100) -> tuple[GateData, GateData]:
    """The reference code's split: every ``every``-th token held out."""
    test = (torch.arange(data.tokens) + 1) % every == 0
    part = lambda keep: GateData(  # noqa: E731
        {i: h[keep] for i, h in data.hidden.items()}, {i: t[:, keep] for i, t in data.targets.items()}
    )
    return part(~test), part(test)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last axis (ranks by stable sort; ties get distinct ranks)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        r = torch.empty_like(x, dtype=torch.float64)
        order = torch.argsort(x, dim=-1, stable=True)
        r.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
        return r - r.mean(-1, keepdim=True)

    ra, rb = ranks(a), ranks(b)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp(min=1e-30)


@torch.no_grad()
def rank_correlation(gates: Gates, data: GateData) -> float:
    """Mean Spearman correlation between gate scores and KVzip targets over layers and heads."""
    values = [spearman(gates[i](data.hidden[i][None])[0], data.targets[i]) for i in gates.layers]
    return float(torch.cat(values).mean())


# ---- saving and loading ------------------------------------------------------------------------------------
def gates_file(config, tag: str = "") -> Path:
    """Where the gates of the model with ``config`` are cached (``tag`` distinguishes training settings)."""

    name = "fast_kvzip" + (f"-{tag}" if tag else "")
    return cache_dir() / "calibration" / model_key(SimpleNamespace(config=config)) / f"{name}.safetensors"


def save_gates(gates: Gates, path: Path, **meta) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"layers": json.dumps(gates.layers), "shape": json.dumps(gates.shape), "meta": json.dumps(meta)}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in gates.state_dict().items()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_gates(path: Path) -> tuple[Gates, dict]:
    """``(gates, training metadata)`` from a file written by :func:`save_gates`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise KVSqueezeError(
            f"no fast_kvzip gates at {path}; run kvsqueeze.policies.fast_kvzip.calibrate_fast_kvzip(MODEL) "
            "or pass gates=PATH.safetensors"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        gates = Gates(json.loads(header["layers"]), **json.loads(header["shape"]))
        gates.load_state_dict(load_file(str(path)))
        meta = json.loads(header.get("meta", "{}"))
    except (SafetensorError, KeyError, ValueError, RuntimeError, OSError):
        raise KVSqueezeError(f"{path} is not a fast_kvzip gate file; retrain it") from None
    return gates.eval(), meta


def calibrate_fast_kvzip(
    model: str | None = None,
    out: Path | None = None,
    texts: int = 6,
    tokens: int = 1024,
    held_out: int = 2,
    steps: int = 2000,
    batch: int = 256,
    seed: int = 0,
    progress: Steps = NO_PROGRESS,
) -> Path:
    """Train Fast KVzip gates for ``model`` (None = embedded SmolLM2) on ``texts`` essay contexts of ``tokens``
    tokens (KVzip targets from the frozen model), report the rank correlation with KVzip on ``held_out`` other
    essays, and save the gates (cached per model)."""

    torch.manual_seed(seed)
    net, tokenizer = load_model(model)
    prompt = repeat_prompt(tokenizer)
    pool = essays()

    def context(i: int) -> torch.Tensor:
        return tokenizer(pool[i], add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens].to(net.device)

    began = time.perf_counter()
    progress.start("KVzip targets", texts + held_out)
    train = gate_data(net, [context(len(pool) - 1 - i) for i in range(texts)], prompt, progress=progress)  # the end
    test = gate_data(net, [context(i) for i in range(held_out)], prompt, progress=progress)  # where benchmarks start
    data_seconds = time.perf_counter() - began
    gates = Gates.for_model(net.config)
    before = rank_correlation(gates, test)
    began = time.perf_counter()
    progress.start("training gates", steps)
    losses = train_gates(gates, train, steps=steps, batch=batch, seed=seed, progress=progress)
    train_seconds = time.perf_counter() - began
    meta = {
        "model": model or "embedded",
        "texts": texts,
        "tokens": tokens,
        "steps": steps,
        "batch": batch,
        "train_tokens": train.tokens,
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "heldout_spearman_init": before,
        "heldout_spearman": rank_correlation(gates, test),
    }
    return save_gates(gates, Path(out) if out is not None else gates_file(net.config.get_text_config()), **meta)


# ---- the scorer --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpanPlan:
    """The compression of a layer's oldest ``tokens`` uncompressed tail tokens: ``fraction`` of them kept beyond the
    protected ones — the first ``sinks`` (the context's first chunk) and the newest ``protect`` (the prefill's recent
    window, at its last chunk)."""

    tokens: int
    fraction: float
    sinks: int = 0
    protect: int = 0

    def keep(self, valid: torch.Tensor) -> torch.Tensor:
        """Tokens kept per head of each row ``[B]`` (on average over the layers' heads when ranked jointly)."""
        n = valid.sum(-1)
        protect = torch.clamp(n, max=self.protect)
        keep = torch.ceil((n - protect).double() * self.fraction - 1e-9).long() + protect
        return torch.minimum(torch.maximum(keep, torch.clamp(n, max=self.sinks + self.protect)), n)


@register
class FastKVzip(Scorer):
    name = "fast_kvzip"
    family = "eviction"
    paper = "Fast KVzip: Efficient and Accurate LLM Inference with Gated KV Eviction"
    arxiv = "2601.17668"
    gates: str = ""  # gate file ('' = this model's cached gates)
    sinks: int = Field(4, ge=0)
    window: int = Field(4096, ge=0)  # recent tokens kept (long contexts)
    window_ratio: float = Field(0.02, ge=0.0, le=1.0)  # recent window for contexts shorter than `chunk`
    chunk: int = Field(16000, ge=1)  # prefill chunk: cache.prefill feeds longer contexts in chunks of this many
    buffer: int = Field(128, ge=1)  # decoding: hidden states gated and new tokens judged every `buffer` tokens
    decode_window: int = Field(128, ge=0)  # decoding: newest tokens never judged
    allocation: Literal["global", "layer", "uniform"] = "global"
    _gates: dict = PrivateAttr(default_factory=dict)  # loaded gates by file (one load per scorer and file)

    def recent(self, length: int) -> int:
        """The protected recent window for a context of ``length`` tokens."""
        return int(self.window_ratio * length) if length < self.chunk else self.window

    def protected(self, length: int) -> int:
        return min(length, self.sinks + self.recent(length))

    @property
    def whole_context(self) -> bool:
        return True  # the paper's global budget ranks every layer's gate scores at once

    def prefill_chunk(self, length: int) -> int | None:
        return self.chunk if length > self.chunk else None

    def gate_path(self, config) -> Path:
        return Path(self.gates).expanduser() if self.gates else gates_file(config.get_text_config())

    def load(self, config, layers: set[int]) -> Gates:
        """The gates for a model with ``config``, checked against its compressed layers and KV heads."""
        gates, _ = load_gates(self.gate_path(config))
        heads = config.get_text_config().num_key_value_heads
        if not layers <= set(gates.layers) or gates.shape["kv_heads"] != heads:
            raise KVSqueezeError(
                f"fast_kvzip gates cover layers {gates.layers} with {gates.shape['kv_heads']} KV heads; this model has "
                f"layers {sorted(layers)} with {heads}: train gates for this model"
            )
        return gates

    def gates_for(self, config) -> Gates:
        """:meth:`load`, once per gate file."""
        key = str(self.gate_path(config))
        if key not in self._gates:
            self._gates[key] = self.load(config, set(compressed_layers(config)))
        return self._gates[key]

    def gate_scores(self, gates: Gates, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Gate scores ``[B, H, M]`` of hidden states ``[B, M, hidden]`` entering layer ``layer_idx``'s attention."""
        return gates[layer_idx](hidden).float()

    # ---- the hooks: gate scores of the tokens as they pass ------------------------------------------------------
    def attach(self, host: ContextHost, model) -> None:
        """Score each token as its hidden state enters a full-attention layer (a forward pre-hook per attention
        module, kept as long as the cache lives, inert for every other cache than it and its forks): the gate needs
        nothing else. A one-forward prefill hands its scores over in ``scratch``; after compression (and during a
        chunked prefill) the layer's uncompressed tail keeps them in its state: hidden states are buffered and gated
        every ``buffer`` tokens (at once for a multi-token forward)."""
        path = self.gate_path(model.config)
        if not path.is_file():
            load_gates(path)  # the one-line error naming how to train them, before any model work
        layers = set(compressed_layers(model.config))
        modules = attention_modules(model)
        ref = weakref.ref(host)
        config = model.config

        def observe(module, args, kwargs):
            owner, cache = ref(), passed_cache(kwargs)
            if owner is None or getattr(cache, "lineage", None) is not owner.lineage or cache.replaying:
                return
            if FAST_KVZIP_SCORES in cache.shared_state:
                return  # scores given
            idx = int(module.layer_idx)
            layer = cache.layers[idx]
            hidden = args[0] if args else kwargs["hidden_states"]
            gates = self.gates_for(config)
            if getattr(layer, "compressed", False) or PREFILLING in cache.shared_state:
                if not layer.is_sliding and layer.codec.is_dense:
                    self.gather(layer.state, gates, idx, hidden)
                return
            scores = self.gate_scores(gates, idx, hidden)
            cache.shared_state.setdefault(SCRATCH, {}).setdefault(GATE_SCORES, {})[idx] = scores

        for idx in sorted(layers):
            host.keep_hook(modules[idx].register_forward_pre_hook(observe, with_kwargs=True))

    def gather(self, state: dict, gates: Gates, layer_idx: int, hidden: torch.Tensor) -> None:
        """Buffer the hidden states of a layer's new tail tokens; gate the buffer once it holds ``buffer`` tokens
        or when a forward brings several tokens (no device synchronisation)."""
        hidden = hidden.detach()
        buffered = state.get(TAIL_HIDDEN)
        state[TAIL_HIDDEN] = owned(hidden) if buffered is None else torch.cat([buffered, hidden], dim=1)
        if state[TAIL_HIDDEN].shape[1] >= self.buffer or hidden.shape[1] > 1:
            self.flush(state, gates, layer_idx)

    def flush(self, state: dict, gates: Gates, layer_idx: int) -> None:
        """Gate the buffered hidden states of a layer's tail."""
        hidden = state.pop(TAIL_HIDDEN, None)
        if hidden is None:
            return
        scores = self.gate_scores(gates, layer_idx, hidden)
        done = state.get(TAIL_SCORES)
        state[TAIL_SCORES] = scores if done is None else torch.cat([done, scores], dim=-1)

    # ---- when: the whole context, each prefill chunk, every `buffer` decoded tokens -----------------------------
    def chunk_plan(self, host: ContextHost, length: int) -> tuple[int, float]:
        """The recent window of a chunked prefill of ``length`` tokens and the fraction kept of every other token,
        so that the whole context keeps the cache's ratio (the reference code's adjustment; a budget is its ratio)."""
        if host.ratio is not None:
            kept = 1.0 - host.ratio
        else:
            kept = min(host.budget, length) / length if host.budget is not None else 1.0
        window = min(self.recent(length), int(kept * length))
        fraction = (kept * length - window) / (length - window) if length > window else 1.0
        return window, min(max(fraction, 0.0), 1.0)

    def span(self, host: ContextHost, layer) -> int | None:
        """One forward of a context (not chunked): None, the whole context at once. A chunked prefill: the tokens
        that left the recent window, the window too at the last chunk (protected). Decoding: once the uncompressed
        tail holds ``decode_window + buffer`` tokens, all but the newest ``decode_window`` (at the cache's ratio).
        0 when nothing is due, or when the hooks did not see every tail token (the benchmark's batched rows)."""
        length = host.shared_state.get(PREFILLING)
        if length is None and not getattr(layer, "compressed", False):
            return None
        if layer.is_sliding or not layer.codec.is_dense:
            if length is not None:
                raise KVSqueezeError(
                    f"fast_kvzip's chunked prefill needs full-attention layers and the dense codec; give "
                    f"fast_kvzip:chunk=N with N >= the context length ({length} tokens)"
                )
            return 0
        recent, state = layer.n_recent, layer.state
        scored = state[TAIL_SCORES].shape[-1] if TAIL_SCORES in state else 0
        buffered = state[TAIL_HIDDEN].shape[1] if TAIL_HIDDEN in state else 0
        if recent == 0 or scored + buffered != recent:
            return 0
        if length is not None:
            window, fraction = self.chunk_plan(host, length)
            last = layer.seen >= length
            sinks = self.sinks if not layer.compressed else 0
            plan = SpanPlan(recent if last else recent - window, fraction, sinks, window if last else 0)
        elif host.ratio is not None and recent >= self.decode_window + self.buffer:
            plan = SpanPlan(recent - self.decode_window, 1.0 - host.ratio)
        else:
            return 0
        if plan.tokens <= 0:
            return 0
        host.shared_state.setdefault(SCRATCH, {}).setdefault(SPANS, {})[layer.layer_idx] = plan
        return plan.tokens

    def prepare(self, host: ContextHost) -> None:
        """Hand the gate scores to every layer's compression: those of the oldest tail tokens of the layers that
        compress a span, or those gathered during a one-forward prefill (the benchmark's captured prefill ran no
        forward through this cache: one forward of the context gives them, once per sample)."""
        if FAST_KVZIP_SCORES in host.shared_state:
            return
        scratch = host.shared_state.setdefault(SCRATCH, {})
        spans = scratch.get(SPANS)
        if spans:
            config = host.served_model().config
            given = {}
            for idx, plan in spans.items():
                state = host.layers[idx].state
                self.flush(state, self.gates_for(config), idx)
                scores = state.pop(TAIL_SCORES)
                given[idx] = scores[..., : plan.tokens]
                if scores.shape[-1] > plan.tokens:
                    state[TAIL_SCORES] = owned(scores[..., plan.tokens :])
            scratch[FAST_KVZIP_SCORES] = given  # dropped after the compression
            return
        scores = scratch.pop(GATE_SCORES, None)
        memo = host.shared_state.get(PREFILL_MEMO)
        if scores is None and memo is not None and host.tokens is not None:
            key = ("fast_kvzip_scores", str(self.gate_path(host.served_model().config)))
            if key not in memo:
                model = host.served_model()
                layers = set(compressed_layers(model.config))
                memo[key] = self.load(model.config, layers).scores(capture_hidden(model, host.tokens))
            scores = memo[key]
        if scores is None:
            raise KVSqueezeError(
                "fast_kvzip saw no hidden states: the model's attention modules were not called with this cache "
                "(build the cache for the model you run)"
            )
        scratch[FAST_KVZIP_SCORES] = scores  # dropped after the last layer is compressed

    # ---- what: the gate scores, sinks and the recent window protected ------------------------------------------
    def _raw(self, ctx: LayerContext) -> dict[int, torch.Tensor]:
        """Every layer's gate scores (given, or gathered by :meth:`attach`'s hooks during the forward)."""
        scores = ctx.shared.get(FAST_KVZIP_SCORES, ctx.shared.get(SCRATCH, {}).get(FAST_KVZIP_SCORES))
        if scores is None:
            raise KVSqueezeError(
                "fast_kvzip: no gate scores for this context (its prefill never ran through the cache)"
            )
        return scores

    @staticmethod
    def _plans(ctx: LayerContext) -> dict[int, SpanPlan]:
        return ctx.shared.get(SCRATCH, {}).get(SPANS, {})

    def _finish(self, raw: torch.Tensor, valid: torch.Tensor, plan: SpanPlan | None = None) -> torch.Tensor:
        n = valid.sum(-1, keepdim=True)
        rank = valid.long().cumsum(-1) - 1
        if plan is None:  # the whole context: the first `sinks` and the recent window
            sinks = self.sinks
            recent = torch.tensor([self.recent(int(x)) for x in n.flatten()], device=valid.device)[:, None]
        else:
            sinks, recent = plan.sinks, plan.protect
        keep = valid & ((rank < sinks) | (rank >= n - recent))
        score = raw.float().masked_fill(keep[:, None, :], PROTECTED)
        return score.masked_fill(~valid[:, None, :], float("-inf"))

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.sliding_window is not None:  # sliding-window layers keep their newest tokens, as in kvzip
            return self._finish((ctx.valid.long().cumsum(-1) - 1).float()[:, None, :].expand_as(ctx.keys[..., 0]),
                                ctx.valid)  # fmt: skip
        raw = self._raw(ctx)
        if ctx.layer_idx not in raw or tuple(raw[ctx.layer_idx].shape) != (*ctx.keys.shape[:2], ctx.length):
            raise KVSqueezeError(f"fast_kvzip: no gate scores matching layer {ctx.layer_idx}'s tokens")
        return self._finish(raw[ctx.layer_idx].to(ctx.keys.device), ctx.valid, self._plans(ctx).get(ctx.layer_idx))

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor | None:
        plans = self._plans(ctx)
        plan = plans.get(ctx.layer_idx)
        if plan is not None:  # a span: its own kept count (the chunked prefill's adjusted ratio)
            keep_per_head = plan.keep(ctx.valid)
            if self.allocation == "uniform":
                return keep_per_head[:, None].expand(scores.shape[:2])
        if self.allocation == "uniform" or ctx.sliding_window is not None:
            return None
        if self.allocation == "layer":
            return global_counts(scores[None], keep_per_head)[0]
        raw = self._raw(ctx)
        memo_key = ("fast_kvzip_plan", tuple(keep_per_head.tolist()))
        memo = ctx.scratch.get(memo_key)  # one compression pass: dropped after the last layer
        if memo is None or memo[0] is not raw:
            order = sorted(raw)
            stacked = torch.stack([self._finish(raw[i].to(scores.device), ctx.valid, plans.get(i)) for i in order])
            counts = global_counts(stacked, keep_per_head)
            memo = ctx.scratch[memo_key] = (raw, {i: counts[j] for j, i in enumerate(order)})
        return memo[1][ctx.layer_idx]
