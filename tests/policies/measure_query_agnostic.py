"""Probe KVzip / Fast KVzip / Expected Attention on SmolLM2 before the pipeline runs the reconstruction pass
(not collected by pytest: no ``test_`` prefix).

Query-agnostic word needles (``niah:single``, the samples whose values are words): the context part of the
prompt is compressed, then the question is answered from a fork. KVzip's scores come from
``kvzip_scores_reference`` and Fast KVzip's from gates run on hidden states captured with hooks; both are put in
``cache.shared_state`` where the scorers read them (what the pipeline will do). Samples the full cache gets
wrong are skipped (SmolLM2 misses many word needles), so the fraction of answers kept is relative to the full
cache. Also reports bytes held vs the full cache and the scoring time relative to one context prefill.

    .venv/bin/python -m tests.policies.measure_query_agnostic --samples 6 --length 1536 \\
        --gates /tmp/fkz/gates.safetensors
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from kvsqueeze.bench.evaluate import qa_prompt

from kvsqueeze import CompressedCache, load_model
from kvsqueeze.bench.tasks import niah
from kvsqueeze.policies.fast_kvzip import FAST_KVZIP_SCORES, capture_hidden, load_gates
from kvsqueeze.policies.kvzip import KVZIP_SCORES, chat_template_parts, kvzip_scores_reference, repeat_prompt


@torch.no_grad()
def answer(model, tokenizer, cache, context_ids, question_ids, max_new_tokens: int) -> str:
    cache.prefill(model, context_ids)
    ids = torch.cat([context_ids, question_ids], -1)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache.fork(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[-1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=6, help="samples the full cache answers")
    parser.add_argument("--pool", type=int, default=64, help="niah samples drawn (half are word needles)")
    parser.add_argument("--length", type=int, default=1536)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gates", default="")
    parser.add_argument("--methods", nargs="*", default=["kvzip", "expected_attention", "snapkv", "fast_kvzip"])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.75, 0.875])
    args = parser.parse_args()
    model, tokenizer = load_model(None, args.dtype)
    prompt = repeat_prompt(tokenizer)
    prefix_ids = tokenizer(chat_template_parts(tokenizer)[0], add_special_tokens=False).input_ids
    gates = load_gates(args.gates)[0] if args.gates else None
    pool = niah.generate(tokenizer, samples=args.pool, length=args.length, seed=0, option="single")
    samples = [s for s in pool if s.meta["values"] == "words"]
    hits: dict[tuple[str, float], list[float]] = defaultdict(list)
    held: dict[tuple[str, float], list[float]] = defaultdict(list)
    timing: dict[str, list[float]] = defaultdict(list)
    used = skipped = 0
    for sample in samples:
        if used == args.samples:
            break
        q = sample.questions[0]
        context_ids, question_ids = qa_prompt(tokenizer, sample.context, q)
        assert context_ids[0, : len(prefix_ids)].tolist() == prefix_ids
        want = q.answers[0].lower()
        full = CompressedCache(model, "none")
        start = time.perf_counter()
        text = answer(model, tokenizer, full, context_ids, question_ids, q.max_new_tokens)
        timing["prefill+answer"].append(time.perf_counter() - start)
        if want not in text.lower():
            skipped += 1
            continue
        used += 1
        start = time.perf_counter()
        model(input_ids=context_ids)
        prefill_s = time.perf_counter() - start
        timing["prefill"].append(prefill_s)
        shared = {}
        if "kvzip" in args.methods:
            start = time.perf_counter()
            shared[KVZIP_SCORES] = kvzip_scores_reference(model, context_ids, prompt=prompt, start=len(prefix_ids))
            timing["kvzip reference scoring / prefill"].append((time.perf_counter() - start) / prefill_s)
        if gates is not None and "fast_kvzip" in args.methods:
            start = time.perf_counter()
            hidden = capture_hidden(model, context_ids)
            between = time.perf_counter()
            shared[FAST_KVZIP_SCORES] = gates.scores(hidden)
            timing["fast_kvzip gates / prefill"].append((time.perf_counter() - between) / prefill_s)
            timing["(capture prefill / prefill)"].append((between - start) / prefill_s)
        for method in args.methods:
            if method == "fast_kvzip" and gates is None:
                continue
            for ratio in args.ratios:
                cache = CompressedCache(model, method, ratio=ratio)
                cache.shared_state.update(shared)
                text = answer(model, tokenizer, cache, context_ids, question_ids, q.max_new_tokens)
                hits[(method, ratio)].append(float(want in text.lower()))
                held[(method, ratio)].append(cache.nbytes() / cache.full_nbytes())
        print(sample.id, {f"{m}@{r}": v[-1] for (m, r), v in hits.items()}, flush=True)
    print(f"\n{used} word needles the full cache answers ({skipped} skipped), {args.length} tokens, {args.dtype}")
    print("| method | ratio | answers kept | bytes held / full |\n|---|---|---|---|")
    for (method, ratio), v in hits.items():
        h = held.get((method, ratio))
        share = f"{sum(h) / len(h):.3f}" if h else "1.000"
        print(f"| {method} | {ratio} | {sum(v) / len(v):.2f} | {share} |")
    for name, v in timing.items():
        print(f"{name}: {sum(v) / len(v):.2f}")


if __name__ == "__main__":
    main()
