"""Differential cases for `t5/` (the umt5 encoder, its cleaning and trimming) and `prompt/` (rewrites, sizes).

    python -m benchmarks.differential.t5 --reference DIR --out DIR [--seed S] [--cases N]

Everything expected comes from the reference's own code, imported from DIR at run time:

* `ovi/modules/t5.py`: `umt5_xxl(encoder_only=True, ...)` with a random tiny config and random weights
  (official key names), and `T5EncoderModel.__call__` for the per-prompt trim. Its module-level default
  `device=torch.cuda.current_device()` is evaluated on import, so that call answers "cpu" while it loads.
* `ovi/modules/tokenizers.py`: `HuggingfaceTokenizer.__call__` with `clean="whitespace"` (its own
  `basic_clean` / `whitespace_clean`). Only the `AutoTokenizer` inside is stood in for by the golden tiny
  sentencepiece model plus EOS (tests/golden/README.md, section t5: for umt5 the two give the same ids;
  converting the `.model` into a transformers tokenizer needs protobuf, which we do not depend on).
* `ovi/utils/processing_utils.py`: `clean_text`, `format_prompt_for_filename`, `snap_hw_to_multiple_of_32`,
  `scale_hw_to_area_divisible`, `preprocess_image_tensor` (a real PIL image; the output size is read).
  Its imports of cv2, pandas and pydub serve other functions and are stubbed when not installed.
* `ovi/ovi_fusion_engine.py` cannot be imported without its whole stack (diffusers' Flux, omegaconf,
  optimum-quanto, a config file at import): `NAME_TO_MODEL_SPECS_MAP` (formatters, areas, latent lengths)
  and `generate`'s area-warning test are taken out of its syntax tree and executed alone.
"""

from __future__ import annotations

import ast
import math
import random
import re
import sys
import types
from pathlib import Path
from typing import Any
from unittest import mock

import sentencepiece
import torch
from PIL import Image
from torch import Tensor

from benchmarks.differential import ComponentWriter, generator_main, seeded, shapes
from benchmarks.reference import install_stand_ins, load_module

TINY_SPIECE = Path(__file__).resolve().parents[2] / "tests" / "golden" / "t5" / "tiny_spiece.model"
TOLERANCE = {"atol": 1e-05, "rtol": 1e-05}
ENCODER_CALL = (
    "encoder(input_ids, attention_mask) -> last_hidden_state [B, L, dim]; "
    "then per prompt i: context_i = last_hidden_state[i, :attention_mask[i].sum()]"
)
TOKENIZED_CALL = (
    "clean(prompt) -> sentencepiece ids + eos(1), truncate to text_len, right-pad with 0 "
    "-> encoder -> trim per prompt"
)
WEIGHT_FORMAT = (
    "state dict with the key names of models_t5_umt5-xxl-enc-bf16.pth (float32 here instead of bf16)"
)
VIDEO_LATENT_CHANNELS = 48  # the engine's `video_latent_channel`
AUDIO_LATENT_CHANNELS = 20
AUDIO_SAMPLES_PER_LATENT = 512  # MMAudio 16 kHz: 512 waveform samples per latent step


# --- the reference, loaded from the checkout ----------------------------------------------------------


