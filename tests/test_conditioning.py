"""Canonical tokenization and token healing, below the server."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_worker.conditioning import Conditioner, Plan, PrefixIndex, TextState, split_utf8
from model_worker.token_bytes import token_byte_table
from tests import tokenizer_factory
from tests.plans import plan_ids


@pytest.mark.parametrize(
    ("data", "valid", "pending"),
    [
        (b"", b"", b""),
        (b"abc", b"abc", b""),
        ("é".encode(), "é".encode(), b""),
        ("é".encode()[:1], b"", b"\xc3"),
        (b"a" + "你".encode()[:2], b"a", "你".encode()[:2]),
        ("🙂".encode()[:3], b"", "🙂".encode()[:3]),
        ("🙂".encode(), "🙂".encode(), b""),
        (b"ab\x80", b"ab\x80", b""),  # a stray continuation byte is not a pending character
    ],
)
def test_split_utf8(data: bytes, valid: bytes, pending: bytes) -> None:
    assert split_utf8(data) == (valid, pending)


def test_prefix_index_finds_exactly_the_strict_extensions() -> None:
    tokens = [b"a", b"ab", b"abc", b"abd", b"b", b"\xff", b"\xff\xff", b"\xffa", b"", b"ab"]
    special = [False] * len(tokens)
    special[9] = True  # a special token is never an extension
    index = PrefixIndex(tokens, special)
    assert sorted(index.extensions(b"ab").tolist()) == [2, 3]
    assert sorted(index.extensions(b"a").tolist()) == [1, 2, 3]
    assert sorted(index.extensions(b"\xff").tolist()) == [6, 7]
    assert index.extensions(b"abc").tolist() == []
    assert index.has_extension(b"ab") and not index.has_extension(b"abc")
    assert index.has_extension(b"\xff") and not index.has_extension(b"\xff\xff")
    brute = [i for i, t in enumerate(tokens) if not special[i] and t.startswith(b"a") and len(t) > 1]
    assert np.array_equal(np.sort(index.extensions(b"a")), brute)


# --------------------------------------------------------------------------- conditioning rules


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece", "sentencepiece_legacy", "unigram"])
def conditioner(request: pytest.FixtureRequest) -> Conditioner:
    build = {
        "byte_level": tokenizer_factory.byte_level_bpe,
        "sentencepiece": tokenizer_factory.sentencepiece_byte_fallback,
        "sentencepiece_legacy": tokenizer_factory.sentencepiece_legacy,
        "unigram": tokenizer_factory.sentencepiece_plain,
    }[request.param]
    tokenizer = build()
    tokens, special = token_byte_table(tokenizer, len(tokenizer))
    return Conditioner(tokenizer, tokens, special)


def test_tokens_are_found_by_their_exact_bytes(conditioner: Conditioner) -> None:
    """Every text token by its bytes, from the sorted index: only the byte strings several tokens spell (a
    byte-fallback token and a piece) keep a ranked list of their own, the one the tokenizer writes first (a
    dict of every token's bytes held 44 MB for Gemma 3's 262,144 tokens)."""
    by_bytes: dict[bytes, list[int]] = {}
    for i, data in enumerate(conditioner._tokens):
        if data and not conditioner._special[i]:
            by_bytes.setdefault(data, []).append(i)
    shared = {data for data, ids in by_bytes.items() if len(ids) > 1}
    assert set(conditioner._ranked) == shared
    for data, ids in by_bytes.items():
        found = conditioner.ids_of(data)
        assert found == ids if data not in shared else sorted(found) == ids
    for data in shared:
        written = conditioner.encode(data.decode("utf-8", "replace"), add_special_tokens=False)
        if len(written) == 1 and written[0] in by_bytes[data]:
            assert conditioner.ids_of(data)[0] == written[0]
    specials = [conditioner._tokens[i] for i, sp in enumerate(conditioner._special) if sp]
    assert all(conditioner.ids_of(data) == by_bytes.get(data, []) for data in specials)
    assert conditioner.ids_of(b"\x00never a token\xff") == []


def _spelled(c: Conditioner, state: TextState) -> bytes:
    return b"".join(c._tokens[i] for i in state.fixed[state.prompt_len :])


def test_the_prompt_is_tokenized_canonically_and_never_healed(conditioner: Conditioner) -> None:
    for prompt in ("hello wor", "the quick", "1 + 2 = ", "héllo"):
        state = conditioner.start(prompt, True)
        assert state.fixed == conditioner.encode(prompt, True)
        plan = conditioner.plan(state)
        assert (plan_ids(plan), plan.pending, plan.heal_prefix) == (state.fixed, b"", None)


def test_a_piece_that_is_an_own_token_at_the_boundary_is_that_token(conditioner: Conditioner) -> None:
    state = conditioner.start("hello", True)
    for token in conditioner.encode(" world, hello there", False):
        piece = conditioner._tokens[token]
        conditioner.commit(state, piece)
        assert state.fixed[-1] == token and not state.tail
        plan = conditioner.plan(state)
        assert (plan_ids(plan), plan.pending, plan.heal_prefix) == (state.fixed, b"", None)  # no extension mass


def test_a_partial_piece_stays_open_to_extension(conditioner: Conditioner) -> None:
    state = conditioner.start("hello", True)
    extendable = next(
        ids[0]
        for b in sorted({t for t in conditioner._tokens if t})
        if (ids := conditioner.ids_of(b)) and b.isascii() and conditioner.index.has_extension(b)
    )
    conditioner.commit(state, conditioner._tokens[extendable], partial=True)
    plan = conditioner.plan(state)
    assert plan.heal_prefix == conditioner._tokens[extendable] == conditioner._tokens[plan_ids(plan)[-1]]


def test_a_run_of_spaces_ending_the_text_is_also_spelt_as_before_a_word() -> None:
    """A byte-level BPE that learnt indentation spells b"\n  " at the end of a text as one token, but b"\n" +
    b" " + b" a" before a word: the plan carries that spelling (the last token open, so both are weighed
    against its probability). A run spelt alike everywhere (b"\n" alone, SentencePiece's pieces) has none."""
    tokenizer = tokenizer_factory.byte_level_bpe(corpus=tokenizer_factory.CORPUS + tokenizer_factory.CODE_CORPUS)
    tokens, special = token_byte_table(tokenizer, len(tokenizer))
    conditioner = Conditioner(tokenizer, tokens, special)
    state = conditioner.start("def f(x):", False)
    conditioner.commit(state, b"\n  ", partial=True)
    plan = conditioner.plan(state)
    assert plan.alt is not None and [tokens[i] for i in plan.extra] == [b"\n  "]
    before_word = conditioner.encode("def f(x):\n  a", False)
    assert before_word[len(state.fixed) :] == [*plan.alt.tokens, conditioner.ids_of(plan.alt.rest + b"a")[0]]
    assert [tokens[i] for i in plan.alt.tokens] == [b"\n", b" "] and plan.alt.rest == b" "
    assert plan.open == 1 and plan.branch == (len(plan) - 1, plan.alt.tokens)
    assert len(plan) - 2 in plan.rows_needed  # the row before the run gives both spellings' first tokens
    conditioner.commit(state, b"a\n", partial=True)
    assert conditioner.plan(state).alt is None
    sentencepiece = tokenizer_factory.sentencepiece_byte_fallback()
    sp = Conditioner(sentencepiece, *token_byte_table(sentencepiece, len(sentencepiece)))
    state = sp.start("def f(x):", False)
    for piece in (b"\n", b" ", b" ", b" "):
        sp.commit(state, piece, partial=True)
        assert sp.plan(state).alt is None


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_incremental_tail_tokens_equal_a_full_re_encode(conditioner: Conditioner, data: st.DataObject) -> None:
    """Text committed in pieces of any size: only the open tail (the last word) is re-encoded, with a few
    tokens of left context; the tokens equal those of re-encoding all the text after the prompt, with all
    of it as context (a conditioner that never settles), and always spell the text exactly."""
    text = data.draw(st.sampled_from(tokenizer_factory.CORPUS)).encode()
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=8, unique=True)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) if text[a:b]]
    whole = Conditioner(
        conditioner._tokenizer, conditioner._tokens, conditioner._special, settle=False, anchor_tokens=10**6
    )
    prompt = "line one\n"
    fast, slow = conditioner.start(prompt, True), whole.start(prompt, True)
    for piece in pieces:
        conditioner.commit(fast, piece, partial=True)
        whole.commit(slow, piece, partial=True)
        plan = conditioner.plan(fast)
        assert plan_ids(plan) == plan_ids(whole.plan(slow))
        if conditioner._tokenizer.unk_token_id not in plan_ids(plan):  # <unk> stands for bytes it does not spell
            assert _spelled(conditioner, fast) + fast.tail == fast.generated
    assert len(fast.tail) <= len(text)


