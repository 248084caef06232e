"""Each standard benchmark's own per-sample metrics, by name (``Question.metric``), on a 0–1 scale.

- LongBench (Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding",
  arXiv 2308.14508; metrics of its ``eval.py``): ``qa_f1`` (SQuAD-normalized token F1), ``qa_f1_zh`` (jieba
  words), ``rouge`` / ``rouge_zh`` (ROUGE-L F of the ``rouge`` package LongBench uses), ``classification``
  (share of the classes named in the output that is the gold class), ``retrieval`` / ``retrieval_zh`` and
  ``count`` (share of the numbers in the output equal to the gold one), ``code_sim`` (fuzzy ratio of the first
  line that is not a comment or code fence). The score is the maximum over the gold answers; for trec, triviaqa,
  samsum and lsht only the output's first line is scored (as LongBench does).
- InfiniteBench (Zhang et al., "∞Bench: Extending Long Context Evaluation Beyond 100K Tokens", arXiv 2402.13718;
  metrics of its ``compute_scores.py``), one per task: exact first-integer match (``passkey``, ``number_string``),
  word match (``kv_retrieval``, ``longdialogue_qa_eng``), last-word integer (``code_run``), option letter or
  function name (``code_debug``), option letter (``longbook_choice_eng``), first number (``math_find``), leading
  correct values (``math_calc``), token F1 (``longbook_qa_eng``), character F1 (``longbook_qa_chn``),
  ROUGE-Lsum (``longbook_sum_eng``, the ``rouge-score`` package its ``evaluate`` metric wraps).
- RULER (Hsieh et al., arXiv 2404.06654) as kvpress scores it: ``string_match_all`` for niah/vt/cwe/fwe tasks,
  ``string_match_part`` for qa tasks (``kvsqueeze.bench.scoring``).

Deviations: LongBench's ``classification`` has an unreachable similarity fallback (its test ``list != 0`` is always
true), so an output naming no class scores 0 here as there. In InfiniteBench's choice fallback "first word that
is one of A–D" a word must equal a letter (upstream's substring test also accepted "AB"). Empty outputs score 0
(upstream indexes ``pred[0]``). Chinese metrics need ``jieba``; ROUGE needs ``rouge`` / ``rouge-score``; code
similarity ``rapidfuzz`` (``fuzz.ratio``, rounded to an integer percentage as ``fuzzywuzzy`` does) — all in the
``bench`` extra.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from kvsqueeze.extras import require

_ZH_PUNCT = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠"
    "｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = set(string.punctuation)
_ALL_PUNCT = _EN_PUNCT | set(_ZH_PUNCT)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---- shared pieces -------------------------------------------------------------------------------------------
def normalize_en(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh(text: str) -> str:
    """Lower case, no English or Chinese punctuation, no whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCT and not ch.isspace())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    overlap = sum((Counter(prediction) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def _jieba_words(text: str) -> list[str]:
    require("Chinese metrics", "jieba")
    import jieba

    return list(jieba.cut(text, cut_all=False))


def _rouge_l(prediction: str, reference: str) -> float:
    require("ROUGE-L", "rouge")
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):  # empty hypothesis or reference
        return 0.0


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _share_equal(prediction: str, gold: str) -> float:
    found = _numbers(prediction)
    return sum(n == gold for n in found) / len(found) if found else 0.0


# ---- LongBench -----------------------------------------------------------------------------------------------
def lb_qa_f1(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    return token_f1(normalize_en(prediction).split(), normalize_en(gold).split())


def lb_qa_f1_zh(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    pred = [w for w in (normalize_zh(t) for t in _jieba_words(prediction)) if w]
    ref = [w for w in (normalize_zh(t) for t in _jieba_words(gold)) if w]
    return token_f1(pred, ref)


def lb_rouge(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    return _rouge_l(prediction, gold)


def lb_rouge_zh(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    return _rouge_l(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(gold)))


def lb_classification(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    named = [c for c in classes if c in prediction]
    named = [c for c in named if not (c in gold and c != gold)]  # a class inside the gold name is not a miss
    return 1.0 / len(named) if gold in named else 0.0


def lb_retrieval(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    found = re.findall(r"Paragraph (\d+)", gold)
    return _share_equal(prediction, found[0]) if found else 0.0


def lb_retrieval_zh(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    found = re.findall(r"段落(\d+)", gold)
    return _share_equal(prediction, found[0]) if found else 0.0


def lb_count(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    return _share_equal(prediction, str(gold))


def lb_code_sim(prediction: str, gold: str, classes: tuple[str, ...] = ()) -> float:
    require("code similarity", "rapidfuzz")
    from rapidfuzz import fuzz

    line = next((ln for ln in prediction.lstrip("\n").split("\n") if not any(m in ln for m in ("`", "#", "//"))), "")
    return round(fuzz.ratio(line, gold)) / 100


LONGBENCH_METRICS: dict[str, Callable[[str, str, tuple[str, ...]], float]] = {
    "qa_f1": lb_qa_f1,
    "qa_f1_zh": lb_qa_f1_zh,
    "rouge": lb_rouge,
    "rouge_zh": lb_rouge_zh,
    "classification": lb_classification,
    "retrieval": lb_retrieval,
    "retrieval_zh": lb_retrieval_zh,
    "count": lb_count,
    "code_sim": lb_code_sim,
}
LONGBENCH_FIRST_LINE = ("trec", "triviaqa", "samsum", "lsht")


def longbench_score(metric: str, prediction: str, answers: tuple[str, ...], classes: tuple[str, ...] = ()) -> float:
    """``metric`` is ``METRIC`` or ``METRIC/first-line``; the best score over the gold answers."""
    name, _, mode = metric.partition("/")
    if mode == "first-line":
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = LONGBENCH_METRICS[name]
    return max((fn(prediction, gold, classes) for gold in answers), default=0.0)


# ---- InfiniteBench -------------------------------------------------------------------------------------------
def _first_int(text: str) -> str:
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def _words(text: str, chars: str) -> list[str]:
    for c in chars:
        text = text.replace(c, " ")
    return text.split()


_RETRIEVAL_CHARS = "\n:\"'.,?!{}"


def _as_number(value: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        return float(value)


def ib_passkey(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    return float(_first_int(prediction) == answers[0])


def ib_kv_retrieval(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    return float(answers[0] in _words(prediction, _RETRIEVAL_CHARS))


def ib_code_run(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    words = _words(prediction.strip(), "\n.`'\":")
    try:
        return float(bool(words) and int(words[-1]) == _as_number(answers[0]))
    except ValueError:
        return 0.0


def _after_prefix(text: str, prefixes: tuple[str, ...]) -> str | None:
    """The text after the first of ``prefixes`` found (in the order given), '' if it ends there; None if none."""
    for prefix in prefixes:
        at = text.find(prefix)
        if at >= 0:
            return text[at + len(prefix) + 1 :]
    return None


def _letter(answers: tuple[str, ...], options: tuple[str, ...]) -> str:
    return "ABCD"[options.index(answers[0])] if answers[0] in options[:4] else answers[0][:1]


def ib_code_debug(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    letter, name = _letter(answers, options), answers[0]
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    text = prediction.strip()
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        text = text.replace(c, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    rest = _after_prefix(text, ("answer is:", "is:", "answer:"))
    return float(rest is not None and (rest.startswith(letter) or rest.startswith(name)))


def ib_math_find(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return 0.0
    gold = _as_number(answers[0])
    value = int(float(found.group(0))) if isinstance(gold, int) else float(found.group(0))
    return float(value == gold)


def ib_math_calc(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    gold = [int(v) for v in re.findall(r"-?\d+", " ".join(answers))]
    got = [int(v) for v in _numbers(prediction)]
    correct = 0
    for g, p in zip(gold, got, strict=False):
        if g != p:
            break
        correct += 1
    return correct / len(gold) if gold else 0.0


def ib_longdialogue(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    return float(answers[0] in [w.upper() for w in _words(prediction, _RETRIEVAL_CHARS)])


def ib_choice(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    label = (answers[0], _letter(answers, options))
    if not prediction:
        return 0.0
    if prediction[0] in "ABCD":
        return float(prediction[0] in label)
    text = prediction
    for c in "\n\"'.,?!{}":
        text = text.replace(c, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    rest = _after_prefix(text, ("answer is:", "answer:", "answer is", "option is"))
    if rest is not None:
        return float(any(rest.startswith(s) for s in label))
    word = next((w for w in text.split() if w in ("A", "B", "C", "D")), None)
    return float(word is not None and word in label)


def ib_qa_eng(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    return max((lb_qa_f1(prediction, gold) for gold in answers), default=0.0)


def ib_qa_chn(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    return max((token_f1(list(normalize_zh(prediction)), list(normalize_zh(g))) for g in answers), default=0.0)


def ib_sum(prediction: str, answers: tuple[str, ...], options: tuple[str, ...]) -> float:
    require("ROUGE-Lsum", "rouge_score")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"])
    return max((scorer.score(gold, prediction)["rougeLsum"].fmeasure for gold in answers), default=0.0)


INFINITEBENCH_METRICS: dict[str, Callable[[str, tuple[str, ...], tuple[str, ...]], float]] = {
    "passkey": ib_passkey,
    "number_string": ib_passkey,
    "kv_retrieval": ib_kv_retrieval,
    "code_run": ib_code_run,
    "code_debug": ib_code_debug,
    "math_find": ib_math_find,
    "math_calc": ib_math_calc,
    "longdialogue_qa_eng": ib_longdialogue,
    "longbook_choice_eng": ib_choice,
    "longbook_qa_eng": ib_qa_eng,
    "longbook_qa_chn": ib_qa_chn,
    "longbook_sum_eng": ib_sum,
}


def score(metric: str, prediction: str, answers: tuple[str, ...], choices: tuple[str, ...] = ()) -> float:
    """Score by a benchmark metric name: ``longbench:METRIC[/first-line]`` or ``infinitebench:TASK``."""
    family, _, name = metric.partition(":")
    if family == "longbench":
        return longbench_score(name, prediction, answers, choices)
    if family == "infinitebench":
        return INFINITEBENCH_METRICS[name](prediction, answers, choices)
    raise KeyError(f"unknown metric {metric!r}")


def is_benchmark_metric(metric: str) -> bool:
    return metric.partition(":")[0] in ("longbench", "infinitebench")