class Reference:
    """The reference functions the cases are computed with."""

    def __init__(self, root: Path):
        self.tokenizers = load_module(root, "ovi.modules.tokenizers")
        with mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
            self.t5 = load_module(root, "ovi.modules.t5")
        install_stand_ins({"cv2": {}, "pandas": {}, "pydub": {"AudioSegment": None}})
        self.processing = load_module(root, "ovi.utils.processing_utils")
        engine = ast.parse((root / "ovi" / "ovi_fusion_engine.py").read_text())
        namespace: dict[str, Any] = {"re": re}
        exec(
            compile(ast.Module([_assignment(engine, "NAME_TO_MODEL_SPECS_MAP")], []), "engine", "exec"),
            namespace,
        )
        self.model_specs: dict[str, dict[str, Any]] = namespace["NAME_TO_MODEL_SPECS_MAP"]
        generate = next(
            n for n in ast.walk(engine) if isinstance(n, ast.FunctionDef) and n.name == "generate"
        )
        self._input_area = compile(
            ast.Expression(_assignment(generate, "input_area").value), "input_area", "eval"
        )
        warning_test = next(
            n.test
            for n in ast.walk(generate)
            if isinstance(n, ast.If) and "input_area" in ast.unparse(n.test)
        )
        self._area_warning = compile(ast.Expression(warning_test), "area_warning", "eval")

    def area_warning(self, h: int, w: int, target_area: int) -> bool:
        """`generate`'s test for "the requested area is more than 10 % off the model's"."""
        namespace = {
            "video_frame_height_width": (h, w),
            "self": types.SimpleNamespace(target_area=target_area),
        }
        namespace["input_area"] = eval(self._input_area, namespace)
        return bool(eval(self._area_warning, namespace))

    def encoder_wrapper(self, model: torch.nn.Module, tokenizer: Any) -> Any:
        """`T5EncoderModel` around a given encoder and tokenizer (its __init__ loads files and a tokenizer)."""
        wrapper = object.__new__(self.t5.T5EncoderModel)
        wrapper.model, wrapper.tokenizer = model, tokenizer
        return wrapper

    def tokenizer(self, text_len: int) -> Any:
        """`HuggingfaceTokenizer(seq_len=text_len, clean="whitespace")` over the tiny sentencepiece model."""
        tokenizer = object.__new__(self.tokenizers.HuggingfaceTokenizer)
        tokenizer.name, tokenizer.seq_len, tokenizer.clean = str(TINY_SPIECE), text_len, "whitespace"
        tokenizer.tokenizer = SentencePieceAsTransformers(TINY_SPIECE)
        return tokenizer


def _assignment(tree: ast.AST, name: str) -> ast.Assign:
    return next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)
    )


