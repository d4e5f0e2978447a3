"""The reference implementation (character-ai/Ovi), loaded from a user's checkout for side-by-side timing.

Nothing of the reference is copied into this repository: `load_reference(DIR)` imports four of its
files from DIR at run time, and files under DIR are never written. What changes between the files on
disk and what runs (the same two deviations as the golden generators, tests/golden/README.md):

* Only `ovi/modules/{attention,model,fusion}.py`, `ovi/distributed_comms/{parallel_states,communications}.py`
  and `ovi/utils/fm_solvers_unipc.py` are imported. The packages `ovi`, `ovi.modules`, `ovi.utils` are
  registered as empty namespaces so their `__init__.py` files (which import the T5, VAE and tokenizer
  stacks, cv2, omegaconf, optimum.quanto, ...) do not run; none of those is on the timed path.
* `flash_attention` is replaced by `sdpa_attention` below (same arguments, same semantics) whenever
  flash-attn is not importable or the device is not CUDA.
* On CPU (float32) the source of model.py and fusion.py is loaded with `.bfloat16()` -> `.float()` and
  `torch.bfloat16` -> `torch.float32`: its hard-coded bf16 casts are active even on CPU, and bf16
  matmuls on a CPU would time something the server never runs. On CUDA the source runs verbatim (bf16),
  and on a CPU too with `verbatim=True` (benchmarks/drift.py: bf16 numerics under emulated CUDA autocast).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovi_server.config import DiTConfig

# ours -> theirs: module name, path under DIR, whether the bf16 casts are rewritten on CPU
_MODULES = (
    ("ovi.distributed_comms.parallel_states", "ovi/distributed_comms/parallel_states.py", False),
    ("ovi.distributed_comms.communications", "ovi/distributed_comms/communications.py", False),
    ("ovi.modules.attention", "ovi/modules/attention.py", False),
    ("ovi.modules.model", "ovi/modules/model.py", True),
    ("ovi.modules.fusion", "ovi/modules/fusion.py", True),
    ("ovi.utils.fm_solvers_unipc", "ovi/utils/fm_solvers_unipc.py", False),
)
_PACKAGES = ("ovi", "ovi.modules", "ovi.utils", "ovi.distributed_comms")
_LOADED: dict[tuple[Path, bool], Reference] = {}
FP32_SUBSTITUTIONS = ((".bfloat16()", ".float()"), ("torch.bfloat16", "torch.float32"))


@dataclass
class Reference:
    """The imported reference modules and what was changed on the way in."""

    root: Path
    fusion_module: types.ModuleType
    solver_module: types.ModuleType
    attention: str  # "flash-attn" or "sdpa (substituted)"
    float32_source: bool  # bf16 casts rewritten to float32

    def build_fusion(self, video: DiTConfig, audio: DiTConfig, state_dict: dict[str, Tensor]) -> nn.Module:
        """The reference FusionModel with our config and our weights (the key names are the same)."""
        with torch.device("meta"):
            model = self.fusion_module.FusionModel(_reference_kwargs(video), _reference_kwargs(audio))
        model.load_state_dict(state_dict, strict=True, assign=True)
        # rope tables are plain attributes (not buffers) and were built on the meta device
        model.set_rope_params()
        return model.eval().requires_grad_(False)

    def make_scheduler(self, steps: int, shift: float, device: torch.device) -> Any:
        """FlowUniPCMultistepScheduler exactly as its `OviFusionEngine.get_scheduler_time_steps("unipc")`."""
        scheduler = self.solver_module.FlowUniPCMultistepScheduler(
            num_train_timesteps=1000, shift=1, use_dynamic_shifting=False
        )
        scheduler.set_timesteps(steps, device=device, shift=shift)
        return scheduler


def _reference_kwargs(cfg: DiTConfig) -> dict[str, Any]:
    """Our DiTConfig fields carry the reference's `WanModel` argument names (config.py)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def flash_attn_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("flash_attn", "flash_attn_interface"))


def load_reference(root: str | Path, device: torch.device, verbatim: bool | None = None) -> Reference:
    """Imports the reference's model, fusion and UniPC solver from a checkout at `root` (read only).

    `verbatim`: run its source as written, bf16 casts included (default: on CUDA only; benchmarks/drift.py
    asks for it on a CPU, where it emulates CUDA autocast).
    """
    root = Path(root).resolve()
    missing = [rel for _, rel, _ in _MODULES if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} does not look like a character-ai/Ovi checkout: missing {', '.join(missing)}"
        )
    float32_source = not verbatim if verbatim is not None else device.type != "cuda"
    if (root, float32_source) in _LOADED:  # a second caller in the same process gets the same modules
        return _LOADED[(root, float32_source)]
    namespace_packages(root, _PACKAGES)
    if device.type != "cuda":
        # its `autocast('cuda', ...)` blocks warn on every call without CUDA; they are no-ops here
        warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported")
    loaded = {
        name: _load_source(name, root / rel, FP32_SUBSTITUTIONS if rewrite and float32_source else ())
        for name, rel, rewrite in _MODULES
    }
    use_flash = device.type == "cuda" and flash_attn_available()
    if not use_flash:
        # both import the function object by name, so both names are rebound
        for name in ("ovi.modules.model", "ovi.modules.fusion"):
            loaded[name].flash_attention = sdpa_attention
    reference = Reference(
        root=root,
        fusion_module=loaded["ovi.modules.fusion"],
        solver_module=loaded["ovi.utils.fm_solvers_unipc"],
        attention="flash-attn" if use_flash else "sdpa (substituted for flash_attention)",
        float32_source=float32_source,
    )
    _LOADED[(root, float32_source)] = reference
    return reference


