"""EpiCache variants on convqa samples: default, longer patch (whole medoid), oracle patch (the question)."""

import sys
import time

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.tasks import convqa
from kvsqueeze.models import load_model
from kvsqueeze.policies.epicache import EpiCache
from kvsqueeze.prompts import encode

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
variant = sys.argv[1]
model, tok = load_model()
samples = convqa.generate(tok, samples=3, length=2048, seed=0)
hits = n = 0
for s in samples:
    msgs = convqa.messages_of(s)
    t0 = time.time()
    if variant == "oracle":
        for q in s.questions:
            epi = EpiCache(model, tok, ratio=0.75, episodes=1)
            epi.prefill(msgs)  # one episode: the whole conversation
            ids = encode(tok, q.text)[:64]
            epi.episodes[0] = epi.episodes[0].__class__(epi.build(ids), epi.episodes[0].centroid, 0, [], ids)
            a = epi.answer(q.text, q.answer_prefix, q.max_new_tokens)
            hit = scoring.match(a, q.answers, q.metric, q.choices)
            hits += hit
            n += 1
            print(s.id, q.answers, repr(a[:40]), hit, flush=True)
        continue
    kw = dict(patch=256, block=512) if variant == "patch256" else dict(segment=1) if variant == "seg1" else {}
    epi = EpiCache(model, tok, ratio=0.75, **kw).prefill(msgs)
    for q in s.questions:
        a = epi.answer(q.text, q.answer_prefix, q.max_new_tokens)
        hit = scoring.match(a, q.answers, q.metric, q.choices)
        hits += hit
        n += 1
        print(s.id, epi.route(q.text), q.answers, repr(a[:40]), hit, flush=True)
    print("sample seconds", time.time() - t0, flush=True)
print(variant, "hits", hits, "of", n)
