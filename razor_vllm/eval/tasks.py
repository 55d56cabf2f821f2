"""Synthetic long-context retrieval tasks (RULER-style) for evaluating KV-cache compression.

Tasks follow RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654) and passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark
Attention: Random-Access Infinite Context Length for Transformers", arXiv 2305.16300):

* ``passkey``         a 5-digit pass key hidden in repeated filler ("The grass is green. ...").
* ``niah_single``     one needle "One of the special magic numbers for {word-key} is: {7 digits}."
* ``niah_multikey``   several such needles with UUID keys; one is asked for, the rest are distractors.
* ``niah_multivalue`` one key with several values spread through the context; all are asked for.
* ``vt``              variable tracking: "VAR ABCDE = 12345." followed by a chain of
                      "VAR FGHIJ = VAR ABCDE." hops; every variable name in the chain is asked for.
* ``cwe``             common words extraction: a numbered word list in which a few words repeat
                      much more often than the others; the most frequent words are asked for.
* ``fwe``             frequent words extraction: coded words with Zipf frequencies; the top 3 are asked.

Everything is generated locally and deterministically from (task, length, depth, seed): the filler,
the word lists and the random values come from this module and a ``random.Random`` seeded through
SHA-256 (never Python's per-process randomised ``hash()``).

A sample is a ``context`` (instruction preamble + haystack with needles) and a ``question``
(``build_prompt_ids`` returns the two token runs separately). There is no answer prefix: the model
answers freely and ``score`` looks for the answers anywhere in its output.

Lengths are in tokens of the *full* prompt (chat template included, as ``build_prompt_ids`` builds
it): ``make_sample`` sizes the haystack so the prompt has at most ``length`` tokens and (for
realistic lengths) at least ~97% of it. Depth is the fraction of the context's tokens that precede
the needle that holds ``answers[0]``: the only needle (passkey, niah_single), the queried one
(niah_multikey; distractors go elsewhere), the first value (niah_multivalue; the others are spread
evenly around the context) or the chain's first assignment (vt; the hops follow, evenly spaced, up to
the end). ``cwe`` and ``fwe`` have no needle and ignore depth.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from razor_vllm.eval.words import (_ADJECTIVES, _NOUNS, _coded_words, _distinct_ints, _noise, _uuid, _zipf_bag,
                                   stable_seed)

TASKS: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe")

LENGTH_TOLERANCE = 0.03
"""``make_sample`` guarantees ``length * (1 - LENGTH_TOLERANCE) <= prompt tokens <= length`` whenever
one haystack unit is smaller than that slack (true for every length >= ~500 tokens)."""


# --------------------------------------------------------------------------------------------------
# Sample
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One synthetic prompt with its reference answers."""

    task: str
    length: int
    """Target prompt length in tokens (upper bound of the full prompt incl. chat template)."""
    depth: float
    """0..1: fraction of the context's tokens before the (first / queried) needle. Ignored by
    ``cwe``, which has no needle (kept so suites stay rectangular)."""
    seed: int
    context: str
    """Instruction preamble + haystack with the needle(s). Prefilled (and compressed) as one run."""
    question: str
    """Text after the context; fed after the prefill, through the compressed cache."""
    answers: tuple[str, ...]
    """All must appear in the output (RULER's string_match_all, case-insensitive)."""
    max_new_tokens: int