def load_module(
    root: str | Path, name: str, substitutions: Sequence[tuple[str, str]] = ()
) -> types.ModuleType:
    """One reference module (e.g. "ovi.modules.t5") executed from the checkout at `root` under its own
    name. The packages above it are registered as empty namespaces, as `load_reference` does, so no
    `__init__.py` of the reference runs; the golden generators (benchmarks/differential) load what they
    compute this way, one process each."""
    root = Path(root).resolve()
    parts = name.split(".")
    path = root.joinpath(*parts).with_suffix(".py")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {root} a character-ai/Ovi checkout?")
    if name in sys.modules:
        if getattr(sys.modules[name], "__file__", None) != str(path):
            raise RuntimeError(f"a module named {name!r} is already imported from elsewhere")
        return sys.modules[name]
    for depth in range(1, len(parts)):
        package_name = ".".join(parts[:depth])
        folder = str(root.joinpath(*parts[:depth]))
        if package_name in sys.modules:
            if list(getattr(sys.modules[package_name], "__path__", ())) != [folder]:
                raise RuntimeError(
                    f"a module named {package_name!r} is already imported; use a fresh process"
                )
            continue
        package = types.ModuleType(package_name)
        package.__path__ = [folder]
        sys.modules[package_name] = package
        if depth > 1:
            setattr(sys.modules[".".join(parts[: depth - 1])], parts[depth - 1], package)
    return _load_source(name, path, substitutions)


def namespace_packages(root: Path, packages: Sequence[str]) -> None:
    """Registers `packages` (dotted names under `root`) as empty packages, so their `__init__.py` files
    do not run; their modules then import normally, with the reference's own package names."""
    taken = [name for name in packages if name in sys.modules]
    if taken:
        raise RuntimeError(
            f"a module named {taken[0]!r} is already imported; run the benchmark in a fresh process"
        )
    for name in packages:
        package = types.ModuleType(name)
        package.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = package


