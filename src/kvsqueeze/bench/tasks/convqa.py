"""``convqa``: long conversational QA in the spirit of LongConvQA (the setting of EpiCache, arXiv 2509.17396):
a synthetic dialogue, generated offline and deterministically, whose user states facts across many turns; the
questions about them come after the whole history.

A sample is ``SESSIONS`` topical sessions, each drawn from one text source (an essay or one of Jane Austen's novels):
the user opens the topic, then shares passages of it turn after turn (about ``PASSAGE_TOKENS`` tokens each), the
assistant answers with a short acknowledgement. ``QUESTIONS`` facts about invented people (``My neighbour Tarn
Velum has a dog called Oyster.``) are appended to passages in random sessions, each to a different turn; after the
history each fact is asked in other words (``What is the name of the dog of Tarn Velum?``, answer prefix ``The dog
of Tarn Velum is called``). Answers are words (SmolLM2 copies numbers digit by digit, a stress case for selection).

``convqa:topical`` makes each session about one invented person, as LongConvQA's episodes are topical: the user
opens it with that person (``Let us talk about my friend Tarn Velum.``), every passage turn names them (``Tarn
Velum read this to me: …``), and the facts asked later are about the session's person (facts 1–4 about the four
people, 5 and 6 about the first two again, each stated in its person's session).

``convqa:persona`` is a dialogue made of facts, as LongConvQA's are (people telling each other about their lives):
each session is about one invented person, and its user turns state that person's facts one after another
(``PERSONA_FACTS``: pet, village, boat, bakery, book, choir, …, each with a new word), each followed by an
acknowledgement; when a session has stated every kind of fact, passages about the person fill the rest of its share.
Six of the stated facts are asked later: two each about the first two people, one each about the other two.

The dialogue is kept as ``documents``: the messages' contents, alternately user and assistant (``meta["roles"]``);
``context`` is the same dialogue as ``Role: content`` lines (what a digest and a reader see). Questions are asked
independently of each other after the history (the ``convqa`` evaluator); each is scored by ``string_match_all``
(rows carry ``turn1 … turnN`` in the order asked). The history fills the requested length minus room for the
question.
"""

from __future__ import annotations

import random

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.text import austen_paragraphs, essay_haystack, vocabulary
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import encode

SESSIONS = 4
QUESTIONS = 6
PASSAGE_TOKENS = 90
OPTIONS = ("topical", "persona")
MIN_LENGTH = 1536  # room for six passage turns (two per session) that each state a fact
QUESTION_ROOM = 64  # tokens left after the history for the question, the reply opening and the answer
TURN_OVERHEAD = 8  # tokens a chat template adds around a message (the measured total is checked after)
ACKS = ("I see.", "Thank you for sharing this.", "Interesting, please go on.", "Noted, that is a fine passage.",
        "I follow you.", "That is worth remembering.")  # fmt: skip
# (how a fact is stated, how it is asked, what the answer continues)
FACTS = (
    ("My neighbour {name} has a dog called {word}.", "What is the name of the dog of {name}?",
     "The dog of {name} is called"),
    ("Last week {name} moved to a village called {word}.", "To which village did {name} move?",
     "{name} moved to a village called"),
    ("The boat that {name} keeps at the harbour is named {word}.", "What is the name of the boat of {name}?",
     "The boat of {name} is named"),
    ("My cousin {name} works at a bakery called {word}.", "What is the bakery where {name} works called?",
     "The bakery where {name} works is called"),
)  # fmt: skip

PERSONA_FACTS = (
    *FACTS,
    ("{name}'s favourite book is called {word}.", "What is the favourite book of {name} called?",
     "The favourite book of {name} is called"),
    ("{name} sings in a choir called {word}.", "What is the choir that {name} sings in called?",
     "The choir that {name} sings in is called"),
    ("The cat of {name} is named {word}.", "What is the name of the cat of {name}?", "The cat of {name} is named"),
    ("{name} grew up on a street called {word}.", "On which street did {name} grow up?",
     "{name} grew up on a street called"),
    ("{name} plays for a football team called {word}.", "What is the football team of {name} called?",
     "The football team of {name} is called"),
    ("The car that {name} drives is nicknamed {word}.", "What is the nickname of the car of {name}?",
     "The car of {name} is nicknamed"),
    ("{name} rides a horse called {word}.", "What is the name of the horse of {name}?",
     "The horse of {name} is called"),
    ("{name} runs a small shop called {word}.", "What is the shop that {name} runs called?",
     "The shop that {name} runs is called"),
    ("Last summer {name} climbed a mountain called {word}.", "Which mountain did {name} climb?",
     "{name} climbed a mountain called"),
    ("The garden of {name} is named {word}.", "What is the name of the garden of {name}?",
     "The garden of {name} is named"),
)  # fmt: skip


TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
          "sensesensibility": "Sense and Sensibility"}  # fmt: skip