# --------------------------------------------------------------------------------------------------
# Task specifications
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything about a sample except how much filler it gets."""

    preamble: str
    question: str
    answers: tuple[str, ...]
    max_new_tokens: int
    needles: tuple[tuple[float, str], ...]
    """(depth, sentence), ascending depth; each goes where that fraction of the context precedes it."""
    filler: Callable[[int], list[str]]
    """n -> the n haystack units (sentences / list entries), joined by spaces, between which the
    needles are inserted."""


_NIAH_PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to "
                  "memorize it. I will quiz you about the numbers afterwards.")


def _niah_needle(key: str, value: int) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _spread(depth: float, k: int, wrap: bool) -> list[float]:
    """k needle depths, the first exactly at ``depth``. ``wrap``: the others evenly around the whole
    context (their text order is irrelevant); otherwise evenly over [depth, 1), so that text order =
    chain order (vt)."""
    if wrap:
        return [depth] + [(depth + i / k) % 1.0 for i in range(1, k)]
    return [depth + i * (1.0 - depth) / k for i in range(k)]


def _passkey(rng: random.Random, depth: float) -> _Spec:
    key = rng.randint(10000, 99999)
    return _Spec(
        preamble="There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.",
        question="What is the pass key? Answer with the 5-digit pass key only.",
        answers=(str(key),),
        max_new_tokens=16,
        needles=((depth, f"The pass key is {key}. Remember it. {key} is the pass key."),),
        filler=_noise,
    )


def _niah_single(rng: random.Random, depth: float) -> _Spec:
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    value = rng.randint(1_000_000, 9_999_999)
    return _Spec(
        preamble=_NIAH_PREAMBLE,
        question=f"What is the special magic number for {key} mentioned in the provided text? "
        "Answer with the number only.",
        answers=(str(value),),
        max_new_tokens=32,
        needles=((depth, _niah_needle(key, value)),),
        filler=_noise,
    )


NIAH_MULTIKEY_NUM_KEYS = 4
"""Needles in ``niah_multikey``: the queried one at ``depth`` and 3 distractors (RULER multikey_1)."""


def _niah_multikey(rng: random.Random, depth: float) -> _Spec:
    keys = [_uuid(rng) for _ in range(NIAH_MULTIKEY_NUM_KEYS)]
    values = _distinct_ints(rng, NIAH_MULTIKEY_NUM_KEYS, 1_000_000, 9_999_999)
    # The queried needle sits at `depth`; distractors go to random depths at least 0.05 away from it
    # so that "the needle at depth d" stays well defined.
    others = []
    while len(others) < NIAH_MULTIKEY_NUM_KEYS - 1:
        d = rng.random()
        if abs(d - depth) >= 0.05:
            others.append(d)
    placed = [(depth, _niah_needle(keys[0], values[0]))]
    placed += [(d, _niah_needle(k, v)) for d, k, v in zip(others, keys[1:], values[1:])]
    return _Spec(
        preamble=_NIAH_PREAMBLE,
        question=f"What is the special magic number for {keys[0]} mentioned in the provided text? "
        "Answer with the number only.",
        answers=(str(values[0]),),
        max_new_tokens=64,  # small models echo the ~30-token UUID before the number
        needles=tuple(sorted(placed)),
        filler=_noise,
    )


NIAH_MULTIVALUE_NUM_VALUES = 4
"""Values of the single key in ``niah_multivalue`` (RULER's default)."""


def _niah_multivalue(rng: random.Random, depth: float) -> _Spec:
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    values = _distinct_ints(rng, NIAH_MULTIVALUE_NUM_VALUES, 1_000_000, 9_999_999)
    depths = _spread(depth, len(values), wrap=True)
    return _Spec(
        preamble=_NIAH_PREAMBLE,
        # RULER asks "What are all the special magic numbers for {key} ...?"; naming the count and a
        # list format made SmolLM2-135M list the values instead of describing them (0.12 -> 0.88 recall
        # on two 1k-token prompts with the full cache).
        question=f"List all {len(values)} special magic numbers for {key} mentioned in the provided "
        "text, one per line.",
        answers=tuple(str(v) for v in values),  # answers[0] is the one at `depth`
        max_new_tokens=96,
        needles=tuple(sorted((d, _niah_needle(key, v)) for d, v in zip(depths, values))),
        filler=_noise,
    )


VT_NUM_HOPS = 4
"""Assignments after the initial "VAR X = value." in ``vt`` (RULER: 1 chain, 4 hops)."""


def _vt(rng: random.Random, depth: float) -> _Spec:
    names: list[str] = []
    while len(names) < VT_NUM_HOPS + 1:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
        if name not in names:
            names.append(name)
    value = rng.randint(10000, 99999)
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    return _Spec(
        preamble="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {value} in the text "
        "above. Answer with the variable names only, separated by commas.",
        answers=tuple(names),
        max_new_tokens=64,
        needles=tuple(zip(_spread(depth, len(chain), wrap=False), chain)),
        filler=_noise,
    )


CWE_NUM_COMMON = 5
"""Words ``cwe`` asks for (RULER uses 10 at >= 4k tokens; 5 keeps 1k-token lists meaningful)."""
CWE_COMMON_SHARE = 0.25
"""Fraction of list entries taken by the common words (~5% of the list each). The uncommon words share
the rest evenly over as many distinct words as the built-in list has (1 occurrence each at 1k tokens,
3-4 at 8k), so a common word is 10-20x more frequent than any other: the answer is unambiguous."""


def _cwe(rng: random.Random, depth: float) -> _Spec:
    words = list(_NOUNS)
    rng.shuffle(words)
    common, pool = words[:CWE_NUM_COMMON], words[CWE_NUM_COMMON:]
    arrangement_seed = rng.getrandbits(64)

    def entries(n: int) -> list[str]:
        # n entries: the common words take CWE_COMMON_SHARE of them (at least 3 occurrences each),
        # the rest is spread as evenly as possible over as many distinct uncommon words as there are.
        per_common = max(3, round(n * CWE_COMMON_SHARE / CWE_NUM_COMMON))
        rest = max(0, n - per_common * CWE_NUM_COMMON)
        distinct = min(len(pool), rest)
        bag = common * per_common
        for i in range(distinct):
            bag += [pool[i]] * (rest // distinct + (i < rest % distinct))
        bag = bag[:n]
        random.Random(stable_seed(arrangement_seed, n)).shuffle(bag)
        return [f"{i + 1}. {w}" for i, w in enumerate(bag)]

    return _Spec(
        preamble="Below is a numbered list of words. In these words, some appear more often than "
        "others. Memorize the ones that appear most often.",
        question=f"Question: What are the {CWE_NUM_COMMON} most common words in the above list? "
        "Answer with the words only, separated by commas.",
        answers=tuple(common),
        max_new_tokens=64,
        needles=(),
        filler=entries,
    )


FWE_VOCAB, FWE_ALPHA = 40, 2.0
"""``fwe`` (RULER's frequent-words extraction): coded words with Zipf frequencies (rank^-alpha); the
answer is the 3 most frequent (ranks 1-3 hold 61 %, 15 % and 7 % of the text, rank 4 4 %)."""


def _fwe(rng: random.Random, depth: float) -> _Spec:
    vocab = _coded_words(rng, FWE_VOCAB)
    arrangement_seed = rng.getrandbits(64)
    return _Spec(
        preamble="Read the following coded text and track the frequency of each coded word. Find the three "
        "most frequently appeared coded words.",
        question="Question: What are the three most frequently appeared words in the above coded text? "
        "Answer with the words only, separated by commas.",
        answers=tuple(vocab[:3]), max_new_tokens=32, needles=(),
        filler=lambda n: _zipf_bag(vocab, FWE_ALPHA, n, stable_seed(arrangement_seed, n)))


_BUILDERS: dict[str, Callable[[random.Random, float], _Spec]] = {
    "passkey": _passkey,
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "vt": _vt,
    "cwe": _cwe,
    "fwe": _fwe,
}
assert tuple(_BUILDERS) == TASKS


# --------------------------------------------------------------------------------------------------
# Token counting, needle placement and length fitting
# --------------------------------------------------------------------------------------------------


def _ids(enc: Any) -> list[int]:
    """Token ids from whatever a tokenizer call returned (BatchEncoding, dict or list)."""
    if isinstance(enc, dict) or hasattr(enc, "input_ids"):
        enc = enc["input_ids"]
    return list(enc)


class _UnitCosts:
    """Token cost of haystack units, from per-word costs that are tokenised once (batched) and cached.

    A unit costs the sum of ``" " + word`` over its space-separated words: how it tokenises after the
    separator, exactly, for byte-level BPE tokenisers (GPT-2 style pre-tokenisation splits before every
    " word", so no token spans two words). For other tokenisers it is an estimate that the exact
    re-count in ``_fit`` corrects. Caching words rather than units matters for ``cwe``, whose entries
    ("17. apple") are rebuilt, renumbered, for every candidate list size.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.words: dict[str, int] = {}
        self.units: dict[str, int] = {}

    def __call__(self, units: Sequence[str]) -> list[int]:
        new_units = [u for u in dict.fromkeys(units) if u not in self.units]
        if new_units:
            split = [u.split(" ") for u in new_units]
            missing = list(dict.fromkeys(w for ws in split for w in ws if w not in self.words))
            if missing:
                enc = self.tokenizer([" " + w for w in missing], add_special_tokens=False)["input_ids"]
                self.words.update((w, len(ids)) for w, ids in zip(missing, enc))
            self.units.update((u, sum(self.words[w] for w in ws)) for u, ws in zip(new_units, split))
        return [self.units[u] for u in units]


def _assemble(spec: _Spec, n: int, costs: _UnitCosts, preamble_tokens: int) -> str:
    """The context with ``n`` filler units and the needles at their depths.

    A needle goes before the filler unit at which the running token count (preamble included) is
    closest to ``depth * total``: depth is measured in tokens, not in units or characters, because
    filler sentences differ in length and the preamble is part of the context.
    """
    fill = spec.filler(n)
    fill_costs = costs(fill)
    needle_texts = [t for _, t in spec.needles]
    needle_costs = costs(needle_texts)
    total = preamble_tokens + sum(fill_costs) + sum(needle_costs)
    targets = [d * total for d, _ in spec.needles]

    units: list[str] = []
    pos, j = float(preamble_tokens), 0
    for unit, cost in zip(fill, fill_costs):
        # Insert here if the needle's target is nearer to this boundary than to the next one.
        while j < len(targets) and pos + cost / 2 >= targets[j]:
            units.append(needle_texts[j])
            pos += needle_costs[j]
            j += 1
        units.append(unit)
        pos += cost
    units += needle_texts[j:]
    return spec.preamble + "\n" + " ".join(units)


def _prompt_len(context: str, question: str, tokenizer: Any, chat: bool) -> int:
    """Exact token count of the model input ``build_prompt_ids`` produces (one tokenisation)."""
    text, special = _render(context, question, tokenizer, chat)
    return len(_ids(tokenizer(text, add_special_tokens=special)))


def _fit(spec: _Spec, length: int, tokenizer: Any, chat: bool) -> str:
    """The context with the most filler units whose full prompt has at most ``length`` tokens.

    The token count as a function of the unit count is estimated from cached per-unit costs (cheap),
    binary-searched, and checked with one exact tokenisation of the full prompt; a mismatch (e.g. at
    the preamble/haystack or context/question seams) shifts the budget by the error and the search is
    repeated, so typically 1-2 exact counts are needed instead of tokenising 8k-token strings at every
    search step.
    """
    costs = _UnitCosts(tokenizer)
    preamble_tokens = len(_ids(tokenizer(spec.preamble + "\n", add_special_tokens=False)))
    base = _prompt_len(_assemble(spec, 0, costs, preamble_tokens), spec.question, tokenizer, chat)
    if base > length:
        raise ValueError(f"length={length} is below the {base} tokens the prompt needs without filler")

    def estimate(n: int) -> int:
        return base + sum(costs(spec.filler(n)))

    def largest_n(budget: int) -> int:
        lo, hi = 0, max(1, budget)  # every unit costs >= 1 token, so n <= budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if estimate(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    best_n, budget, tried = 0, length, set()
    for _ in range(8):
        n = largest_n(budget)
        if n in tried:
            break
        tried.add(n)
        exact = _prompt_len(_assemble(spec, n, costs, preamble_tokens), spec.question, tokenizer, chat)
        if exact <= length and n >= best_n:
            best_n = n
        error = exact - estimate(n)
        if exact <= length and estimate(n + 1) + error > length:
            break  # one more unit would overflow: n is the answer
        budget = length - error
    return _assemble(spec, best_n, costs, preamble_tokens)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def make_sample(task: str, length: int, depth: float, seed: int, tokenizer: Any, *,
                chat: bool = True) -> Sample:
    """One sample whose full prompt (``build_prompt_ids(sample, tokenizer, chat)``) has at most
    ``length`` tokens, within ``LENGTH_TOLERANCE`` of it.

    The needle values depend on (task, seed) only, so one seed gives the same needle at every length
    and depth; the haystack size and needle position follow ``length`` and ``depth``.
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(stable_seed("razor-vllm-tasks", task, seed))
    spec = _BUILDERS[task](rng, depth)
    context = _fit(spec, length, tokenizer, chat)
    return Sample(task=task, length=length, depth=depth, seed=seed, context=context,
                  question=spec.question, answers=spec.answers, max_new_tokens=spec.max_new_tokens)


def suite_depths(depths_per_length: int) -> list[float]:
    """Evenly spread depths, centred in equal bins: 5 -> 0.1, 0.3, 0.5, 0.7, 0.9; 1 -> 0.5."""
    k = depths_per_length
    return [round((i + 0.5) / k, 6) for i in range(k)]


def make_suite(tasks: Iterable[str], lengths: Iterable[int], depths_per_length: int, seed: int,
               tokenizer: Any, *, chat: bool = True) -> list[Sample]:
    """Samples for every (task, length, depth), in that nesting order.

    Each sample's seed is ``stable_seed(seed, task, length, depth index)`` (31 bits), so suites are
    reproducible across processes and every cell gets its own needle values.
    """
    lengths = list(lengths)
    samples = []
    for task in tasks:
        for length in lengths:
            for i, depth in enumerate(suite_depths(depths_per_length)):
                s = stable_seed("suite", seed, task, length, i) & 0x7FFFFFFF
                samples.append(make_sample(task, length, depth, s, tokenizer, chat=chat))
    return samples


def _render(context: str, question: str, tokenizer: Any, chat: bool) -> tuple[str, bool]:
    """(full prompt text, whether the tokenizer should add its special tokens to it)."""
    if not chat:
        # Plain text: the tokenizer adds what it adds by default (e.g. Llama's BOS).
        return context + "\n\n" + question, True
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat template; use chat=False")
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + "\n\n" + question}],
                                         add_generation_prompt=True, tokenize=False)
    # The template already contains its special tokens (BOS, role markers) as text.
    return text, False


