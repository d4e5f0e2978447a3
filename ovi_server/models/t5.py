"""umt5-xxl text encoder: prompt cleaning, tokenisation, and the encoder Ovi conditions on.

The encoder is transformers' `UMT5EncoderModel`: it computes the same function as the reference's
own `T5Encoder` (tests/golden/README.md, section `t5`: max |diff| ~1e-6 in float32), so we reuse it
instead of keeping a second copy of T5. Weights come from the official
`models_t5_umt5-xxl-enc-bf16.pth` and are renamed by `remap_official` at the end of this file.

Ovi encodes `[prompt, video_negative_prompt, audio_negative_prompt]` in one batch and hands the
DiT one context per prompt, trimmed to its real tokens (`TextEncoder.encode`); the DiT pads them
back to `text_len` rows itself.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import ftfy
import sentencepiece
import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from ovi_server.config import T5Config
from ovi_server.errors import WeightsError
from ovi_server.models.loading import (
    check_keys,
    init_random_,
    load_module,
    meta_device,
    read_state_dict,
    rename_key,
)
from ovi_server.placement import Placement

logger = logging.getLogger(__name__)

# umt5's special ids (google/umt5-xxl and the golden tiny sentencepiece model agree): no BOS.
PAD_ID = 0
EOS_ID = 1


# --- prompt cleaning and tokenisation --------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The reference's `whitespace_clean(basic_clean(text))`.

    ftfy repairs mojibake, HTML entities are unescaped twice (prompts scraped from the web can be
    escaped twice, e.g. `&amp;amp;`), then every whitespace run becomes one space. Ovi's tags
    (`<S>...<E>`, `<AUDCAP>...<ENDAUDCAP>`) are kept: the encoder was trained on them.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer(Protocol):
    """Cleaned prompts -> (ids, attention mask), both [B, text_len] int64.

    Each row is the prompt's pieces truncated to `text_len - 1`, then EOS (id 1), then PAD (id 0);
    the mask is 1 on the pieces and the EOS.
    """

    def __call__(self, texts: Sequence[str], text_len: int) -> tuple[Tensor, Tensor]: ...


def pack_ids(pieces: Sequence[Sequence[int]], text_len: int) -> tuple[Tensor, Tensor]:
    """Truncates each piece list to `text_len - 1` so EOS always survives, appends EOS, right-pads."""
    ids = torch.full((len(pieces), text_len), PAD_ID, dtype=torch.long)  # [B, text_len]
    mask = torch.zeros((len(pieces), text_len), dtype=torch.long)  # [B, text_len]
    for row, seq in enumerate(pieces):
        kept = [*seq[: text_len - 1], EOS_ID]
        ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        mask[row, : len(kept)] = 1
    return ids, mask


class HFTokenizer:
    """A Hugging Face tokenizer folder (`google/umt5-xxl`): the exact call the reference makes."""

    def __init__(self, folder: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def __call__(self, texts: Sequence[str], text_len: int) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out.input_ids.long(), out.attention_mask.long()


class SentencePieceTokenizer:
    """A bare sentencepiece `.model` file (the golden tiny tokenizer, or an `spiece.model` alone).

    For umt5, `AutoTokenizer` on the same model yields the sentencepiece ids plus EOS, so this
    reproduces the reference without needing transformers' tokenizer conversion (which wants protobuf).
    """

    def __init__(self, model_file: Path):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def __call__(self, texts: Sequence[str], text_len: int) -> tuple[Tensor, Tensor]:
        return pack_ids([self.processor.encode(text) for text in texts], text_len)


class ByteTokenizer:
    """UTF-8 bytes folded into the vocabulary; for the random-weight `tiny` variant only.

    The tiny demo model has no checkpoint and therefore no tokenizer files, yet the pipeline must
    run end to end on a laptop. Ids are meaningless to a trained encoder: never use this with real
    weights (`load_text_encoder` requires a real tokenizer).
    """

    def __init__(self, vocab_size: int):
        if vocab_size <= EOS_ID + 2:
            raise ValueError(f"ByteTokenizer needs a vocabulary larger than 3, got {vocab_size}")
        self.vocab_size = vocab_size

    def __call__(self, texts: Sequence[str], text_len: int) -> tuple[Tensor, Tensor]:
        # ids 0..2 are pad/eos/unk in umt5; bytes start at 3 and wrap inside small vocabularies.
        first = EOS_ID + 2
        span = self.vocab_size - first
        return pack_ids([[first + b % span for b in text.encode("utf-8")] for text in texts], text_len)


def load_tokenizer(path: str | Path) -> PromptTokenizer:
    """A tokenizer from a Hugging Face folder, a sentencepiece `.model` file, or a folder holding only one."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return HFTokenizer(path)
        if (path / "spiece.model").is_file():
            return SentencePieceTokenizer(path / "spiece.model")
    raise WeightsError(
        f"{path}: no tokenizer found (expected a folder with tokenizer.json / spiece.model, "
        "such as <weights>/Wan2.2-TI2V-5B/google/umt5-xxl, or a sentencepiece .model file)"
    )


