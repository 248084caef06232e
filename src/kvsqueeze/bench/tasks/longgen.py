"""``longgen``: fidelity of a long generation under a compressed cache (issue 5's long-generation check).

Prompt: ``length`` tokens of essay text (a seeded essay, as ``fidelity``) followed by an instruction to write a
long response, in the model's chat format. The evaluator generates ``N`` tokens greedily with the full cache
(``min_new_tokens = N``: no early stop), then teacher-forces that continuation one token at a time under each
method (so decoding-time schedules recompress exactly as during generation), via
:func:`kvsqueeze.bench.evaluators.longgen.longgen`. Reported per cell: top-1 agreement with the full cache's tokens
(primary score, higher is better), mean and max ``KL(full ‖ compressed)`` in nats, tokens held per KV head at
the end, bytes held, and decode tokens/s relative to the full cache's teacher-forced run of the same sample.

``N`` is the task option: ``longgen`` (``DEFAULT_TOKENS``) or ``longgen:1000``. Default prompt length 512 tokens.
"""

from __future__ import annotations

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.text import essay_haystack
from kvsqueeze.errors import KVSqueezeError

DEFAULT_TOKENS = 256
DEFAULT_LENGTHS = (512,)
INSTRUCTION = "Write a long, detailed essay that discusses the ideas of the text above, point by point."


def parse_tokens(option: str | None) -> int:
    """The generated length ``N`` from the task option (``longgen:N``)."""
    if option is None:
        return DEFAULT_TOKENS
    if not option.isdigit() or int(option) < 2:
        raise KVSqueezeError(f"bad longgen option {option!r}; give the tokens to generate, e.g. longgen:1000")
    return int(option)


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    n_tokens = parse_tokens(option)
    out = []
    for i in range(samples):
        rng = rng_for("longgen", length, seed, i)
        essay = rng.randrange(1000)
        context = essay_haystack(tokenizer, length - 60, essay)
        q = Question(INSTRUCTION, (), "", max_new_tokens=n_tokens)
        meta = {"length": length, "depth": None, "essay": essay, "n_tokens": n_tokens}
        out.append(Sample("longgen", f"{length}/{n_tokens}/{i:04d}", "longgen", context, (q,), meta=meta))
    return out