def _paths(c: Conditioner, plan: Plan, prompt_len: int) -> list[tuple[list[int], bytes]]:
    """What a plan's distribution counts: (tokens of the text after the prompt, bytes the next token must start
    with): after all its tokens, and in place of each open level's tokens."""
    tail = list(plan_ids(plan)[prompt_len:])
    paths = [(tail, plan.pending)]
    for j, prefix in enumerate(plan.levels):
        paths.append((tail[: len(tail) - (plan.open - j)], prefix))
    return paths


@pytest.mark.parametrize("char", ["🙂", "你", "é", "🚀", "🤖", "🎉"])
def test_a_split_character_keeps_the_tokenizers_own_spelling_of_it_reachable(
    conditioner: Conditioner, char: str
) -> None:
    """Cut anywhere inside a character written by others, the text's tokens and open levels still count the
    tokens the tokenizer writes for the whole text: the next of them either follows the plan's tokens, or
    extends the bytes of an open level (never a spelling with single-byte tokens it would not write)."""
    prompt, text = "a", (" " + char + " ok").encode()
    prompt_ids = conditioner.encode(prompt, True)
    whole = conditioner.encode(prompt + text.decode(), True)
    if whole[: len(prompt_ids)] != prompt_ids or conditioner._tokenizer.unk_token_id in whole:
        pytest.skip("the tokenizer merges across the prompt, or cannot spell the character")
    canonical = whole[len(prompt_ids) :]
    for cut in range(1, len(text.split(b" ok")[0]) + 1):
        state = conditioner.start(prompt, True)
        conditioner.commit(state, text[:cut], partial=True)
        plan = conditioner.plan(state)
        assert b"".join(conditioner._tokens[i] for i in plan_ids(plan)[len(prompt_ids) :]) + plan.pending == text[:cut]
        # The canonical tokens that end within the cut text, then the one that holds the next byte.
        ends = list(itertools.accumulate(len(conditioner._tokens[i]) for i in canonical))
        done = next(k for k, end in enumerate(ends) if end > cut)
        before, spanning = canonical[:done], conditioner._tokens[canonical[done]]
        start = ends[done - 1] if done else 0
        reachable = [
            tokens == before and len(spanning) > len(rest) and spanning.startswith(rest)
            for tokens, rest in _paths(conditioner, plan, len(prompt_ids))
            if len(rest) == cut - start
        ]
        at_boundary = ends[done - 1] == cut if done else False
        assert any(reachable) or (at_boundary and list(plan_ids(plan)[len(prompt_ids) :]) == before), (
            char,
            cut,
            [conditioner._tokens[i] for i in canonical],
            plan,
        )


def test_rollback_returns_to_the_state_of_fewer_pieces(conditioner: Conditioner) -> None:
    pieces = [b" the", b" qu", b"ick", b" br", "ö".encode()[:1], "ö".encode()[1:], b"wn"]
    for keep in range(len(pieces)):
        state, expected = conditioner.start("x", True), conditioner.start("x", True)
        for piece in pieces:
            conditioner.commit(state, piece)
        for piece in pieces[:keep]:
            conditioner.commit(expected, piece)
        conditioner.rollback(state, sum(len(p) for p in pieces[keep:]))
        assert state.generated == expected.generated
        assert plan_ids(conditioner.plan(state))[: len(state.fixed)] == state.fixed
        assert _spelled(conditioner, state) + state.tail == state.generated
