"""Routing of convqa[:topical] questions by the lexical embedder: is each routed to the episode holding the segment
that states its fact? PYTHONPATH=src python docs/results/convqa/routing_topical.py topical
"""

import sys

import torch

from kvsqueeze.bench.tasks import convqa
from kvsqueeze.conversation import render
from kvsqueeze.models import load_model
from kvsqueeze.policies.epicache import LexicalEmbedder, kmeans, medoids, route
from kvsqueeze.prompts import encode

torch.set_num_threads(1)
model, tok = load_model()
opt = sys.argv[1] if len(sys.argv) > 1 else None
hits = n = 0
for s in convqa.generate(tok, samples=8, length=2048, seed=0, option=opt):
    msgs = convqa.messages_of(s)
    per = render(tok, msgs)
    segs = [[t for m in per[i : i + 2] for t in m] for i in range(0, len(per), 2)]
    texts = [" ".join(m["content"] for m in msgs[i : i + 2]) for i in range(0, len(msgs), 2)]
    lex = LexicalEmbedder.fit(segs)
    emb = lex(segs)
    labels, cent = kmeans(emb, 4, 0)
    med = medoids(emb, labels, cent)
    sizes = [int((labels == e).sum()) for e in range(4)]
    row = []
    for q in s.questions:
        r = route(lex([encode(tok, q.text)])[0], cent)
        fs = next(i for i, t in enumerate(texts) if q.answers[0] in t)
        hit = int(labels[fs]) == r
        hits += hit
        n += 1
        row.append((fs, int(labels[fs]), r, hit))
    print(s.id, "sizes", sizes, "labels", labels.tolist(), "medoid segs", med.tolist())
    print("   (fact seg, its label, routed, hit)", row)
    print("   medoid text:", [texts[m][:80] for m in med.tolist()])
print("hits", hits, "of", n)
