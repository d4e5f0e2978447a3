"""Ovi prompts: speech segments, audio captions, the per-variant rewrite and validation.

An Ovi prompt is free text with two kinds of markup (tags are case-sensitive):

* speech: `<S>words to be spoken<E>`, any number of times;
* an audio caption, written either `<AUDCAP>sound description<ENDAUDCAP>` or as a trailing
  `Audio: sound description` that runs to the end of the prompt.

Each checkpoint was trained on one caption form. Before the text encoder, the reference engine
(`OviFusionEngine.generate`) rewrites the prompt into the variant's form: the 720x720 model turns
everything after the first `Audio:` into `<AUDCAP>...<ENDAUDCAP>`, the 960x960 models turn every
`<AUDCAP>...<ENDAUDCAP>` pair into `Audio: ...`. `format_prompt` reproduces that rewrite exactly,
including its quirks (an unclosed tag passes through unchanged), because the golden vectors and the
trained models expect the reference's text byte for byte.

`validate_prompt` is stricter than the reference, which accepts anything: it rejects markup the model
would read as garbage (unclosed, nested or stray tags, empty speech) with a message that says where.
Text the reference treats as plain text (e.g. lower-case `<s>`) stays valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ovi_server.errors import InvalidInput

# The text encoder keeps 512 tokens (about 2000 characters of English); longer prompts are silently
# truncated there. 4000 characters leaves room for other scripts and tag-heavy prompts while
# refusing pastes that could never fit.
MAX_PROMPT_CHARS = 4000

SPEECH_OPEN = "<S>"
SPEECH_CLOSE = "<E>"
CAPTION_OPEN = "<AUDCAP>"
CAPTION_CLOSE = "<ENDAUDCAP>"
AUDIO_PREFIX = "Audio:"

PromptStyle = Literal["audcap", "audio_colon"]

_CLOSER_OF = {SPEECH_OPEN: SPEECH_CLOSE, CAPTION_OPEN: CAPTION_CLOSE}
_OPENER_OF = {close: open_ for open_, close in _CLOSER_OF.items()}
_KIND = {SPEECH_OPEN: "speech segment", CAPTION_OPEN: "audio caption"}
# Longest alternative first so "<E>" is never matched inside "<ENDAUDCAP>" (it cannot be: the
# characters differ after "<E", but keeping the order makes that independent of the tag set).
_TAG_RE = re.compile("|".join(re.escape(t) for t in (CAPTION_CLOSE, CAPTION_OPEN, SPEECH_OPEN, SPEECH_CLOSE)))
# Case variants the reference does not recognise; reported as warnings, never rejected.
_LOOKALIKE_RE = re.compile(r"<(s|e|audcap|endaudcap)>|\baudio:", re.IGNORECASE)

# The reference's rewrites, as regular expressions (ovi_fusion_engine.NAME_TO_MODEL_SPECS_MAP).
# "audcap": everything after the first "Audio:" (newlines included) becomes the caption.
_AUDIO_COLON_RE = re.compile(r"Audio:\s*(.*)", re.DOTALL)
# "audio_colon": every non-greedy <AUDCAP>..<ENDAUDCAP> pair becomes "Audio: ..".
_AUDCAP_PAIR_RE = re.compile(r"<AUDCAP>(.*?)<ENDAUDCAP>", re.DOTALL)


@dataclass(frozen=True)
class ParsedPrompt:
    """A validated prompt split into its parts. Offsets are 0-based character indices."""

    text: str  # the prompt as sent
    speech: tuple[str, ...]  # contents of each <S>..<E>, in order, unstripped
    audio_captions: tuple[str, ...]  # contents of each <AUDCAP>..<ENDAUDCAP>, then the "Audio:" tail
    visual: str  # `clean_text(text)`: the prompt without speech and captions
    warnings: tuple[str, ...] = ()  # things that are valid but probably not what the user meant


def format_prompt(prompt: str, style: PromptStyle) -> str:
    """The prompt rewritten into the caption form the variant was trained on (reference rewrite)."""
    if style == "audcap":
        return _AUDIO_COLON_RE.sub(r"<AUDCAP>\1<ENDAUDCAP>", prompt)
    if style == "audio_colon":
        return _AUDCAP_PAIR_RE.sub(r"Audio: \1", prompt)
    raise ValueError(f"unknown prompt style {style!r}; expected 'audcap' or 'audio_colon'")


def clean_text(prompt: str) -> str:
    """The visual part of a prompt: speech, tagged captions and everything from `Audio:` on removed.

    The reference uses it for the text-to-image first frame (t2i2v mode). Removal happens in this
    order, each pattern non-greedy, so an unclosed tag is left in place as plain text.
    """
    text = re.sub(r"<S>.*?<E>", "", prompt, flags=re.DOTALL)
    text = re.sub(r"<AUDCAP>.*?<ENDAUDCAP>", "", text, flags=re.DOTALL)
    text = re.sub(r"Audio:\s*.*", "", text, flags=re.DOTALL)
    return text.strip()


def format_prompt_for_filename(prompt: str) -> str:
    """The reference's output file stem: any `<...>` removed, spaces and slashes to `_`, 50 chars."""
    no_tags = re.sub(r"<.*?>", "", prompt)
    return no_tags.replace(" ", "_").replace("/", "_")[:50]


