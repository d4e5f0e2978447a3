"""Golden cases of the umt5 text encoder: the case's weight file goes through `load_umt5`, as the real one does."""

from __future__ import annotations

from typing import Any

from ovi_server.config import T5Config
from ovi_server.engine.device import CPU_FP32
from ovi_server.golden.cases import CaseResult, Comparison, GoldenCase
from ovi_server.models.t5 import (
    ByteTokenizer,
    PromptTokenizer,
    TextEncoder,
    clean_prompt,
    load_tokenizer,
    load_umt5,
    relative_bucket_ids,
    tokenize,
    trim_contexts,
)

# reference `T5Encoder` argument (as written in the manifests) -> our T5Config field
_CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "dim": "dim",
    "dim_attn": "dim_attn",
    "dim_ffn": "dim_ffn",
    "num_heads": "num_heads",
    "encoder_layers": "num_layers",
    "num_layers": "num_layers",
    "num_buckets": "num_buckets",
    "relative_max_distance": "relative_max_distance",
    "layer_norm_eps": "eps",
    "eps": "eps",
    "text_len": "text_len",
}


def t5_config(reference: dict[str, Any]) -> T5Config:
    """A manifest's reference config as our T5Config; fails on switches our encoder does not have."""
    if reference.get("decoder_layers", 0) or reference.get("shared_pos", False):
        raise ValueError(f"only the encoder-only, per-layer-bias umt5 is supported, got {reference}")
    return T5Config(
        **{ours: reference[theirs] for theirs, ours in _CONFIG_NAMES.items() if theirs in reference}
    )


def run_case(case: GoldenCase) -> CaseResult:
    config = t5_config(case.config)
    tokenizer: PromptTokenizer = (
        load_tokenizer(case.path("tokenizer_file"))
        if "tokenizer_file" in case.spec
        else ByteTokenizer(config.vocab_size)
    )
    encoder = TextEncoder(load_umt5(case.weight_path(), config, CPU_FP32), tokenizer, config, CPU_FP32)
    expected = case.tensors
    check = Comparison(case.tolerance)

    if "prompts" in case.spec:
        prompts = case.spec["prompts"]
        if "cleaned_prompts" in case.spec:
            check.exact("cleaned_prompts", [clean_prompt(p) for p in prompts], case.spec["cleaned_prompts"])
        ids, mask = tokenize(prompts, tokenizer, config.text_len)
        check.tensor("input_ids", ids, expected["input_ids"])
        check.tensor("attention_mask", mask, expected["attention_mask"])
        contexts = encoder.encode(prompts)  # the server's call, from prompt to trimmed contexts
    else:
        ids, mask = expected["input_ids"], expected["attention_mask"]
        contexts = None

    hidden = encoder(ids, mask)  # [B, L, dim]
    check.tensor("last_hidden_state", hidden, expected["last_hidden_state"])
    if contexts is None:
        contexts = trim_contexts(hidden, mask)
    for i, context in enumerate(contexts):
        if f"context_{i}" in expected:
            check.tensor(f"context_{i}", context, expected[f"context_{i}"])
    n_expected = sum(name.startswith("context_") for name in expected)
    if n_expected != len(contexts):
        check.exact("number of contexts", len(contexts), n_expected)
    if "relative_bucket_ids" in expected:
        length = expected["relative_bucket_ids"].shape[0]
        check.tensor(
            "relative_bucket_ids", relative_bucket_ids(encoder.umt5, length), expected["relative_bucket_ids"]
        )
    return check.result(case)
