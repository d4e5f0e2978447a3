"""Prompt markup: the reference's per-variant rewrite, clean_text, and validation messages users see."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN_DIR, golden_cases

from ovi_server.config import load_variant
from ovi_server.errors import InvalidInput
from ovi_server.golden import run_prompt
from ovi_server.prompt import (
    MAX_PROMPT_CHARS,
    clean_text,
    format_prompt,
    format_prompt_for_filename,
    validate_prompt,
)

GOLDEN_PROMPTS = json.loads((GOLDEN_DIR / "prompt" / "prompt_and_shapes.json").read_text())["prompt_cases"]


@pytest.mark.parametrize("case", golden_cases("prompt"), ids=lambda c: c.name)
def test_golden_prompt_component_passes(case):
    result = run_prompt.run_case(case)
    assert result.passed, result.detail


@pytest.mark.parametrize("sub", GOLDEN_PROMPTS, ids=lambda s: repr(s["prompt"][:30]))
def test_rewrites_match_reference(sub):
    prompt = sub["prompt"]
    assert clean_text(prompt) == sub["clean_text"]
    assert format_prompt_for_filename(prompt) == sub["format_prompt_for_filename"]
    for variant in ("720x720_5s", "960x960_5s", "960x960_10s"):
        assert format_prompt(prompt, load_variant(variant).prompt_style) == sub[f"formatter_{variant}"]


def test_720_model_wants_audcap_tags():
    assert (
        format_prompt("A dog barks. Audio: loud bark,\nwind", "audcap")
        == "A dog barks. <AUDCAP>loud bark,\nwind<ENDAUDCAP>"
    )
    # Everything after the first "Audio:" is one caption, a second "Audio:" included.
    assert format_prompt("x Audio: a Audio: b", "audcap") == "x <AUDCAP>a Audio: b<ENDAUDCAP>"


def test_960_models_want_audio_colon():
    assert format_prompt("<S>Hi<E> <AUDCAP>a<ENDAUDCAP> <AUDCAP>b<ENDAUDCAP>", "audio_colon") == (
        "<S>Hi<E> Audio: a Audio: b"
    )
    assert format_prompt("Already right. Audio: rain", "audio_colon") == "Already right. Audio: rain"


def test_unknown_style_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown prompt style"):
        format_prompt("x", "caps")  # type: ignore[arg-type]


def test_valid_prompt_is_split_into_parts():
    parsed = validate_prompt("A man talks. <S>Hello.<E> then <S>Bye.<E> <AUDCAP>calm voice<ENDAUDCAP>")
    assert parsed.speech == ("Hello.", "Bye.")
    assert parsed.audio_captions == ("calm voice",)
    assert parsed.visual == "A man talks.  then"
    assert parsed.warnings == ()

    parsed = validate_prompt("Rain on a roof. Audio: steady rain,\nthunder")
    assert parsed.speech == ()
    assert parsed.audio_captions == ("steady rain,\nthunder",)


@pytest.mark.parametrize(
    "prompt",
    [
        "A man talks. <S>Hello world.<E> Audio: calm voice, room tone.",
        "<S>one<E> and <S>two<E> <AUDCAP>a<ENDAUDCAP> mid <AUDCAP>b<ENDAUDCAP>",
        "Two lines.\nAudio: first\nsecond line",
        "Audio:no space",
        "Audio: one Audio: two",
        "No tags at all.",
        "Wrong case <s>x<e> <audcap>y<endaudcap> audio: z",  # plain text to the reference
        "<S>Hi<E>",
        "x" * MAX_PROMPT_CHARS,
    ],
)
def test_prompts_the_reference_reads_cleanly_stay_valid(prompt):
    validate_prompt(prompt)


def test_lookalike_tags_are_warned_about_not_rejected():
    parsed = validate_prompt("Wrong case <s>x<e> and <AUDCAP>ok<ENDAUDCAP>")
    assert parsed.warnings == (
        "'<s>' at character offset 11 is plain text: tags are case-sensitive (<S>, <E>, <AUDCAP>, <ENDAUDCAP>, Audio:)",
        "'<e>' at character offset 15 is plain text: tags are case-sensitive (<S>, <E>, <AUDCAP>, <ENDAUDCAP>, Audio:)",
    )


def test_tags_after_audio_colon_are_warned_about():
    parsed = validate_prompt("A room. Audio: hum <S>hello<E>")
    assert parsed.warnings == (
        "text after 'Audio:' at character offset 8 contains tags; everything after 'Audio:' is read as "
        "the audio caption, so put speech and tagged captions before it",
    )


MALFORMED = [
    (
        "",
        "the prompt is empty; describe the scene, e.g. 'A man says <S>Hello!<E> Audio: calm voice'",
    ),
    (
        " \n\t ",
        "the prompt is empty; describe the scene, e.g. 'A man says <S>Hello!<E> Audio: calm voice'",
    ),
    (
        "x" * (MAX_PROMPT_CHARS + 1),
        f"the prompt is {MAX_PROMPT_CHARS + 1} characters long; the limit is {MAX_PROMPT_CHARS}. "
        "The text encoder reads about 512 tokens, so shorten the description.",
    ),
    (
        "Unclosed <S>speech without end",
        "<S> at character offset 9 is never closed; end the speech segment with <E>",
    ),
    (
        "Unclosed <AUDCAP>caption without end",
        "<AUDCAP> at character offset 9 is never closed; end the audio caption with <ENDAUDCAP>",
    ),
    (
        "Nested <AUDCAP>outer <AUDCAP>inner<ENDAUDCAP> tail<ENDAUDCAP>",
        "<AUDCAP> at character offset 21 opens an audio caption inside the audio caption opened by "
        "<AUDCAP> at offset 7; tags cannot be nested, close it with <ENDAUDCAP> first",
    ),
    (
        "<S>a <S>b<E>",
        "<S> at character offset 5 opens a speech segment inside the speech segment opened by <S> at "
        "offset 0; tags cannot be nested, close it with <E> first",
    ),
    (
        "<S>hi <AUDCAP>x<ENDAUDCAP><E>",
        "<AUDCAP> at character offset 6 opens an audio caption inside the speech segment opened by <S> "
        "at offset 0; tags cannot be nested, close it with <E> first",
    ),
    (
        "A man. Hello<E>",
        "<E> at character offset 12 has no <S> before it; add <S> where the speech segment starts or "
        "remove the <E>",
    ),
    (
        "Rain.<ENDAUDCAP>",
        "<ENDAUDCAP> at character offset 5 has no <AUDCAP> before it; add <AUDCAP> where the audio "
        "caption starts or remove the <ENDAUDCAP>",
    ),
    (
        "a <AUDCAP>x<E>",
        "<E> at character offset 11 does not match: the audio caption opened by <AUDCAP> at offset 2 "
        "must end with <ENDAUDCAP>",
    ),
    (
        "<S>x<ENDAUDCAP>",
        "<ENDAUDCAP> at character offset 4 does not match: the speech segment opened by <S> at offset 0 "
        "must end with <E>",
    ),
    (
        "She opens her mouth. <S>  <E>",
        "the speech segment <S>...<E> at character offset 21 is empty; put the words to be spoken between "
        "the tags or remove them",
    ),
]


@pytest.mark.parametrize(("prompt", "message"), MALFORMED, ids=[repr(p[:25]) for p, _ in MALFORMED])
def test_malformed_prompt_message(prompt, message):
    with pytest.raises(InvalidInput) as info:
        validate_prompt(prompt)
    assert info.value.field == "prompt"
    assert info.value.msg == message
    assert str(info.value) == f"prompt: {message}"


def test_non_string_prompt_is_rejected():
    with pytest.raises(InvalidInput, match="expected a string, got int"):
        validate_prompt(42)  # type: ignore[arg-type]


def test_custom_length_limit():
    validate_prompt("abc", max_chars=3)
    with pytest.raises(InvalidInput, match="the limit is 3"):
        validate_prompt("abcd", max_chars=3)
