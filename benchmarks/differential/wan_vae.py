"""Golden cases of the Wan2.2 video VAE (`wan_vae`), computed by the reference's `ovi/modules/vae2_2.py`.

    python -m benchmarks.differential.wan_vae --reference DIR --out DIR [--seed S] [--cases N]

Each case draws its own tiny config and weights: encoder width `dim` and decoder width `dec_dim`
(any width: the VAE's norms are RMS norms, and the shortcuts' channel averaging only needs the width
ratios of `dim_mult` to divide), 1 to 3 residual blocks, `dim_mult` (3 to 5 levels) and
`temperal_downsample` (one flag per downsampling level), kept to what the reference builds and runs;
z_dim stays 48, the size of the latent statistics. Weights: the reference's own initialisation, then
every RMS gain and every attention output projection (zero-initialised upstream) redrawn, saved with
the key names of `Wan2.2_VAE.pth`. The reference loads them through its own loader (`_video_vae`,
given the decoder width and block count that `Wan2_2_VAE` does not pass on) into its `Wan2_2_VAE`
wrapper, and the outputs are what Ovi takes from it, in float32 on the CPU: `wrapped_encode` (the
normalised posterior mean) and `wrapped_decode` (clamped), plus the raw mu and the unclamped video
from the same model with the normalisation `scale=[0, 1]` / without the clamp.
"""

from __future__ import annotations

import functools
import random
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.differential import ComponentWriter, generator_main, seeded, shapes
from benchmarks.reference import load_module

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
Z_DIM = 48  # the reference wrapper's latent statistics have 48 channels
# the manifests' `call`, with the config's temporal (t) and spatial (s) compression: 4 and 16 for Wan2.2
ENCODE_CALL = (
    "encode(video in [-1,1], [B,3,T,H,W]) -> posterior mean, normalised: "
    "latent = (mu - mean) * (1/std) per channel"
)
DECODE_CALL = (
    "decode(normalised latent [B,48,Tl,h,w]): z_raw = latent * std + mean -> decoder -> video "
    "[B,3,1+{t}(Tl-1),{s}h,{s}w]; video = clamp(video_unclamped,-1,1) (as the pipeline does)"
)


def draw_config(rng: random.Random, module: Any, max_temporal: int) -> dict[str, Any]:
    """A tiny config the reference builds (its shortcut asserts pass), with at most `max_temporal`
    time-downsampling levels (encode runs 4-frame chunks: a third halving would have 1 frame left)."""
    while True:
        levels = rng.choice([3, 4, 4, 4, 5])
        dim_mult = [1, 2, 4, 4] if levels == 4 and rng.random() < 0.4 else [rng.choice([1, 1, 2])]
        while len(dim_mult) < levels:
            dim_mult.append(rng.choice([1, 2, 3, 4]))
        downs = levels - 1
        temperal = [rng.random() < 0.5 for _ in range(downs)]
        if levels == 4 and rng.random() < 0.5:
            temperal = [False, True, True]  # Wan2.2's
        if sum(temperal) > max_temporal:
            continue
        config = {
            "dim": rng.randint(2, 12),
            "dec_dim": rng.randint(2, 16),
            "z_dim": Z_DIM,
            "dim_mult": dim_mult,
            "num_res_blocks": rng.randint(1, 3),
            # stored but read by no layer of the reference's residual (Wan2.2) encoder and decoder
            "attn_scales": [] if rng.random() < 0.7 else rng.choice([[1.0], [0.5], [0.25, 0.125]]),
            "temperal_downsample": temperal,
            "dropout": 0.0,
        }
        try:
            with torch.device("meta"):
                module.WanVAE_(**config)
        except AssertionError:  # AvgDown3D / DupUp3D: a width ratio that does not divide
            continue
        return config


def manifest_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the manifests write it: the reference's arguments plus derived facts."""
    spatial = 2 * 2 ** (len(config["dim_mult"]) - 1)
    return {
        **config,
        "patch_size": 2,
        "in_channels_after_patchify": 12,
        "spatial_compression": spatial,
        "temporal_compression": 2 ** sum(config["temperal_downsample"]),
        "causal_time_padding": "front, kernel-1 frames (2 for k=3)",
    }


def random_weights(module: Any, config: dict[str, Any], generator: torch.Generator) -> dict[str, Tensor]:
    """The reference model's state dict (`Wan2.2_VAE.pth` names) with its default init, RMS gains and
    attention output projections redrawn."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        model = module.WanVAE_(**config)
    state_dict = model.state_dict()
    for key, value in state_dict.items():
        if key.endswith(".gamma"):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)  # U(0.5, 1.5)
        elif ".proj." in key:
            bound = 1.0 / (value.shape[1] ** 0.5) if key.endswith("weight") else 0.1
            value.copy_((torch.rand(value.shape, generator=generator) * 2 - 1) * bound)
    return {k: v.contiguous() for k, v in state_dict.items()}


def reference_vae(module: Any, config: dict[str, Any], weights: dict[str, Tensor]) -> Any:
    """`Wan2_2_VAE` on the CPU in float32, its model loaded by the reference's `_video_vae` from a
    .pth of `weights`; the decoder width and block count are passed to `_video_vae`, which forwards
    them to `WanVAE_` (the wrapper itself only passes z_dim, dim, dim_mult, temperal_downsample)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "Wan2.2_VAE.pth"
        torch.save(weights, path)
        original = module._video_vae
        module._video_vae = functools.partial(
            original,
            dec_dim=config["dec_dim"],
            num_res_blocks=config["num_res_blocks"],
            attn_scales=config["attn_scales"],
            dropout=config["dropout"],
        )
        try:
            vae = module.Wan2_2_VAE(
                z_dim=config["z_dim"],
                c_dim=config["dim"],
                vae_pth=str(path),
                dim_mult=config["dim_mult"],
                temperal_downsample=config["temperal_downsample"],
                dtype=torch.float32,
                device="cpu",
            )
        finally:
            module._video_vae = original
    loaded = vae.model.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    return vae


