"""``longbench:DATASET`` / ``longbench:OWNER/NAME:DATASET`` / ``longbench:PATH``: LongBench in its published Hugging
Face schema (Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding",
arXiv 2308.14508; Hub ``THUDM/LongBench``, one config per dataset, split ``test``; LongBench-E's ``*_e`` configs too).

Row fields: ``input`` (the question; may be empty), ``context``, ``answers`` (list), ``all_classes`` (list or
null), ``length``, ``dataset``, ``language``, ``_id``. A local ``.jsonl`` / ``.json`` / ``.parquet`` file in that
schema may hold several datasets: each row is scored by its own ``dataset``'s metric and reported as task
``longbench:DATASET``. Metrics and generation lengths are LongBench's (``kvsqueeze.bench.metrics``; maximum over
the gold answers). ``--context-length N`` cuts each context to N tokens by removing its middle (LongBench's
truncation rule); the default 0 keeps whole contexts. ``--samples`` takes the first N rows.

Deviations: the instructions around context and question are our own wording per task family (LongBench's
templates are per dataset); the prompt is always chat-formatted when the tokenizer has a template (LongBench uses
raw completion for trec, triviaqa, samsum, lsht, lcc and repobench-p); the context is the compressed part.
"""

from __future__ import annotations

from kvsqueeze.bench.tasks import hf
from kvsqueeze.bench.tasks.base import Question, Sample
from kvsqueeze.errors import KVSqueezeError

HUB_ID = "THUDM/LongBench"

# dataset -> (metric, max new tokens, family); metrics and lengths are LongBench's
DATASETS: dict[str, tuple[str, int, str]] = {
    "narrativeqa": ("qa_f1", 128, "qa"),
    "qasper": ("qa_f1", 128, "qa"),
    "multifieldqa_en": ("qa_f1", 64, "qa"),
    "multifieldqa_zh": ("qa_f1_zh", 64, "qa_zh"),
    "hotpotqa": ("qa_f1", 32, "qa"),
    "2wikimqa": ("qa_f1", 32, "qa"),
    "musique": ("qa_f1", 32, "qa"),
    "dureader": ("rouge_zh", 128, "qa_zh"),
    "gov_report": ("rouge", 512, "summary"),
    "qmsum": ("rouge", 512, "query_summary"),
    "multi_news": ("rouge", 512, "summary"),
    "vcsum": ("rouge_zh", 512, "summary_zh"),
    "trec": ("classification/first-line", 64, "fewshot"),
    "triviaqa": ("qa_f1/first-line", 32, "fewshot"),
    "samsum": ("rouge/first-line", 128, "fewshot"),
    "lsht": ("classification/first-line", 64, "fewshot"),
    "passage_retrieval_en": ("retrieval", 32, "retrieval"),
    "passage_count": ("count", 32, "count"),
    "passage_retrieval_zh": ("retrieval_zh", 32, "retrieval_zh"),
    "lcc": ("code_sim", 64, "code"),
    "repobench-p": ("code_sim", 64, "code"),
}

# family -> (before the context, after the context; {input} is the row's question)
PROMPTS: dict[str, tuple[str, str]] = {
    "qa": ("Read the text below; a question about it follows.", "Using the text above, answer in as few words as "
           "possible, with no explanation.\n\nQuestion: {input}\nAnswer:"),
    "qa_zh": ("请阅读下面的文字，之后回答一个问题。", "请根据上面的文字用尽量少的字回答，不要解释。\n\n问题：{input}\n回答："),  # noqa: E501
    "summary": ("Read the document below.", "Write a summary of the document above in one page."),
    "query_summary": ("Read the transcript below; a query about it follows.",
                      "Answer the query using the transcript above, in one or more sentences.\n\nQuery: {input}\n"
                      "Answer:"),
    "summary_zh": ("请阅读下面的会议记录。", "请用一段话总结上面会议记录的内容。"),
    "fewshot": ("Follow the pattern of the examples below.", "{input}"),
    "retrieval": ("Below are numbered paragraphs; an abstract of one of them follows.",
                  "Abstract: {input}\n\nWhich paragraph above is this the abstract of? Reply in the form "
                  "\"Paragraph N\".\nAnswer:"),
    "retrieval_zh": ("下面是若干编号的段落，之后是其中一段的摘要。", "摘要：{input}\n\n这是上面哪一段的摘要？请按\"段落N\"的格式回答。\n答案："),  # noqa: E501
    "count": ("Below are paragraphs, some of which may repeat.",
              "How many distinct paragraphs are there above, duplicates counted once? Reply with the number only.\n"
              "Answer:"),
    "code": ("Complete the code below.", "{input}Write the next line of code only."),
}  # fmt: skip


def parse_option(option: str | None) -> tuple[str, str | None]:
    """``(source, config)``: a local file with config None, or a Hub id with its config (dataset name)."""
    if not option:
        raise KVSqueezeError(f"give a dataset: --task longbench:NAME (one of {', '.join(DATASETS)}) or longbench:PATH")
    if hf.is_local(option):
        return option, None
    repo, _, config = option.rpartition(":") if option.count("/") == 1 and ":" in option else ("", "", option)
    repo = repo or HUB_ID
    name = config.removesuffix("_e")
    if name not in DATASETS:
        raise KVSqueezeError(f"unknown LongBench dataset {config!r}; valid: {', '.join(DATASETS)} (or a .jsonl path)")
    return repo, config


def validate(option: str | None) -> None:
    source, config = parse_option(option)
    if config is None:
        rows(source, None)
    else:
        hf.check_hub_source(source)


def rows(source: str, config: str | None) -> list[dict]:
    data = hf.read_local(source) if config is None else hf.read_hub(source, config, "test")
    where = source if config is None else f"{source} ({config})"
    for n, row in enumerate(data, start=1):
        at = f"{where}: row {n}"
        hf.field(row, "context", str, at)
        hf.field(row, "input", str, at)
        hf.string_list(row, "answers", at)
        hf.string_list(row, "all_classes", at, allow_empty=True)
        name = hf.field(row, "dataset", str, at).removesuffix("_e")
        if name not in DATASETS:
            raise KVSqueezeError(f"{at}: unknown dataset {row['dataset']!r}; valid: {', '.join(DATASETS)}")
    return data


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    source, config = parse_option(option)
    out = []
    for n, row in enumerate(rows(source, config)[:samples], start=1):
        name = row["dataset"].removesuffix("_e")
        metric, max_new, family = DATASETS[name]
        before, after = PROMPTS[family]
        context, tokens = hf.middle_truncate(tokenizer, row["context"], length)
        question = Question(
            text=after.format(input=row["input"]),
            answers=hf.string_list(row, "answers", ""),
            max_new_tokens=max_new,
            metric=f"longbench:{metric}",
            choices=hf.string_list(row, "all_classes", "", allow_empty=True),
        )
        sample_id = str(row.get("_id") or f"row{n:05d}")
        meta = {"length": length or None, "depth": None, "dataset": name, "language": row.get("language"),
                "context_tokens": tokens, "source": source}  # fmt: skip
        out.append(Sample(f"longbench:{name}", f"{length}/{sample_id}", "qa", f"{before}\n\n{context}", (question,),
                          meta=meta))  # fmt: skip
    return out