class SentencePieceAsTransformers:
    """What `AutoTokenizer(google/umt5-xxl)(texts, padding="max_length", truncation=True, max_length=n,
    add_special_tokens=True, return_tensors="pt")` returns, on a bare sentencepiece model: pieces
    truncated to n-1, EOS (1), right-padded with PAD (0), mask 1 on pieces and EOS."""

    def __init__(self, model_file: Path):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        expected = {"return_tensors", "padding", "truncation", "max_length", "add_special_tokens"}
        if set(kwargs) != expected or kwargs["padding"] != "max_length" or not kwargs["add_special_tokens"]:
            raise NotImplementedError(f"the stand-in covers the reference's one call, got {kwargs}")
        length = kwargs["max_length"]
        ids = torch.zeros((len(texts), length), dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            kept = [*self.processor.encode(text)[: length - 1], self.processor.eos_id()]
            ids[row, : len(kept)] = torch.tensor(kept)
            mask[row, : len(kept)] = 1
        return types.SimpleNamespace(input_ids=ids, attention_mask=mask)


class FixedTokenizer:
    """Hands `T5EncoderModel.__call__` drawn ids and mask instead of tokenising."""

    def __init__(self, ids: Tensor, mask: Tensor):
        self.ids, self.mask = ids, mask

    def __call__(self, texts: list[str], **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self.ids, self.mask


# --- t5 -------------------------------------------------------------------------------------------------


def draw_t5_config(rng: random.Random, text_len: int, min_vocab: int) -> dict[str, Any]:
    """`min_vocab`: the tokenizer's size (the tokenized case shares the weights)."""
    num_heads = rng.choice([1, 2, 3, 4, 6])
    return {
        "vocab_size": rng.randrange(min_vocab, 513),
        "dim": rng.choice([16, 24, 32, 40, 48, 64]),
        "dim_attn": num_heads * rng.choice([4, 8, 12, 16]),
        "dim_ffn": rng.choice([16, 40, 64, 96, 128]),
        "num_heads": num_heads,
        "encoder_layers": rng.randint(1, 3),
        "decoder_layers": 0,
        "num_buckets": rng.choice([32, 32, 32, 8, 16, 20, 33, 64]),
        "shared_pos": False,
        "dropout": 0.0,
        "text_len": text_len,
        # the reference's T5RelativeEmbedding keeps its default max_dist=128; nothing passes another
        "relative_max_distance": 128,
        "layer_norm_eps": 1e-06,
        "inference_mode": "eval (dropout inactive)",
    }


def build_encoder(reference: Reference, config: dict[str, Any], rng: random.Random) -> torch.nn.Module:
    """The reference encoder as `T5EncoderModel` builds it, every weight random (norm gains away from 1)."""
    kwargs = {k: config[k] for k in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_buckets")}
    model = reference.t5.umt5_xxl(
        encoder_only=True,
        return_tokenizer=False,
        dtype=torch.float32,
        device="cpu",
        encoder_layers=config["encoder_layers"],
        decoder_layers=0,
        **kwargs,
    )
    model = model.eval().requires_grad_(False)
    generator = seeded(rng)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif key.endswith("pos_embedding.embedding.weight"):
            state[key] = torch.randn(value.shape, generator=generator) * 0.5
        elif key == "token_embedding.weight":
            state[key] = torch.randn(value.shape, generator=generator)
        else:  # Linear [out, in]: fan-in scaling, q a little smaller so the position bias matters
            scale = value.shape[1] ** -0.5 * (0.5 if key.endswith("attn.q.weight") else 1.0)
            state[key] = torch.randn(value.shape, generator=generator) * scale
    model.load_state_dict(state, strict=True)
    return model


def draw_batch(rng: random.Random, config: dict[str, Any], long: bool) -> tuple[Tensor, Tensor]:
    """Right-padded rows of different true lengths, each ending in EOS (1); padding is PAD (0)."""
    text_len = config["text_len"]
    batch = rng.randint(1, 4)
    lengths = [rng.randint(1, text_len) for _ in range(batch)]
    lengths[rng.randrange(batch)] = rng.choice(
        [text_len, rng.randint(129, text_len)] if long else [text_len, 1]
    )
    ids = torch.zeros((batch, text_len), dtype=torch.long)
    mask = torch.zeros((batch, text_len), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = torch.tensor(
            [rng.randrange(2, config["vocab_size"]) for _ in range(length - 1)]
        )
        ids[row, length - 1] = 1
        mask[row, :length] = 1
    return ids, mask


def t5_cases(reference: Reference, writer: ComponentWriter, rng: random.Random, cases: int) -> None:
    min_vocab = sentencepiece.SentencePieceProcessor(model_file=str(TINY_SPIECE)).get_piece_size()
    for index in range(cases):
        long = index % 2 == 1 or rng.random() < 0.25
        text_len = rng.randint(129, 200) if long else rng.randint(4, 64)
        config = draw_t5_config(rng, text_len, min_vocab)
        model = build_encoder(reference, config, rng)
        name = f"t5_random_{index}"
        weight_file = writer.tensors(f"{name}_weights.safetensors", model.state_dict())

        ids, mask = draw_batch(rng, config, long)
        with torch.no_grad():
            hidden = model(ids, mask)  # [B, L, dim]
            contexts = reference.encoder_wrapper(model, FixedTokenizer(ids, mask))([""] * len(ids), "cpu")
        inputs = {"input_ids": ids, "attention_mask": mask}
        outputs = {"last_hidden_state": hidden, **{f"context_{i}": c for i, c in enumerate(contexts)}}
        if long:
            positions = torch.arange(text_len)
            relative = positions[None, :] - positions[:, None]  # key - query
            buckets = model.blocks[0].pos_embedding._relative_position_bucket(relative)
            outputs["relative_bucket_ids"] = buckets.int()
        writer.case(
            name=name,
            call=ENCODER_CALL,
            config=config,
            weight_file=weight_file,
            weight_format=WEIGHT_FORMAT,
            input_file=writer.tensors(f"{name}.safetensors", {**inputs, **outputs}),
            inputs=_described(inputs),
            outputs=_described(outputs),
            dtype="float32",
            tolerance=TOLERANCE,
            notes=f"true lengths {mask.sum(1).tolist()} padded to text_len={text_len}",
        )

        # the same encoder on prompts, through the reference's cleaning, tokeniser call and trim
        # as `generate` calls it: [prompt, video_negative_prompt, audio_negative_prompt], negatives often ""
        prompts = [draw_prompt(rng, for_encoder=True)]
        if rng.random() < 0.4:  # longer than text_len pieces: truncation keeps EOS last
            prompts[0] = " ".join([prompts[0]] * rng.randint(4, 12))
        prompts += [rng.choice(["", " \n ", draw_prompt(rng, for_encoder=True)]) for _ in range(2)]
        tokenizer = reference.tokenizer(text_len)
        with torch.no_grad():
            ids, mask = tokenizer(prompts, return_mask=True, add_special_tokens=True)
            hidden = model(ids, mask)
            contexts = reference.encoder_wrapper(model, tokenizer)(prompts, "cpu")
        outputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "last_hidden_state": hidden,
            **{f"context_{i}": c for i, c in enumerate(contexts)},
        }
        writer.case(
            name=f"{name}_tokenized",
            call=TOKENIZED_CALL,
            tokenizer_file="tiny_spiece.model",
            prompts=prompts,
            cleaned_prompts=[tokenizer._clean(p) for p in prompts],
            config=config,
            weight_file=weight_file,
            weight_format=WEIGHT_FORMAT,
            input_file=writer.tensors(f"{name}_tokenized.safetensors", outputs),
            outputs=_described(outputs),
            dtype="float32",
            tolerance={**TOLERANCE, "ids": "exact"},
        )
    writer.copy(TINY_SPIECE)


def _described(tensors: dict[str, Tensor]) -> dict[str, list[Any]]:
    return {k: [shape, str(tensors[k].dtype).removeprefix("torch.")] for k, shape in shapes(tensors).items()}


# --- prompts ----------------------------------------------------------------------------------------------

WORDS = (
    "a", "dog", "runs", "across", "the", "park", "rain", "on", "tin", "roof", "chef", "chops", "onions",
    "Audio", "audio:", "Audio:", "S", "E", "/", "a/b", "caf\u00e9", "na\u00efve", "\u65e5\u672c\u8a9e",
    "\U0001f600", "\u00bd", "\ufb01sh", "caf\u00c3\u00a9", "don\u00e2\u20ac\u2122t", "&amp;", "&amp;amp;",
    "&lt;S&gt;", "&#39;", "&quot;hi&quot;", "<s>", "<e>", "<audcap>", "<b>", "x<y", "y>z",
)  # fmt: skip
SPACES = (
    " ",
    " ",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \u00a0",
    "\u3000",
    "\u2009",
    "\r\n",
    "   ",
    "\x0b",
    "\x1c",
    "\x85",
    "\u2028",
)
TAGS = ("<S>", "<E>", "<AUDCAP>", "<ENDAUDCAP>", "Audio:", "Audio: ")


def _words(rng: random.Random, low: int, high: int) -> str:
    parts = []
    for _ in range(rng.randint(low, high)):
        parts += [rng.choice(WORDS), rng.choice(SPACES)]
    return "".join(parts[:-1]) if parts else ""


def draw_prompt(rng: random.Random, for_encoder: bool = False) -> str:
    """A prompt with Ovi's markup in well- and ill-formed arrangements, odd spacing and unicode."""
    pieces: list[str] = []
    for _ in range(rng.randint(0 if not for_encoder else 1, 6)):
        kind = rng.random()
        if kind < 0.35:
            pieces.append(_words(rng, 1, 6))
        elif kind < 0.55:
            pieces.append(f"<S>{_words(rng, 0, 4)}<E>")
        elif kind < 0.7:
            pieces.append(f"<AUDCAP>{_words(rng, 0, 4)}<ENDAUDCAP>")
        elif kind < 0.8:
            pieces.append(f"{rng.choice(['Audio:', 'Audio: ', 'Audio:  '])}{_words(rng, 0, 5)}")
        else:
            pieces.append(rng.choice(TAGS))  # a stray or unclosed tag
    prompt = "".join(p + rng.choice(("", *SPACES)) for p in pieces)
    if rng.random() < 0.3:
        prompt = rng.choice(SPACES) + prompt + rng.choice(SPACES)
    return prompt


def prompt_sub_case(reference: Reference, prompt: str) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "prompt": prompt,
        "clean_text": reference.processing.clean_text(prompt),
        "format_prompt_for_filename": reference.processing.format_prompt_for_filename(prompt),
    }
    for model, spec in reference.model_specs.items():
        formatted = spec["formatter"](prompt)
        sub[f"formatter_{model}"] = formatted
        sub[f"changed_{model}"] = formatted != prompt
    return sub


def draw_hw(rng: random.Random, area: int | None = None) -> tuple[int, int]:
    """Sizes around the models' areas, small ones, extreme aspect ratios, and (given `area`) areas at
    the edges of the +-10 % warning band."""
    kind = rng.random()
    if area is not None and kind < 0.5:
        h = rng.randint(100, 1500)
        if kind < 0.2:
            return h, max(1, round(rng.choice([0.9, 1.1]) * area / h) + rng.randint(-1, 1))
        return h, max(1, round(rng.uniform(0.85, 1.15) * area / h))
    if kind < 0.4:
        return rng.randint(200, 1400), rng.randint(200, 1400)
    if kind < 0.6:
        return rng.randint(1, 64), rng.randint(1, 64)
    side, long_side = rng.randint(1, 40), rng.randint(300, 2000)
    return (side, long_side) if rng.random() < 0.5 else (long_side, side)


def t2v_sub_case(reference: Reference, model: str, h: int, w: int) -> dict[str, Any]:
    spec = reference.model_specs[model]
    area, frames_latent, audio_latent = (
        spec["video_area"],
        spec["video_latent_length"],
        spec["audio_latent_length"],
    )
    snapped_h, snapped_w = reference.processing.snap_hw_to_multiple_of_32(h, w, area=area)
    latent_h, latent_w = snapped_h // 16, snapped_w // 16  # as `generate`
    return {
        "requested_hw": [h, w],
        "target_area": area,
        "area_warning": reference.area_warning(h, w, area),
        "snapped_hw": [snapped_h, snapped_w],
        "video_latent_shape": [VIDEO_LATENT_CHANNELS, frames_latent, latent_h, latent_w],
        # `generate`: F·h·w // (patch_h·patch_w) with the DiT patch (1, 2, 2)
        "video_tokens": frames_latent * latent_h * latent_w // 4,
        "video_latent_hw_odd": latent_h % 2 == 1 or latent_w % 2 == 1,
        "audio_latent_shape": [audio_latent, AUDIO_LATENT_CHANNELS],
        "num_frames": 1 + 4 * (frames_latent - 1),
        "audio_samples_16k": audio_latent * AUDIO_SAMPLES_PER_LATENT,
        "model": model,
    }


def i2v_sub_case(reference: Reference, h: int, w: int, area: int) -> dict[str, Any]:
    image = Image.new("RGB", (w, h), (90, 140, 200))
    frame = reference.processing.preprocess_image_tensor(image, "cpu", torch.float32, resize_total_area=area)
    resized_h, resized_w = frame.shape[-2:]
    side = math.isqrt(area)
    return {
        "image_hw": [h, w],
        "target_area": area,
        "resized_hw": [resized_h, resized_w],
        "resized": (resized_h, resized_w) != (h, w),
        "video_latent_hw": [resized_h // 16, resized_w // 16],
        "model_area_name": f"{side}*{side}" if side * side == area else str(area),
    }


def prompt_cases(reference: Reference, writer: ComponentWriter, rng: random.Random, cases: int) -> None:
    models = list(reference.model_specs)
    areas = sorted({spec["video_area"] for spec in reference.model_specs.values()})
    prompts = ["", "<S><E>", "Audio:", "<AUDCAP><ENDAUDCAP>"] + [draw_prompt(rng) for _ in range(8 * cases)]
    t2v = [
        t2v_sub_case(reference, m, *draw_hw(rng, reference.model_specs[m]["video_area"]))
        for _ in range(4 * cases)
        for m in models
    ]
    i2v = []
    for _ in range(4 * cases):
        h, w = draw_hw(rng)
        # `preprocess_image_tensor` takes any area; <= 0 leaves the size alone (then at least 32)
        area = rng.choice([*areas, rng.randint(1, 64 * 64), rng.randint(1, 400) * 1024, 0])
        i2v.append(i2v_sub_case(reference, h, w, area))
    flux = []
    for _ in range(4 * cases):
        h, w = draw_hw(rng)
        got = reference.processing.scale_hw_to_area_divisible(h, w, area=1024 * 1024, n=16)
        flux.append({"hw": [h, w], "scale_hw_to_area_divisible_1024sq_n16": list(got)})
    data = {
        "prompt_cases": [prompt_sub_case(reference, p) for p in prompts],
        "t2v_shape_cases": t2v,
        "i2v_resize_cases": i2v,
        "t2i2v_flux_size_cases": flux,
    }
    input_file = writer.json("prompt_and_shapes.json", data)
    calls = {
        "prompt_cases": (
            "per prompt: clean_text(p), format_prompt_for_filename(p), formatter of each model name "
            "(engine rewrites the prompt with it before T5)",
            "str",
        ),
        "t2v_shape_cases": (
            "snap_hw_to_multiple_of_32(h, w, area=target_area); latent = [48, video_latent_length, H/16, W/16]; "
            "tokens = F*(H/32)*(W/32); audio latent [L, 20]; frames 1+4(F-1)",
            "int",
        ),
        "i2v_resize_cases": (
            "preprocess_image_tensor(PIL image of size hw, resize_total_area=area) output H, W "
            "(bicubic resize, no crop)",
            "int",
        ),
        "t2i2v_flux_size_cases": (
            "scale_hw_to_area_divisible(h, w, area=1024*1024, n=16) (first-frame image size in t2i2v mode)",
            "int",
        ),
    }
    for key, (call, dtype) in calls.items():
        writer.case(
            name=key,
            call=call,
            input_file=input_file,
            key=key,
            dtype=dtype,
            tolerance="exact string equality" if dtype == "str" else "exact",
        )


def generate(reference: Path, out: Path, rng: random.Random, cases: int) -> None:
    loaded = Reference(reference)
    t5 = ComponentWriter(out, "t5", format="safetensors + manifest.json")
    t5_cases(loaded, t5, rng, cases)
    t5.close()
    prompt = ComponentWriter(
        out,
        "prompt",
        reference="character-ai/Ovi ovi/ovi_fusion_engine.py NAME_TO_MODEL_SPECS_MAP formatters, generate(); "
        "ovi/utils/processing_utils.py",
    )
    prompt_cases(loaded, prompt, rng, cases)
    prompt.close()


if __name__ == "__main__":
    sys.exit(generator_main(generate))
