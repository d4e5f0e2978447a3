"""umt5 text encoder: golden parity through the real loader, strict keys, cleaning, tokenisation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GOLDEN_DIR, golden_cases
from safetensors.torch import load_file, save_file

from ovi_server.config import load_variant
from ovi_server.engine.device import CPU_FP32
from ovi_server.errors import WeightsError
from ovi_server.golden.cases import GoldenCase
from ovi_server.golden.run_t5 import t5_config
from ovi_server.models.t5 import (
    EOS_ID,
    PAD_ID,
    ByteTokenizer,
    HFTokenizer,
    TextEncoder,
    clean_prompt,
    load_text_encoder,
    load_tokenizer,
    load_umt5,
    random_text_encoder,
    relative_bucket_ids,
    tokenize,
    trim_contexts,
)

TINY_SPIECE = GOLDEN_DIR / "t5" / "tiny_spiece.model"
TINY_WEIGHTS = GOLDEN_DIR / "t5" / "t5_tiny_weights.safetensors"


@pytest.mark.parametrize("case", golden_cases("t5"), ids=lambda c: c.name)
def test_t5_matches_reference(case: GoldenCase) -> None:
    config = t5_config(case.config)
    umt5 = load_umt5(case.weight_path(), config, CPU_FP32)
    encoder = TextEncoder(umt5, load_tokenizer(TINY_SPIECE), config, CPU_FP32)
    expected = case.tensors
    if "prompts" in case.spec:
        ids, mask = tokenize(case.spec["prompts"], encoder.tokenizer, config.text_len)
        assert torch.equal(ids, expected["input_ids"])
        assert torch.equal(mask, expected["attention_mask"])
        contexts = encoder.encode(case.spec["prompts"])
    else:
        ids, mask = expected["input_ids"], expected["attention_mask"]
        contexts = trim_contexts(encoder(ids, mask), mask)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), expected["last_hidden_state"], **case.tolerance)
    for i, context in enumerate(contexts):
        torch.testing.assert_close(context, expected[f"context_{i}"], **case.tolerance)
    if "relative_bucket_ids" in expected:
        buckets = relative_bucket_ids(umt5, expected["relative_bucket_ids"].shape[0])
        assert torch.equal(buckets.int(), expected["relative_bucket_ids"])


def test_cleaned_prompts_match_reference() -> None:
    case = next(c for c in golden_cases("t5") if "cleaned_prompts" in c.spec)
    assert [clean_prompt(p) for p in case.spec["prompts"]] == case.spec["cleaned_prompts"]


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("  two\t\tspaces \n\n and lines  ", "two spaces and lines"),
        ("fish &amp;amp; chips", "fish & chips"),  # unescaped twice
        ("caf\u00c3\u00a9 au lait", "caf\u00e9 au lait"),  # mojibake repaired by ftfy
        ("<S>Hi!<E> <AUDCAP>rain<ENDAUDCAP>", "<S>Hi!<E> <AUDCAP>rain<ENDAUDCAP>"),  # tags and case kept
    ],
)
def test_clean_prompt(raw: str, cleaned: str) -> None:
    assert clean_prompt(raw) == cleaned


@pytest.mark.parametrize("tokenizer", [load_tokenizer(TINY_SPIECE), ByteTokenizer(256)], ids=["spm", "bytes"])
def test_tokenize_truncates_keeping_eos_and_pads(tokenizer) -> None:
    long_prompt = "Rain drums on the tin roof while thunder rumbles far away " * 4
    ids, mask = tokenize([long_prompt, "hi", ""], tokenizer, text_len=10)
    assert ids.shape == mask.shape == (3, 10)
    assert ids.dtype == mask.dtype == torch.long
    assert ids[0, -1] == EOS_ID and mask[0].all()  # truncated, EOS still last
    n = int(mask[1].sum())
    assert 1 < n < 10 and ids[1, n - 1] == EOS_ID
    assert (ids[1, n:] == PAD_ID).all() and not mask[1, n:].any()
    assert ids[2, 0] == EOS_ID and mask[2].tolist() == [1] + [0] * 9  # empty prompt: EOS only
    assert int(ids.max()) < 256


def test_sentencepiece_ids_are_plain_encode_plus_eos() -> None:
    tokenizer = load_tokenizer(TINY_SPIECE)
    text = "A small dog runs across a sunny park."
    pieces = tokenizer.processor.encode(text)
    ids, mask = tokenize([f"  {text}\n"], tokenizer, text_len=len(pieces) + 3)
    assert ids[0].tolist() == [*pieces, EOS_ID, PAD_ID, PAD_ID]
    assert mask[0].tolist() == [1] * (len(pieces) + 1) + [0, 0]


@pytest.fixture
def hf_tokenizer_folder(tmp_path):
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) equivalent to the tiny
    sentencepiece model: the layout of the real `google/umt5-xxl` folder, built without downloads."""
    import sentencepiece
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    processor = sentencepiece.SentencePieceProcessor(model_file=str(TINY_SPIECE))
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", EOS_ID)]
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "extra_ids": 0}))
    return tmp_path