def diffusers_maxabs(config: dict[str, Any], weights: dict[str, Tensor], outputs: dict[str, Tensor]) -> Any:
    """max |diffusers' AutoencoderKLWan - reference| (the manifests' note); None where it refuses."""
    from ovi_server.config import VideoVAEConfig
    from ovi_server.media.video_vae import build_autoencoder, remap_official

    try:
        ours = {k: config[k] for k in ("dim", "dec_dim", "z_dim", "num_res_blocks")}
        vae_config = VideoVAEConfig(
            **ours,
            dim_mult=tuple(config["dim_mult"]),
            temperal_downsample=tuple(config["temperal_downsample"]),
        )
        autoencoder = build_autoencoder(vae_config)
        autoencoder.load_state_dict(remap_official(weights), strict=True, assign=True)
        autoencoder = nn.Module.to(autoencoder, dtype=torch.float32).eval()
        with torch.no_grad():
            if "video" in outputs and "latent_unnormalized" in outputs:
                got = autoencoder.encode(outputs["video"]).latent_dist.mean
                return float((got - outputs["latent_unnormalized"]).abs().max())
            z = outputs["latent"] / outputs["inv_std"] + outputs["mean"]
            return float((autoencoder.decode(z).sample - outputs["video"]).abs().max())
    except Exception:  # a note only; `golden check` reports what our code makes of such a config
        return None


def generate(reference: Path, out: Path, rng: random.Random, cases: int) -> None:
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    module = load_module(reference, "ovi.modules.vae2_2")
    writer = ComponentWriter(out, "wan_vae", format="safetensors + manifest.json")
    torch.set_grad_enabled(False)
    constants_written = False
    for index in range(2 * cases):
        encode = index < cases
        config = draw_config(rng, module, max_temporal=2 if encode else 3)
        generator = seeded(rng)
        weights = random_weights(module, config, generator)
        vae = reference_vae(module, config, weights)
        mean, inv_std = (s.float() for s in vae.scale)
        if not constants_written:
            writer.tensors(
                "wan22_latent_norm_constants.safetensors",
                {"latents_mean": mean, "latents_std": 1.0 / inv_std, "latents_inv_std": inv_std},
            )
            constants_written = True
        spec = manifest_config(config)
        spatial = spec["spatial_compression"]
        if encode:
            frames = 1 + 4 * rng.randint(0, 3)
            # multiples of the spatial compression (16 for Wan2.2), which the reference needs
            height, width = (
                spatial * rng.randint(1, max(1, 48 // spatial)),
                spatial * rng.randint(1, max(1, 64 // spatial)),
            )
            video = torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1  # [B, 3, T, H, W]
            tensors = {
                "video": video,
                "latent": vae.wrapped_encode(video),
                "latent_unnormalized": vae.model.encode(video, scale=[0.0, 1.0]).float(),
            }
            name = f"wan_enc_{index}_{frames}f_{height}x{width}"
            inputs, outputs = ["video"], ["latent", "latent_unnormalized"]
            call = ENCODE_CALL
        else:
            latent_frames, h, w = rng.randint(1, 5), rng.randint(1, 3), rng.randint(1, 3)
            latent = torch.randn(1, Z_DIM, latent_frames, h, w, generator=generator)  # [B, 48, Tl, h, w]
            unclamped = vae.model.decode(latent, vae.scale).float()
            tensors = {"latent": latent, "video_unclamped": unclamped, "video": vae.wrapped_decode(latent)}
            assert torch.equal(tensors["video"], unclamped.clamp(-1, 1))
            name = f"wan_dec_{index - cases}_{latent_frames}latents_{h}x{w}"
            inputs, outputs = ["latent"], ["video_unclamped", "video"]
            call = DECODE_CALL.format(t=spec["temporal_compression"], s=spatial)
        weight_file = writer.tensors(f"{name}_weights.safetensors", weights)
        input_file = writer.tensors(f"{name}.safetensors", tensors)
        extra = {}
        if not encode:
            outside = (tensors["video_unclamped"].abs() > 1).float().mean()
            extra["fraction_of_values_outside_[-1,1]"] = float(outside)
        note = {**tensors, "mean": mean.view(1, -1, 1, 1, 1), "inv_std": inv_std.view(1, -1, 1, 1, 1)}
        writer.case(
            name=name,
            call=call,
            config=spec,
            weight_file=weight_file,
            weight_format="state dict with the key names of Wan2.2_VAE.pth",
            input_file=input_file,
            inputs=shapes({k: tensors[k] for k in inputs}),
            outputs=shapes({k: tensors[k] for k in outputs}),
            **extra,
            dtype="float32",
            tolerance=TOLERANCE,
            diffusers_AutoencoderKLWan_maxabs_diff=diffusers_maxabs(config, weights, note),
        )
        print(f"  {name}: {config}", flush=True)
    writer.close()


if __name__ == "__main__":
    sys.exit(generator_main(generate))