def tokenize(prompts: Sequence[str], tokenizer: PromptTokenizer, text_len: int) -> tuple[Tensor, Tensor]:
    """Cleans and tokenises prompts: (ids, mask), both [B, text_len] int64."""
    return tokenizer([clean_prompt(p) for p in prompts], text_len)


# --- the encoder ----------------------------------------------------------------------------------


def umt5_config(config: T5Config) -> UMT5Config:
    """Our `T5Config` (the reference's argument names) as a transformers config."""
    return UMT5Config(
        vocab_size=config.vocab_size,
        d_model=config.dim,
        d_kv=config.dim_attn // config.num_heads,
        d_ff=config.dim_ffn,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.relative_max_distance,
        # the reference's FFN: fc2(fc1(x) * gelu_tanh(gate(x))); "gelu_new" is the tanh approximation
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        layer_norm_epsilon=config.eps,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        # eager is the path that adds the per-layer relative-position bias to the logits
        attn_implementation="eager",
    )


def build_umt5(config: T5Config) -> UMT5EncoderModel:
    """The encoder on the meta device (no memory); `load_module` or `init_random_` materialise it."""
    with meta_device():
        return UMT5EncoderModel(umt5_config(config))


def relative_bucket_ids(umt5: UMT5EncoderModel, length: int) -> Tensor:
    """Bucket of every (query i, key j) pair, [length, length] int64; the same for every layer."""
    positions = torch.arange(length, dtype=torch.long)
    relative = positions[None, :] - positions[:, None]  # [L, L]: key - query
    attention = umt5.encoder.block[0].layer[0].SelfAttention
    return attention._relative_position_bucket(relative)


