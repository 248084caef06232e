"""Does EpiCache route each convqa question to the episode whose segment states its fact? Plain and mean-centred
embeddings of the LM's middle layer, as EpiCache embeds them (segments of two messages, k-means with 4 episodes).

PYTHONPATH=src python docs/results/convqa/routing_diagnostic.py
"""

import torch

from kvsqueeze.bench.tasks import convqa
from kvsqueeze.conversation import render
from kvsqueeze.models import load_model
from kvsqueeze.policies.epicache import embed, kmeans, route
from kvsqueeze.prompts import encode

torch.set_num_threads(2)
model, tok = load_model()
hits = {False: 0, True: 0}
spread: dict[bool, list[int]] = {False: [], True: []}
n = 0
for s in convqa.generate(tok, samples=8, length=2048, seed=0):
    msgs = convqa.messages_of(s)
    per = render(tok, msgs)
    segs = [[t for m in per[i : i + 2] for t in m] for i in range(0, len(per), 2)]
    texts = [" ".join(m["content"] for m in msgs[i : i + 2]) for i in range(0, len(msgs), 2)]
    emb = embed(model, segs)
    qe = embed(model, [encode(tok, q.text) for q in s.questions])
    for center in (False, True):
        mu = emb.mean(0) if center else 0
        labels, cent = kmeans(emb - mu, 4, 0)
        routed = []
        for q, e in zip(s.questions, qe, strict=True):
            routed.append(route(e - mu, cent))
            fact_seg = next(i for i, t in enumerate(texts) if q.answers[0] in t)
            hits[center] += int(labels[fact_seg]) == routed[-1]
        spread[center].append(len(set(routed)))
    n += len(s.questions)
print("questions", n, "routed to the fact's episode: plain", hits[False], "centred", hits[True])
print("distinct episodes per sample: plain", spread[False], "centred", spread[True])
