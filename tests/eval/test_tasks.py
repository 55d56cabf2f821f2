"""Tests of the synthetic RULER-style tasks (razor_vllm.eval.tasks) with the real SmolLM2 tokenizer.

Tokenizer only (no model run): fast. The tokenizer comes from the converted SmolLM2-135M-Instruct
directory (`razor-vllm` fetches it into the cache); the tests skip when it is absent.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from razor_vllm.eval import tasks, words
from razor_vllm.paths import cache_root
from razor_vllm.eval.tasks import (TASKS, Sample, build_prompt_ids, is_correct, make_sample, make_suite,
                              score, stable_seed, suite_depths)

MODEL_DIR = cache_root() / "models" / "smollm2-135m-instruct"
NEEDLE_TASKS = tuple(t for t in TASKS if t not in ("cwe", "fwe"))
# Text each task's needle (the one at `depth`, which holds answers[0]) starts with.
NEEDLE_PREFIX = {
    "passkey": "The pass key is",
    "niah_single": "One of the special magic numbers",
    "niah_multikey": "One of the special magic numbers",
    "niah_multivalue": "One of the special magic numbers",
    "vt": "VAR ",
}


@pytest.fixture(scope="module")
def tok():
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found at {MODEL_DIR} (fetch the model with razor-vllm first)")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def prompt_len(sample: Sample, tok, chat: bool = True) -> int:
    ctx, q = build_prompt_ids(sample, tok, chat=chat)
    return len(ctx) + len(q)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_every_task_generates(tok, task):
    s = make_sample(task, 1000, 0.5, 3, tok)
    assert (s.task, s.length, s.depth, s.seed) == (task, 1000, 0.5, 3)
    assert s.context and s.question and s.answers and s.max_new_tokens > 0
    assert len(set(s.answers)) == len(s.answers)
    for a in s.answers:
        assert a in s.context, f"answer {a!r} missing from the context"
        assert a not in s.question, "the question must not give the answer away"


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(tok, task):
    a = make_sample(task, 1000, 0.3, 11, tok)
    assert a == make_sample(task, 1000, 0.3, 11, tok)
    assert a.answers != make_sample(task, 1000, 0.3, 12, tok).answers


def test_pinned_values(tok):
    """The generators depend on nothing process-specific (no hash(), no global random state): these
    values must be identical in every run. Changing them invalidates saved results; do it knowingly."""
    assert stable_seed("razor-vllm", 1) == 4149807482853345739
    assert make_sample("passkey", 1000, 0.5, 0, tok).answers == ("23265",)
    assert make_sample("vt", 1000, 0.5, 0, tok).answers == ("MSGME", "FQKFO", "WBTLA", "KUSOI", "KBPMY")


def test_suite(tok):
    assert suite_depths(5) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert suite_depths(1) == [0.5]
    suite = make_suite(["passkey", "vt"], [500, 1000], 2, 0, tok)
    assert [(s.task, s.length, s.depth) for s in suite] == [
        (t, n, d) for t in ("passkey", "vt") for n in (500, 1000) for d in (0.25, 0.75)]
    assert len({s.seed for s in suite}) == len(suite)
    assert suite == make_suite(["passkey", "vt"], [500, 1000], 2, 0, tok)
    assert suite != make_suite(["passkey", "vt"], [500, 1000], 2, 1, tok)


def test_rejects_bad_arguments(tok):
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("qa", 1000, 0.5, 0, tok)
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", 1000, 1.5, 0, tok)
    with pytest.raises(ValueError, match="below"):
        make_sample("passkey", 50, 0.5, 0, tok)


# --------------------------------------------------------------------------------------------------
# Length and depth
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1024, 2048, 4096, 8192])
@pytest.mark.parametrize("task", TASKS)
def test_length_within_tolerance(tok, task, length):
    n = prompt_len(make_sample(task, length, 0.5, 0, tok), tok)
    assert length * (1 - tasks.LENGTH_TOLERANCE) <= n <= length


def test_length_plain_prompt(tok):
    s = make_sample("niah_single", 2000, 0.5, 0, tok, chat=False)
    assert 2000 * (1 - tasks.LENGTH_TOLERANCE) <= prompt_len(s, tok, chat=False) <= 2000


@pytest.mark.parametrize("length", [1000, 4000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needle_at_depth(tok, task, depth, length):
    s = make_sample(task, length, depth, 5, tok)
    first = s.context.index(s.answers[0])  # answers[0] belongs to the needle placed at `depth`
    start = s.context.rfind(NEEDLE_PREFIX[task], 0, first)
    assert start >= 0
    before = s.context[:start].rstrip()
    if depth == 0.0:  # right after the instruction preamble, which is part of the context
        assert before == s.context.split("\n", 1)[0]
    elif depth == 1.0:  # after all the filler (only needles may follow, e.g. the rest of a vt chain)
        assert not any(f in s.context[start:] for f in words._NOISE)
    else:
        measured = n_tokens(tok, before) / n_tokens(tok, s.context)
        assert abs(measured - depth) <= 0.05, f"needle at {measured:.3f}, asked for {depth}"


def test_multivalue_spread(tok):
    s = make_sample("niah_multivalue", 2000, 0.1, 0, tok)
    ctx = n_tokens(tok, s.context)
    rel = sorted(n_tokens(tok, s.context[:s.context.index(v)]) / ctx for v in s.answers)
    assert len(rel) == tasks.NIAH_MULTIVALUE_NUM_VALUES
    gaps = [b - a for a, b in zip(rel, rel[1:])]
    assert min(gaps) > 0.15, f"values should be spread over the context, got {rel}"


# --------------------------------------------------------------------------------------------------
# Task semantics
# --------------------------------------------------------------------------------------------------


def test_multikey_distractors(tok):
    s = make_sample("niah_multikey", 2000, 0.5, 0, tok)
    needles = re.findall(r"special magic numbers for ([0-9a-f-]{36}) is: (\d{7})\.", s.context)
    assert len(needles) == tasks.NIAH_MULTIKEY_NUM_KEYS
    assert len({k for k, _ in needles}) == len({v for _, v in needles}) == len(needles)
    asked = [v for k, v in needles if k in s.question]
    assert asked == list(s.answers)


def test_vt_chain_resolves_to_answers(tok):
    s = make_sample("vt", 2000, 0.2, 0, tok)
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    env: dict[str, str] = {}
    order = []
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
        order.append(name)
    assert order == list(s.answers), "chain must appear in assignment order"
    assert {n for n, v in env.items() if v == value} == set(s.answers)


@pytest.mark.parametrize("length", [1000, 8000])
def test_cwe_answers_are_most_frequent(tok, length):
    s = make_sample("cwe", length, 0.5, 0, tok)
    entries = re.findall(r"(\d+)\. ([a-z]+)", s.context.split("\n", 1)[1])
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    least_common_answer = min(counts[a] for a in s.answers)
    most_other = max(c for w, c in counts.items() if w not in s.answers)
    assert least_common_answer >= 3 * most_other


@pytest.mark.parametrize("length", [1000, 8000])
def test_fwe_answers_are_the_three_most_frequent_in_rank_order(tok, length):
    s = make_sample("fwe", length, 0.5, 0, tok)
    counts = Counter(s.context.split("\n", 1)[1].split() if "\n" in s.context else
                     s.context.split("coded words.", 1)[1].split()).most_common()
    assert tuple(w for w, _ in counts[:3]) == s.answers
    assert counts[2][1] >= 1.5 * counts[3][1], counts[:5]  # rank 3 vs 4 is separable


# --------------------------------------------------------------------------------------------------
# Prompt split
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_split_matches_chat_template(tok, task):
    s = make_sample(task, 1000, 0.5, 0, tok)
    ctx, q = build_prompt_ids(s, tok)
    msg = [{"role": "user", "content": s.context + "\n\n" + s.question}]
    ref = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if not isinstance(ref, list) else ref
    assert ctx + q == list(ref)
    assert ctx[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ctx).endswith(s.context)
    assert tok.decode(q).startswith("\n\n" + s.question)
    assert tok.decode(q).endswith("<|im_start|>assistant\n")


def test_split_plain(tok):
    s = make_sample("passkey", 1000, 0.5, 0, tok, chat=False)
    ctx, q = build_prompt_ids(s, tok, chat=False)
    assert ctx + q == tok(s.context + "\n\n" + s.question)["input_ids"]
    assert tok.decode(q) == "\n\n" + s.question


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _sample(*answers: str) -> Sample:
    return Sample(task="niah_multivalue", length=0, depth=0.5, seed=0, context="", question="",
                  answers=answers, max_new_tokens=8)


def test_score_fraction_and_all():
    s = _sample("1234567", "7654321")
    assert score(s, "The numbers are 1234567 and 7654321.") == 1.0
    assert is_correct(s, "7654321, 1234567")
    assert score(s, "It is 1234567.") == 0.5
    assert not is_correct(s, "It is 1234567.")
    assert score(s, "no idea") == 0.0


def test_score_case_insensitive_whole_tokens():
    assert is_correct(_sample("ABCDE", "apple"), "abcde and APPLE")
    assert not is_correct(_sample("12345"), "9123456")  # digits glued on either side
    assert not is_correct(_sample("car"), "cards and scars")
    assert is_correct(_sample("12345"), "pass key:12345.")


def test_score_real_sample(tok):
    s = make_sample("passkey", 1000, 0.5, 0, tok)
    assert score(s, f"The pass key is {s.answers[0]}.") == 1.0
    assert score(s, "The pass key is 00000.") == 0.0


def _punct_newline_tokenizer(texts):
    """A fast word-level tokenizer whose pre-tokeniser keeps punctuation and the newlines after it in
    one token, as Qwen2's does (".\\n\\n"), with a vocabulary covering `texts`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Split(Regex(r"[.?:]\n+|\n+|[^\s.?:]+|[.?:]|[ \t]+"), behavior="isolated")
    vocab = {"[UNK]": 0}
    for t in texts:
        for piece, _ in pre.pre_tokenize_str(t):
            vocab.setdefault(piece, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "vt"])