class TextEncoder(nn.Module):
    """Tokenizer + umt5 encoder: prompts -> one context [L_i, dim] per prompt."""

    def __init__(
        self, umt5: UMT5EncoderModel, tokenizer: PromptTokenizer, config: T5Config, placement: Placement
    ):
        super().__init__()
        self.umt5 = umt5
        self.tokenizer = tokenizer
        self.config = config
        self.placement = placement

    def layers(self) -> list[nn.Module]:
        """What runs, in order, once per forward: the embedding table, then each block (the unit the
        engine streams onto the device when the encoder visits it layer by layer)."""
        return [self.umt5.shared, *self.umt5.encoder.block]

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask [B, L] -> last_hidden_state [B, L, dim]; padded rows are computed and meaningless."""
        # the device the encoder computes on: the final norm is there whether the whole encoder is
        # resident, visits as a whole, or visits layer by layer (it is not one of `layers`)
        device = self.umt5.encoder.final_layer_norm.weight.device
        return self.umt5(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[Tensor]:
        """One [L_i, dim] context per prompt (rows up to its EOS), in the placement dtype."""
        ids, mask = tokenize(prompts, self.tokenizer, self.config.text_len)
        hidden = self(ids, mask)  # [B, text_len, dim]
        return [context.to(self.placement.dtype) for context in trim_contexts(hidden, mask)]


def trim_contexts(hidden: Tensor, mask: Tensor) -> list[Tensor]:
    """hidden [B, L, dim], mask [B, L] -> per row the first mask-sum rows, [L_i, dim] (the reference's trim)."""
    return [hidden[i, :n] for i, n in enumerate(mask.sum(dim=1).tolist())]


def official_keys(config: T5Config) -> set[str]:
    """Every key of `models_t5_umt5-xxl-enc-bf16.pth` for this config."""
    keys = {"token_embedding.weight", "norm.weight"}
    for i in range(config.num_layers):
        keys |= {
            f"blocks.{i}.{name}.weight"
            for name in (
                "norm1",
                "attn.q",
                "attn.k",
                "attn.v",
                "attn.o",
                "norm2",
                "ffn.gate.0",
                "ffn.fc1",
                "ffn.fc2",
                "pos_embedding.embedding",
            )
        }
    return keys


def load_text_encoder(
    weights_path: str | Path,
    tokenizer_path: str | Path,
    config: T5Config,
    placement: Placement,
) -> TextEncoder:
    """The encoder from an official-layout checkpoint (`.pth` or `.safetensors`), loaded strictly."""
    return TextEncoder(
        load_umt5(weights_path, config, placement), load_tokenizer(tokenizer_path), config, placement
    )


def load_umt5(weights_path: str | Path, config: T5Config, placement: Placement) -> UMT5EncoderModel:
    """The bare encoder from an official-layout checkpoint (`.pth` or `.safetensors`), loaded strictly."""
    official = read_state_dict(weights_path)
    # Checked in the official naming first, so an error names the keys as they are in the file.
    check_keys(weights_path, official_keys(config), set(official), "text encoder (umt5)")
    umt5 = build_umt5(config)
    # transformers holds the embedding twice (`shared`, `encoder.embed_tokens`, tied): detach the
    # second so the one official table is converted and moved once, then share the module.
    umt5.encoder.embed_tokens = None
    load_module(
        umt5, remap_official(dict(official)), placement, path=weights_path, what="text encoder (umt5)"
    )
    umt5.encoder.embed_tokens = umt5.shared
    logger.info(
        "loaded text encoder from %s (%d layers, dim %d)", weights_path, config.num_layers, config.dim
    )
    return umt5


def random_text_encoder(
    config: T5Config,
    tokenizer: PromptTokenizer | str | Path | None,
    placement: Placement,
    seed: int,
    fill_device: torch.device | None = None,
) -> TextEncoder:
    """Random weights (tiny demo variant, benchmarks). `tokenizer=None` picks the `ByteTokenizer`;
    `fill_device`: see `init_random_`."""
    if tokenizer is None:
        tokenizer = ByteTokenizer(config.vocab_size)
    elif isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)
    umt5 = build_umt5(config)
    umt5.encoder.embed_tokens = None  # as in load_umt5: one table (2 GiB for umt5-xxl), then shared
    init_random_(umt5, placement, seed, fill_device)
    umt5.encoder.embed_tokens = umt5.shared
    return TextEncoder(umt5, tokenizer, config, placement)


# --- official checkpoint -> transformers names ------------------------------------------------------

# (official key pattern, UMT5EncoderModel key); shapes are identical, nothing is transposed.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"token_embedding\.weight", r"shared.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"norm\.weight", r"encoder.final_layer_norm.weight"),
)


def remap_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official umt5 keys -> `UMT5EncoderModel` keys, the embedding as `shared.weight` only
    (`load_umt5` ties `encoder.embed_tokens` to it). Unknown keys pass through and fail the strict load."""
    return {rename_key(key, _RENAMES): tensor for key, tensor in sd.items()}