def test_hugging_face_tokenizer_folder_matches_reference(hf_tokenizer_folder) -> None:
    case = next(c for c in golden_cases("t5") if "prompts" in c.spec)
    tokenizer = load_tokenizer(hf_tokenizer_folder)
    assert isinstance(tokenizer, HFTokenizer)  # the reference's AutoTokenizer call
    ids, mask = tokenize(case.spec["prompts"], tokenizer, t5_config(case.config).text_len)
    assert torch.equal(ids, case.tensors["input_ids"])  # truncation keeps EOS, padding is 0
    assert torch.equal(mask, case.tensors["attention_mask"])


def test_contexts_do_not_depend_on_batch_padding() -> None:
    config = t5_config(golden_cases("t5")[0].config)
    encoder = load_text_encoder(TINY_WEIGHTS, TINY_SPIECE, config, CPU_FP32)
    alone = encoder.encode(["a dog barks"])
    batched = encoder.encode(["a dog barks", "the chef chops onions and tosses them into a hot pan"])
    assert alone[0].shape == (int(tokenize(["a dog barks"], encoder.tokenizer, 64)[1].sum()), config.dim)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    assert batched[1].shape[0] > batched[0].shape[0]


def _write_weights(tmp_path, edit) -> tuple:
    state_dict = load_file(str(TINY_WEIGHTS))
    edit(state_dict)
    path = tmp_path / "models_t5_umt5-xxl-enc.safetensors"
    save_file(state_dict, str(path))
    return path, t5_config(golden_cases("t5")[0].config)


def test_missing_key_is_a_weights_error(tmp_path) -> None:
    path, config = _write_weights(tmp_path, lambda sd: sd.pop("blocks.1.ffn.fc2.weight"))
    with pytest.raises(
        WeightsError, match=r"models_t5_umt5-xxl-enc\.safetensors.*missing.*blocks\.1\.ffn\.fc2\.weight"
    ):
        load_umt5(path, config, CPU_FP32)


def test_unexpected_key_is_a_weights_error(tmp_path) -> None:
    path, config = _write_weights(
        tmp_path, lambda sd: sd.update({"blocks.0.attn.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(
        WeightsError, match=r"models_t5_umt5-xxl-enc\.safetensors.*unexpected.*blocks\.0\.attn\.extra\.weight"
    ):
        load_umt5(path, config, CPU_FP32)


def test_wrong_shape_is_a_weights_error(tmp_path) -> None:
    path, config = _write_weights(tmp_path, lambda sd: sd.update({"norm.weight": torch.ones(7)}))
    with pytest.raises(WeightsError, match="final_layer_norm"):
        load_umt5(path, config, CPU_FP32)


def test_random_tiny_encoder_needs_no_files() -> None:
    config = load_variant("tiny").text_encoder
    first = random_text_encoder(config, None, CPU_FP32, seed=0)
    contexts = first.encode(["a cat", "x" * 100, ""])
    assert [tuple(c.shape) for c in contexts] == [
        (6, config.dim),
        (config.text_len, config.dim),
        (1, config.dim),
    ]
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in contexts)
    again = random_text_encoder(config, None, CPU_FP32, seed=0).encode(["a cat"])
    torch.testing.assert_close(again[0], contexts[0], atol=0, rtol=0)