def validate_prompt(prompt: str, max_chars: int = MAX_PROMPT_CHARS) -> ParsedPrompt:
    """Checks the markup of a prompt and splits it; raises `InvalidInput("prompt", ...)` if malformed.

    Rejected: an empty or blank prompt, more than `max_chars` characters, a tag opened inside
    another (`<S>` inside `<S>..<E>` or inside a caption, and the reverse), a closing tag with no
    matching opening tag, a tag never closed, and a speech segment with nothing to say.
    """
    if not isinstance(prompt, str):
        raise InvalidInput("prompt", f"expected a string, got {type(prompt).__name__}", kind="string_type")
    if not prompt.strip():
        raise InvalidInput(
            "prompt",
            "the prompt is empty; describe the scene, e.g. 'A man says <S>Hello!<E> Audio: calm voice'",
        )
    if len(prompt) > max_chars:
        raise InvalidInput(
            "prompt",
            f"the prompt is {len(prompt)} characters long; the limit is {max_chars}. "
            "The text encoder reads about 512 tokens, so shorten the description.",
        )

    speech: list[str] = []
    captions: list[str] = []
    open_tag: str | None = None  # tags never nest, so one slot is the whole stack
    open_at = 0
    for match in _TAG_RE.finditer(prompt):
        tag, at = match.group(), match.start()
        if tag in _CLOSER_OF:
            if open_tag is not None:
                raise InvalidInput(
                    "prompt",
                    f"{tag} at character offset {at} opens {_article(_KIND[tag])} inside the {_KIND[open_tag]} "
                    f"opened by {open_tag} at offset {open_at}; tags cannot be nested, "
                    f"close it with {_CLOSER_OF[open_tag]} first",
                )
            open_tag, open_at = tag, at
            continue
        expected_open = _OPENER_OF[tag]
        if open_tag is not None and open_tag != expected_open:
            raise InvalidInput(
                "prompt",
                f"{tag} at character offset {at} does not match: the {_KIND[open_tag]} opened by "
                f"{open_tag} at offset {open_at} must end with {_CLOSER_OF[open_tag]}",
            )
        if open_tag is None:
            raise InvalidInput(
                "prompt",
                f"{tag} at character offset {at} has no {expected_open} before it; "
                f"add {expected_open} where the {_KIND[expected_open]} starts or remove the {tag}",
            )
        body = prompt[open_at + len(open_tag) : at]
        if open_tag == SPEECH_OPEN:
            if not body.strip():
                raise InvalidInput(
                    "prompt",
                    f"the speech segment {SPEECH_OPEN}...{SPEECH_CLOSE} at character offset {open_at} "
                    "is empty; put the words to be spoken between the tags or remove them",
                )
            speech.append(body)
        else:
            captions.append(body)
        open_tag = None
    if open_tag is not None:
        raise InvalidInput(
            "prompt",
            f"{open_tag} at character offset {open_at} is never closed; end the {_KIND[open_tag]} "
            f"with {_CLOSER_OF[open_tag]}",
        )

    tail = _AUDIO_COLON_RE.search(prompt)
    if tail is not None:
        captions.append(tail.group(1))
    return ParsedPrompt(
        text=prompt,
        speech=tuple(speech),
        audio_captions=tuple(captions),
        visual=clean_text(prompt),
        warnings=_warnings(prompt, tail),
    )


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _warnings(prompt: str, tail: re.Match[str] | None) -> tuple[str, ...]:
    """Valid but suspicious markup, worth a log line: the reference reads it differently than a user may."""
    found: list[str] = []
    for match in _LOOKALIKE_RE.finditer(prompt):
        if match.group() not in (SPEECH_OPEN, SPEECH_CLOSE, CAPTION_OPEN, CAPTION_CLOSE, AUDIO_PREFIX):
            found.append(
                f"{match.group()!r} at character offset {match.start()} is plain text: tags are "
                "case-sensitive (<S>, <E>, <AUDCAP>, <ENDAUDCAP>, Audio:)"
            )
    if tail is not None and _TAG_RE.search(prompt, tail.start()):
        found.append(
            f"text after 'Audio:' at character offset {tail.start()} contains tags; everything after "
            "'Audio:' is read as the audio caption, so put speech and tagged captions before it"
        )
    return tuple(found)