# modules the engine file imports at its top that are not dependencies of ours; stand-ins, never called
# on the paths the differential generators drive (text encoder, VAEs, Flux, quantisation, file I/O)
_ENGINE_STANDINS = {
    "cv2": {},
    "pandas": {},
    "pydub": {"AudioSegment": None},
    "omegaconf": {"OmegaConf": types.SimpleNamespace(load=lambda path: {})},
    "optimum": {},
    "optimum.quanto": {"freeze": None, "qint8": None, "quantize": None},
    "ovi.utils.model_loading_utils": {
        name: None
        for name in (
            "init_fusion_score_model_ovi",
            "init_text_model",
            "init_mmaudio_vae",
            "init_wan_vae_2_2",
            "load_fusion_checkpoint",
        )
    },
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install_stand_ins(stand_ins: Mapping[str, Mapping[str, Any]]) -> None:
    """Registers an empty module with the given attributes for each name not already importable (the
    reference's own `ovi.*` modules always), so a reference file's top-level imports succeed."""
    for module_name, attributes in stand_ins.items():
        if module_name in sys.modules or (not module_name.startswith("ovi.") and _installed(module_name)):
            continue
        module = types.ModuleType(module_name)
        module.__spec__ = importlib.machinery.ModuleSpec(module_name, None)
        module.__dict__.update(attributes)
        sys.modules[module_name] = module


def load_engine(reference: Reference) -> types.ModuleType:
    """Imports the reference's `ovi/ovi_fusion_engine.py` (with `ovi/utils/fm_solvers.py` and
    `processing_utils.py`) into the process that already ran `load_reference`.

    Third-party modules the file imports only for paths not driven here (cv2, pandas, pydub, omegaconf,
    optimum.quanto) and the checkpoint loaders are stand-ins when not installed; `OviFusionEngine`
    is then built with `__new__` and given its model, text encoder and VAEs by the caller
    (benchmarks/differential/fusion.py), since its `__init__` loads the real checkpoints.
    """
    name = "ovi.ovi_fusion_engine"
    if name in sys.modules:
        return sys.modules[name]
    install_stand_ins(_ENGINE_STANDINS)
    load_module(reference.root, "ovi.utils.fm_solvers")
    load_module(reference.root, "ovi.utils.processing_utils")
    return load_module(reference.root, name)


def _load_source(name: str, path: Path, substitutions: Sequence[tuple[str, str]]) -> types.ModuleType:
    """Executes `path` as module `name`, with textual substitutions applied to its source in memory."""
    source = path.read_text()
    for old, new in substitutions:
        if old not in source:
            raise RuntimeError(f"{path}: expected to find {old!r} to substitute; is this a newer reference?")
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    module.__package__ = name.rpartition(".")[0]
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    setattr(sys.modules[module.__package__], name.rpartition(".")[2], module)
    return module


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_lens: Tensor | None = None,
    k_lens: Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    version: int | None = None,
) -> Tensor:
    """The reference's `flash_attention` on SDPA: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    Keys at positions >= k_lens[b] are excluded and every query row is kept (the reference never passes
    q_lens). When no key is hidden no mask is passed, as our `attention()` does, so both sides get the
    same SDPA kernel.
    """
    if q_lens is not None or causal or tuple(window_size) != (-1, -1) or dropout_p or q_scale is not None:
        raise NotImplementedError("the benchmark's flash_attention stand-in covers the calls Ovi makes")
    mask = None
    if k_lens is not None and not bool((k_lens >= k.shape[1]).all()):
        positions = torch.arange(k.shape[1], device=k.device)
        mask = (positions[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale
    )
    return out.transpose(1, 2).type_as(q)


def sequence_lengths(model: nn.Module, video: Tensor, audio: Tensor) -> tuple[int, int]:
    """Token counts as the reference's `generate` computes them: F·H·W / (patch_h·patch_w) and L."""
    _, patch_h, patch_w = model.video_model.patch_size
    return video.shape[1] * video.shape[2] * video.shape[3] // (patch_h * patch_w), audio.shape[0]


def reference_step_loop(
    model: nn.Module,
    video_noise: Tensor,
    audio_noise: Tensor,
    contexts: tuple[Tensor, Tensor, Tensor],
    schedulers: tuple[Any, Any],
    video_guidance_scale: float,
    audio_guidance_scale: float,
    slg_layer: int,
    dtype: torch.dtype,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The body of the reference's `OviFusionEngine.generate` sampling loop (t2v), one yield per step.

    Yields the (video, audio) latents after each step; the caller reads its clock between yields.
    """
    positive, video_negative, audio_negative = contexts
    scheduler_video, scheduler_audio = schedulers
    device = video_noise.device
    video_seq_len, audio_seq_len = sequence_lengths(model, video_noise, audio_noise)
    for t_v, t_a in zip(scheduler_video.timesteps, scheduler_audio.timesteps, strict=True):
        # the contexts are opened per step and closed before the yield: the caller runs our steps
        # between yields, and they must not run under the reference's autocast
        with (
            torch.inference_mode(),
            torch.amp.autocast(device.type, enabled=dtype != torch.float32, dtype=dtype),
        ):
            timestep_input = torch.full((1,), t_v, device=device)
            pred_vid_pos, pred_audio_pos = model(
                vid=[video_noise],
                audio=[audio_noise],
                t=timestep_input,
                vid_context=[positive],
                audio_context=[positive],
                vid_seq_len=video_seq_len,
                audio_seq_len=audio_seq_len,
                first_frame_is_clean=False,
            )
            pred_vid_neg, pred_audio_neg = model(
                vid=[video_noise],
                audio=[audio_noise],
                t=timestep_input,
                vid_context=[video_negative],
                audio_context=[audio_negative],
                vid_seq_len=video_seq_len,
                audio_seq_len=audio_seq_len,
                first_frame_is_clean=False,
                slg_layer=slg_layer,
            )
            pred_video = pred_vid_neg[0] + video_guidance_scale * (pred_vid_pos[0] - pred_vid_neg[0])
            pred_audio = pred_audio_neg[0] + audio_guidance_scale * (pred_audio_pos[0] - pred_audio_neg[0])
            video_noise = scheduler_video.step(
                pred_video.unsqueeze(0), t_v, video_noise.unsqueeze(0), return_dict=False
            )[0].squeeze(0)
            audio_noise = scheduler_audio.step(
                pred_audio.unsqueeze(0), t_a, audio_noise.unsqueeze(0), return_dict=False
            )[0].squeeze(0)
        yield video_noise, audio_noise


def reference_forward(
    model: nn.Module,
    video: Tensor,
    audio: Tensor,
    t: Tensor,
    video_context: Tensor,
    audio_context: Tensor,
    dtype: torch.dtype,
    slg_layer: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[Tensor, Tensor]:
    """One forward as the reference's loop makes it (slg_layer > 0: its negative pass), under the
    device's autocast in `dtype`, or under `autocast` when given (benchmarks/drift.py's emulation)."""
    video_seq_len, audio_seq_len = sequence_lengths(model, video, audio)
    if autocast is None:
        autocast = torch.amp.autocast(video.device.type, enabled=dtype != torch.float32, dtype=dtype)
    with torch.inference_mode(), autocast:
        video_pred, audio_pred = model(
            vid=[video],
            audio=[audio],
            t=t.reshape(1),
            vid_context=[video_context],
            audio_context=[audio_context],
            vid_seq_len=video_seq_len,
            audio_seq_len=audio_seq_len,
            first_frame_is_clean=False,
            slg_layer=slg_layer,
        )
    return video_pred[0], audio_pred[0]