def passages(tokenizer, rng: random.Random, source: int, n: int, paragraphs) -> tuple[str, list[str]]:
    """``(topic, n passages)`` of one source: an essay (even ``source``) or an Austen novel (odd)."""
    if source % 2 == 0:
        start = rng.randrange(1000)
        text = essay_haystack(tokenizer, n * PASSAGE_TOKENS + 64, start)
        sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]
        topic = "an essay I am reading about startups and ideas"
    else:
        novel = sorted({name for name, _ in paragraphs})[rng.randrange(6)]
        own = [p for name, p in paragraphs if name == novel]
        start = rng.randrange(max(1, len(own) - 4 * n))
        sentences = [s.strip() for p in own[start:] for s in p.split(". ") if s.strip()][: 12 * n]
        topic = f"the novel {TITLES.get(novel, novel)} by Jane Austen"
    out, current = [], []
    for sentence in sentences:
        words = sentence.split()
        while len(encode(tokenizer, sentence)) > 2 * PASSAGE_TOKENS and len(words) > 8:  # a very long sentence
            words = words[: len(words) * 2 // 3]
            sentence = " ".join(words)
        current.append(sentence)
        if len(encode(tokenizer, ". ".join(current))) >= PASSAGE_TOKENS:
            out.append(". ".join(current).rstrip(".") + ".")
            current = []
        if len(out) == n:
            break
    return topic, out or [". ".join(sentences)]


def draw_facts(rng: random.Random, words, answers, topical: bool = False
               ) -> tuple[list[tuple[str, str, str, str]], list[str]]:  # fmt: skip
    """``QUESTIONS`` facts ``(statement, question, answer prefix, answer)``, every word new in the sample, and the
    people's names; with ``topical`` fact ``k`` is about person ``k % SESSIONS``."""
    used: set[str] = set()

    def fresh(n: int) -> list[str]:
        while True:
            picked = [rng.choice(words) for _ in range(n - 1)] + [rng.choice(answers)]
            if len(set(picked) | used) == len(used) + n:
                used.update(picked)
                return picked

    names: list[str] = []
    facts = []
    for k in range(QUESTIONS):
        if topical and k >= SESSIONS:
            (answer,) = fresh(1)
            name, template = names[k % SESSIONS], (k + k // SESSIONS) % len(FACTS)  # another fact of that person
        else:
            first, last, answer = fresh(3)
            name, template = f"{first.capitalize()} {last.capitalize()}", k % len(FACTS)
            names.append(name)
        answer = answer.capitalize()
        state, ask, prefix = FACTS[template]
        facts.append((state.format(name=name, word=answer), ask.format(name=name), prefix.format(name=name), answer))
    return facts, names


def dialogue(tokenizer, rng: random.Random, budget: int, facts, paragraphs, people: list[str] | None = None
             ) -> list[str]:  # fmt: skip
    """The messages' contents (user, assistant, …): ``SESSIONS`` sessions of passages within ``budget`` tokens,
    each fact appended to a different passage turn (with ``people``, session ``s`` is about ``people[s]`` and fact
    ``k`` goes to a turn of session ``k % SESSIONS``)."""

    def cost(text: str) -> int:
        return len(encode(tokenizer, text)) + TURN_OVERHEAD

    mentions = [f" By the way, {f[0][0].lower()}{f[0][1:]}" for f in facts]
    quota = (budget - sum(cost(m) for m in mentions)) // SESSIONS
    first_source = rng.randrange(2)
    sessions, turns = [], []  # turns: (session, index in its messages) of each passage
    for s in range(SESSIONS):
        topic, texts = passages(tokenizer, rng, first_source + s, quota // (PASSAGE_TOKENS // 2) + 2, paragraphs)
        messages = [f"Let us talk about {topic}.", "Gladly, share what you are reading."]
        if people:
            person = people[s]
            messages = [f"Let us talk about my friend {person}, who reads {topic}.", f"Gladly, tell me about {person}."]
            texts = [f"{person} read this to me: {text}" for text in texts]
        used = sum(cost(m) for m in messages)
        for text in texts:
            ack = ACKS[rng.randrange(len(ACKS))]
            if used + cost(text) + cost(ack) > quota:
                break
            turns.append((s, len(messages)))
            messages += [text, ack]
            used += cost(text) + cost(ack)
        sessions.append(messages)
    if len(turns) < QUESTIONS:
        raise KVSqueezeError(
            f"the context length leaves {len(turns)} passage turns for {QUESTIONS} facts; use at "
            f"least {MIN_LENGTH} tokens"
        )
    if people:  # fact k in session k % SESSIONS, each in a different turn
        chosen = []
        for k in range(QUESTIONS):
            own = [t for t in turns if t[0] == k % SESSIONS and t not in chosen]
            if not own:
                raise KVSqueezeError(
                    f"the context length leaves too few passage turns per person; use at least {MIN_LENGTH} tokens"
                )
            chosen.append(own[rng.randrange(len(own))])
    else:
        chosen = rng.sample(turns, QUESTIONS)
    for mention, (s, j) in zip(mentions, chosen, strict=True):
        sessions[s][j] += mention
    return [m for messages in sessions for m in messages]


def unused(rng: random.Random, pool, used: set[str], n: int) -> list[str]:
    """``n`` distinct words of ``pool`` not in ``used`` (added to it)."""
    while True:
        picked = [rng.choice(pool) for _ in range(n)]
        if len(set(picked) | used) == len(used) + n:
            used.update(picked)
            return picked


def persona_dialogue(tokenizer, rng: random.Random, budget: int, words, answers, paragraphs
                     ) -> tuple[list[str], list[tuple[str, str, str, str]]]:  # fmt: skip
    """``convqa:persona``'s messages (user, assistant, …) within ``budget`` tokens and the ``QUESTIONS`` facts asked
    ``(statement, question, answer prefix, answer)``: session ``s`` states facts of person ``s``."""

    def cost(text: str) -> int:
        return len(encode(tokenizer, text)) + TURN_OVERHEAD

    used: set[str] = set()
    quota = budget // SESSIONS
    first_source = rng.randrange(2)
    messages, stated = [], []  # stated[s]: the facts of person s, as stated
    for s in range(SESSIONS):
        person = " ".join(w.capitalize() for w in unused(rng, words, used, 2))
        topic, texts = passages(tokenizer, rng, first_source + s, quota // (PASSAGE_TOKENS // 2) + 2, paragraphs)
        session = [f"Let us talk about my friend {person}.", f"Gladly, tell me about {person}."]
        used_tokens = sum(cost(m) for m in session)
        facts = []
        for template in rng.sample(range(len(PERSONA_FACTS)), len(PERSONA_FACTS)):
            state, ask, prefix = PERSONA_FACTS[template]
            answer = unused(rng, answers, used, 1)[0].capitalize()
            fact = (state.format(name=person, word=answer), ask.format(name=person), prefix.format(name=person), answer)
            ack = ACKS[rng.randrange(len(ACKS))]
            if used_tokens + cost(fact[0]) + cost(ack) > quota:
                break
            session += [fact[0], ack]
            used_tokens += cost(fact[0]) + cost(ack)
            facts.append(fact)
        else:  # every kind of fact stated: passages about the person (from ``topic``) fill the session's share
            for text in texts:
                turn, ack = f"{person} read this to me, from {topic}: {text}", ACKS[rng.randrange(len(ACKS))]
                if used_tokens + cost(turn) + cost(ack) > quota:
                    break
                session += [turn, ack]
                used_tokens += cost(turn) + cost(ack)
        messages += session
        stated.append(facts)
    asked_per_person = [len(range(k, QUESTIONS, SESSIONS)) for k in range(SESSIONS)]
    if any(len(facts) < n for facts, n in zip(stated, asked_per_person, strict=True)):
        raise KVSqueezeError(f"the context length leaves too few facts per person; use at least {MIN_LENGTH} tokens")
    picked = [rng.sample(facts, n) for facts, n in zip(stated, asked_per_person, strict=True)]
    asked = [picked[k % SESSIONS][k // SESSIONS] for k in range(QUESTIONS)]
    return messages, asked


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    if option not in (None, *OPTIONS):
        raise KVSqueezeError(f"unknown convqa option {option!r}; valid: {', '.join(OPTIONS)}")
    topical = option == "topical"
    budget = length - QUESTION_ROOM
    if length < MIN_LENGTH:
        raise KVSqueezeError(f"context length {length} is too short for convqa; use at least {MIN_LENGTH}")
    words = vocabulary()
    answers = [w for w in words if len(w) >= 6]  # no short common words a model writes by chance
    paragraphs = austen_paragraphs()
    out = []
    for i in range(samples):
        rng = rng_for("convqa", length, seed, i)
        if option == "persona":
            messages, facts = persona_dialogue(tokenizer, rng, budget, words, answers, paragraphs)
        else:
            facts, people = draw_facts(rng, words, answers, topical)
            messages = dialogue(tokenizer, rng, budget, facts, paragraphs, people if topical else None)
        order = list(facts)
        rng.shuffle(order)
        questions = tuple(Question(ask, (answer,), prefix, max_new_tokens=len(encode(tokenizer, " " + answer)) + 4)
                          for _, ask, prefix, answer in order)  # fmt: skip
        roles = ("User", "Assistant")
        out.append(
            Sample(
                task="convqa",
                id=f"{length}/{i:04d}" if option is None else f"{length}/{option}/{i:04d}",
                kind="convqa",
                context="\n".join(f"{roles[j % 2]}: {m}" for j, m in enumerate(messages)),
                questions=questions,
                documents=tuple(messages),
                meta={
                    "length": length,
                    "turns": len(messages),
                    "sessions": SESSIONS,
                    "roles": "user-assistant",
                    **({option: True} if option else {}),
                },
            )
        )
    return out


def messages_of(sample: Sample) -> list[dict]:
    """The sample's dialogue as chat messages (alternately user and assistant)."""
    return [{"role": ("user", "assistant")[j % 2], "content": m} for j, m in enumerate(sample.documents)]