def test_split_when_a_token_spans_the_cut(tok, task):
    """Context ending in "." + question starting with "\\n\\n": a tokenizer that makes ".\\n\\n" one
    token cannot cut between them. The split keeps the whole prompt's tokenisation and moves that
    token to the question side (it raised "a token spans the cut" before, so Qwen2 could not run)."""
    s = make_sample(task, 1000, 0.5, 0, tok, chat=False)
    text = s.context + "\n\n" + s.question
    assert s.context.endswith(".")
    spanning = _punct_newline_tokenizer([text])
    ctx, q = build_prompt_ids(s, spanning, chat=False)
    assert ctx + q == spanning(text)["input_ids"]
    assert spanning.decode(ctx).replace(" ", "") == s.context[:-1].replace(" ", "")
    assert spanning.convert_ids_to_tokens(q[0]) == ".\n\n"


def test_split_refuses_a_token_swallowing_the_context_end(tok):
    """A tokenizer whose token crosses the cut far into the context gives no context/question split."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    s = make_sample("passkey", 1000, 0.5, 0, tok, chat=False)
    text = s.context + "\n\n" + s.question
    pre = pre_tokenizers.Split(Regex(r"[^\n]*\n\n|[^\n]+"), behavior="isolated")  # whole lines
    vocab = {"[UNK]": 0, **{p: i + 1 for i, (p, _) in enumerate(pre.pre_tokenize_str(text))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    with pytest.raises(ValueError, match="a token spans .* characters of the context's end"):
        build_prompt_ids(s, PreTrainedTokenizerFast(tokenizer_object=tk), chat=False)


def test_split_qwen2_tokenizer():
    """The real Qwen2.5 tokenizer (present after `make models-all`): the split is the chat template's
    tokenisation and the question side starts with the ".\\n\\n" token."""
    qwen = cache_root() / "models" / "qwen2.5-coder-0.5b-instruct"
    if not (qwen / "tokenizer.json").is_file():
        pytest.skip(f"Qwen2.5 tokenizer not found at {qwen} (make models-all)")
    from transformers import AutoTokenizer

    qt = AutoTokenizer.from_pretrained(str(qwen))
    for task in TASKS:
        s = make_sample(task, 1000, 0.5, 0, qt)
        ctx, q = build_prompt_ids(s, qt)
        ref = qt.apply_chat_template([{"role": "user", "content": s.context + "\n\n" + s.question}],
                                     add_generation_prompt=True, tokenize=True)
        assert ctx + q == list(ref["input_ids"] if not isinstance(ref, list) else ref)
        assert qt.decode(q).startswith(("\n\n", ".\n\n")) and qt.decode(q).endswith("<|im_start|>assistant\n")
        assert s.context.startswith(qt.decode(ctx).split("<|im_start|>user\n", 1)[1])