# A token that spans the cut may take this many characters of the context with it (Qwen2: the
# final "." of ".\n\n").
_MAX_CUT_SHIFT = 4


def build_prompt_ids(sample: Sample, tokenizer: Any, chat: bool = True) -> tuple[list[int], list[int]]:
    """(context_ids, question_ids): the model input split right after the context.

    chat=True: the user message is ``context + "\\n\\n" + question`` under the tokenizer's chat
    template with ``add_generation_prompt=True``. context_ids = template head + context; question_ids
    = "\\n\\n" + question + end of turn + assistant header. chat=False: plain ``context + "\\n\\n" +
    question`` with the tokenizer's default special tokens on the context.

    The whole rendered text is tokenised once (what ``apply_chat_template(..., tokenize=True)``
    returns) and split at the token boundary at the end of the context, so the model sees exactly
    the tokenisation of the whole prompt. With GPT-2 style pre-tokenisation (SmolLM2, Llama 3) a
    boundary always falls there: the context ends in a word or "." and the rest starts with
    "\\n\\n". Qwen2's pre-tokeniser keeps punctuation and the newlines after it in one token
    (".\\n\\n"): such a token spanning the cut goes to the question side, and the context ids end
    just before the context's final punctuation. A token spanning more than ``_MAX_CUT_SHIFT``
    characters of context raises (the split would no longer be "context, then question").
    """
    text, special = _render(sample.context, sample.question, tokenizer, chat)
    cut = text.find(sample.context + "\n\n" + sample.question)
    if cut < 0:
        raise ValueError("the chat template altered the message text; cannot split the prompt")
    cut += len(sample.context)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = _ids(enc), enc["offset_mapping"]
    # special tokens added by the tokenizer (BOS) have offsets (0, 0): they end before the cut
    k = sum(1 for _, end in offsets if end <= cut)
    if any(end > cut for _, end in offsets[:k]) or any(end <= cut for _, end in offsets[k:]):
        raise ValueError("the tokenizer's offsets are not monotonic; cannot split the prompt")
    if k < len(ids) and cut - offsets[k][0] > _MAX_CUT_SHIFT:
        raise ValueError(f"a token spans {cut - offsets[k][0]} characters of the context's end "
                         f"({text[offsets[k][0]:offsets[k][1]]!r}); cannot split the prompt at the context")
    return ids[:k], ids[k:]


def _found(answer: str, output: str) -> bool:
    # Case-insensitive, and the answer must not be glued to other letters/digits: "12345" does not
    # match inside "9123456", nor "car" inside "cards". This is RULER's substring test
    # (string_match_all) restricted to whole tokens, which stops long digit runs or word salad from
    # scoring by accident.
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", output, re.IGNORECASE) is not None


def score(sample: Sample, output_text: str) -> float:
    """Fraction of ``sample.answers`` found in ``output_text`` (RULER's per-sample string_match_all:
    the mean of this over samples is the task score)."""
    return sum(_found(a, output_text) for a in sample.answers) / len(sample.answers)


def is_correct(sample: Sample, output_text: str) -> bool:
    """All answers found."""
    return all(_found(a, output_text) for a in sample.answers)
