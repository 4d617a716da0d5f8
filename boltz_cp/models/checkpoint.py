"""Boltz-2 checkpoints: find, read, build the model from the checkpoint's own hyperparameters.

Upstream `boltz predict` loads `boltz2_conf.ckpt` with `Boltz2.load_from_checkpoint(...)` and
*replaces* `pairformer_args`, `msa_args` and `diffusion_process_args` with its CLI defaults, so it
can only load a 64-block model. Here the model is built from the checkpoint's OWN
`hyper_parameters`; only inference-time knobs are overridden:

* `predict_args` (recycling / sampling steps, samples, ...), `steering_args`, `use_kernels`,
  `ema=False` (as upstream);
* diffusion *sampling* parameters (`step_scale`, `noise_scale`, ... -- the keys of
  `AtomDiffusion.__init__`, none of which owns a weight);
* MSA subsampling (`subsample_msa`, `num_subsampled_msa`).

Architecture keys are never touched, and the state dict must match exactly (strict).

Random-weight checkpoints in upstream format can be written for tests with
`make_random_checkpoint` (the architectures of boltz_cp/models/presets.py); they carry the marker
`hyper_parameters["boltz_cp_random_preset"]` (Lightning's `load_from_checkpoint` drops keys that
`Boltz2.__init__` does not take, so upstream loads them too) so the CLI can warn that the
structures they produce mean nothing.
"""

from __future__ import annotations

import copy
import inspect
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltz_cp.errors import CheckpointError, ConfigError, RankFailure
from boltz_cp.models.presets import PRESETS

CHECKPOINT_NAME = "boltz2_conf.ckpt"
AFFINITY_CHECKPOINT_NAME = "boltz2_aff.ckpt"
RANDOM_MARKER = "boltz_cp_random_preset"
HF_REPO = "boltz-community/boltz-2"
HF_URL = f"https://huggingface.co/{HF_REPO}/resolve/main/{CHECKPOINT_NAME}"

# Hyperparameters that are kept as OmegaConf DictConfigs in the checkpoint: upstream's
# `Boltz2.on_load_checkpoint` reads them with attribute access (`training_args.max_lr`).
_DICTCONFIG_KEYS = ("training_args", "validation_args")

# Inference-time MSA knobs that `msa_overrides` may set (no weight depends on them).
MSA_OVERRIDE_KEYS = ("subsample_msa", "num_subsampled_msa")


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def default_cache() -> Path:
    """Upstream's cache dir: `$BOLTZ_CACHE` if set, else `~/.boltz` (`boltz.main.get_cache_path`)."""
    from boltz.main import get_cache_path

    return Path(get_cache_path())


def default_checkpoint_path(cache: Path) -> Path:
    return Path(cache) / CHECKPOINT_NAME


def default_affinity_checkpoint_path(cache: Path) -> Path:
    return Path(cache) / AFFINITY_CHECKPOINT_NAME


def _how_to_get_weights(path: Path, name: str = CHECKPOINT_NAME, setting: str = "checkpoint",
                        preset: str = "tiny") -> str:
    cache_hint = "$BOLTZ_CACHE" if os.environ.get("BOLTZ_CACHE") else "~/.boltz"
    url = f"https://huggingface.co/{HF_REPO}/resolve/main/{name}"
    return (
        f"to get the real weights, run `boltz predict` once with network access (it downloads "
        f"{name} into its cache dir, {cache_hint}), or download {name} from "
        f"the Hugging Face repo {HF_REPO} ({url}) into {path.parent}, or pass {setting}=PATH; "
        f"for testing only, make a random-weight one with "
        f"`python scripts/make_random_checkpoint.py {path} --preset {preset}`"
    )


def require_affinity_checkpoint(path: Path) -> Path:
    """`path` if it exists; else CheckpointError naming it and how to get the affinity weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        state = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"Boltz-2 affinity checkpoint not found: {path} {state} (the affinity property needs it); "
            f"{_how_to_get_weights(path, AFFINITY_CHECKPOINT_NAME, 'affinity_checkpoint', 'tiny-affinity')}"
        )
    return path


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _boltz2_cls():
    from boltz.model.models.boltz2 import Boltz2

    return Boltz2


def _plain(value: Any) -> Any:
    """DictConfig / ListConfig -> plain containers; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _as_dictconfig(value: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, Mapping) and not isinstance(value, DictConfig):
        return OmegaConf.create(dict(value))
    return value


def _init_kwargs(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The `Boltz2.__init__` keyword arguments in `hparams` (as Lightning filters them), nested
    configs as plain containers except training/validation args, which stay DictConfigs."""
    params = inspect.signature(_boltz2_cls().__init__).parameters
    out = {}
    for key, value in hparams.items():
        if key not in params or key == "self":
            continue
        if key in _DICTCONFIG_KEYS:
            out[key] = _as_dictconfig(_plain(value)) if value is not None else None
        else:
            out[key] = copy.deepcopy(_plain(value))
    return out


def summarize_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture at a glance: widths and block counts of every stack."""

    def sub(key: str) -> dict[str, Any]:
        return dict(_plain(hparams.get(key)) or {})

    pf, msa, tpl, score, conf = (
        sub("pairformer_args"),
        sub("msa_args"),
        sub("template_args"),
        sub("score_model_args"),
        sub("confidence_model_args"),
    )
    emb = sub("embedder_args")
    conf_pf = dict(conf.get("pairformer_args") or {})
    return {
        "token_s": hparams.get("token_s"),
        "token_z": hparams.get("token_z"),
        "atom_s": hparams.get("atom_s"),
        "atom_z": hparams.get("atom_z"),
        "pairformer_blocks": pf.get("num_blocks"),
        "pairformer_heads": pf.get("num_heads"),
        "msa_blocks": msa.get("msa_blocks"),
        "msa_s": msa.get("msa_s"),
        "use_templates": bool(hparams.get("use_templates", False)),
        "use_templates_v2": bool(hparams.get("use_templates_v2", False)),
        "template_blocks": tpl.get("template_blocks") if hparams.get("use_templates") else None,
        "template_dim": tpl.get("template_dim") if hparams.get("use_templates") else None,
        "input_atom_encoder_depth": emb.get("atom_encoder_depth"),
        "diffusion_transformer_depth": score.get("token_transformer_depth"),
        "diffusion_transformer_heads": score.get("token_transformer_heads"),
        "diffusion_atom_encoder_depth": score.get("atom_encoder_depth"),
        "diffusion_atom_decoder_depth": score.get("atom_decoder_depth"),
        "confidence_prediction": bool(hparams.get("confidence_prediction", True)),
        "confidence_pairformer_blocks": (
            conf_pf.get("num_blocks") if hparams.get("confidence_prediction", True) else None
        ),
        "affinity_prediction": bool(hparams.get("affinity_prediction", False)),
        "predict_bfactor": bool(hparams.get("predict_bfactor", False)),
    }


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(hparams: Mapping[str, Any]):
    """`Boltz2(**hparams)` with exactly the kwargs Lightning's loader would pass."""
    return _boltz2_cls()(**_init_kwargs(hparams))


def _randomize_zero_parameters(model: torch.nn.Module, generator: torch.Generator) -> list[str]:
    """Give every parameter that is entirely zero after Boltz's init small random values.

    Boltz zero-initialises output / gating projections (final_init_, gating_init_), some
    conditioning embeddings and most biases (including LayerNorm biases); with them at zero a
    random model predicts trivially (e.g. all-zero coordinate updates). Matrices (>= 2-D) get
    N(0, (0.5 / sqrt(fan_in))^2) with fan_in the last dimension (the input width of a Linear, the
    embedding width of an nn.Embedding); vectors (biases) get N(0, 0.02^2). Parameters that are
    not all-zero (ones-initialised gating biases and LayerNorm weights, lecun/he-initialised
    matrices) are left as initialised. Returns the names changed.
    """
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0 or bool(p.any()):
                continue
            if p.dim() >= 2:
                std = 0.5 / float(p.shape[-1]) ** 0.5
            else:
                std = 0.02
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
            changed.append(name)
    return changed


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def make_random_checkpoint(path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Boltz-2 checkpoint in upstream (Lightning) format; returns its path.

    Deterministic in (preset, seed). Both `Boltz2.load_from_checkpoint(path, strict=True, ...)`
    (without overriding the architecture) and `load_boltz2` accept it. The global torch / numpy
    RNG states are restored afterwards.
    """
    from omegaconf import OmegaConf
    import pytorch_lightning as pl

    if preset not in PRESETS:
        raise ConfigError(f"unknown checkpoint preset {preset!r}; choose one of {sorted(PRESETS)}")
    path = Path(path).expanduser()
    hparams = copy.deepcopy(PRESETS[preset])

    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed)  # boltz's lecun init samples with scipy's truncnorm
            model = build_model(hparams)
            gen = torch.Generator().manual_seed(seed + 1_000_003)
            _randomize_zero_parameters(model, gen)
    finally:
        np.random.set_state(np_state)

    # Every dict-valued hparam as a DictConfig, as a Hydra-instantiated training run saves them
    # (training/validation args MUST be: on_load_checkpoint reads them by attribute).
    saved = {k: (OmegaConf.create(v) if isinstance(v, dict) else v) for k, v in hparams.items()}
    saved[RANDOM_MARKER] = preset
    saved["boltz_cp_random_seed"] = seed
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": saved,
        "hparams_name": "kwargs",
        RANDOM_MARKER: preset,
    }
    _atomic_torch_save(ckpt, path)
    return path


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _first_sentence(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    if end != -1:
        text = text[: end + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint file and check it has the upstream layout; CheckpointError otherwise.

    Uses `torch.load(weights_only=False)`, as Lightning does for upstream's checkpoints (their
    hyper_parameters hold OmegaConf objects): only load checkpoints you trust.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Boltz-2 checkpoint not found: {path} does not exist; {_how_to_get_weights(path)}")
    if path.is_dir():
        raise CheckpointError(f"Boltz-2 checkpoint {path} is a directory, not a checkpoint file")
    try:
        try:
            # Memory-mapped: the ranks of a node share the file's pages instead of each reading a copy.
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be mapped
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 -- anything torch.load throws means "not readable"
        detail = _first_sentence(str(e))
        raise CheckpointError(
            f"cannot read Boltz-2 checkpoint {path}: {type(e).__name__}: {detail} "
            f"(corrupt or truncated file, or not a PyTorch checkpoint; delete it and fetch it again)"
        ) from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"Boltz-2 checkpoint {path} is not a Lightning checkpoint: it holds a {type(ckpt).__name__}, not a dict"
        )
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"Boltz-2 checkpoint {path} lacks {', '.join(repr(k) for k in missing)}: "
            f"not an upstream Boltz-2 (Lightning) checkpoint"
        )
    if not isinstance(ckpt["state_dict"], Mapping) or not ckpt["state_dict"]:
        raise CheckpointError(f"Boltz-2 checkpoint {path} has an empty or malformed 'state_dict'")
    if not isinstance(ckpt["hyper_parameters"], Mapping):
        raise CheckpointError(f"Boltz-2 checkpoint {path} has malformed 'hyper_parameters'")
    return dict(ckpt)


def _upstream_steering_defaults() -> dict[str, Any]:
    from dataclasses import asdict

    from boltz.main import BoltzSteeringParams

    return asdict(BoltzSteeringParams())


def _diffusion_override_keys() -> set[str]:
    from boltz.model.modules.diffusionv2 import AtomDiffusion

    keys = set(inspect.signature(AtomDiffusion.__init__).parameters)
    return keys - {"self", "score_model_args", "compile_score"}


def _merge_overrides(base: Mapping[str, Any] | None, over: Mapping[str, Any] | None,
                     allowed: set[str] | tuple[str, ...], what: str) -> dict[str, Any]:
    merged = dict(_plain(base) or {})
    for key, value in dict(over or {}).items():
        if key not in allowed:
            raise ConfigError(
                f"{what} override {key!r} is not an inference-time setting; allowed: {', '.join(sorted(allowed))}"
            )
        if value is not None:  # None = keep the checkpoint's value
            merged[key] = value
    return merged


_REQUIRED_PREDICT_KEYS = ("recycling_steps", "sampling_steps", "diffusion_samples", "max_parallel_samples")


def _check_predict_args(predict_args) -> None:
    if not isinstance(predict_args, Mapping):
        raise ConfigError("predict_args must be a dict")
    lacking = [k for k in _REQUIRED_PREDICT_KEYS if k not in predict_args]
    if lacking:
        raise ConfigError(f"predict_args lacks {', '.join(lacking)}")


def inference_hparams(
    hparams: Mapping[str, Any],
    *,
    predict_args: dict,
    diffusion_overrides: dict | None = None,
    steering_args: dict | None = None,
    msa_overrides: dict | None = None,
    use_kernels: bool = False,
    affinity_mw_correction: bool | None = None,
) -> dict[str, Any]:
    """A copy of `hparams` with the inference-time knobs set as `load_boltz2` sets them (its
    docstring lists them); architecture keys are left as they are."""
    _check_predict_args(predict_args)
    hp = dict(hparams)
    steering = _upstream_steering_defaults()
    hp["predict_args"] = dict(predict_args)
    hp["steering_args"] = _merge_overrides(steering, steering_args, set(steering), "steering")
    hp["diffusion_process_args"] = _merge_overrides(
        hp.get("diffusion_process_args"), diffusion_overrides, _diffusion_override_keys(), "diffusion"
    )
    hp["msa_args"] = _merge_overrides(hp.get("msa_args"), msa_overrides, MSA_OVERRIDE_KEYS, "msa")
    hp["use_kernels"] = bool(use_kernels)
    hp["ema"] = False
    if affinity_mw_correction is not None:
        hp["affinity_mw_correction"] = bool(affinity_mw_correction)
    return hp


def plain_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper_parameters as plain (deep-copied) containers, safe to edit."""
    return {k: copy.deepcopy(_plain(v)) for k, v in dict(hparams).items()}


def load_boltz2(
    path,
    *,
    predict_args: dict,
    diffusion_overrides: dict | None = None,
    steering_args: dict | None = None,
    msa_overrides: dict | None = None,
    use_kernels: bool = False,
    map_location="cpu",
    cp: bool = False,
    affinity_mw_correction: bool | None = None,
):
    """Build `Boltz2` from the checkpoint's own hyperparameters, load its weights strictly, `.eval()`.

    ``cp=True`` builds the context-parallel `Boltz2CP` instead (same parameter names, loaded
    strictly from the same state dict), so no rank ever holds upstream's model as well.

    Overrides only inference-time knobs:
      * `predict_args` -- replaces the checkpoint's (needs recycling_steps, sampling_steps,
        diffusion_samples, max_parallel_samples);
      * `diffusion_overrides` -- merged over the checkpoint's `diffusion_process_args`; keys of
        `AtomDiffusion.__init__` only (step_scale, noise_scale, gamma_0, ...); None values keep
        the checkpoint's;
      * `steering_args` -- merged over upstream's `BoltzSteeringParams()` defaults, as upstream's
        predict does (fk_steering / physical_guidance_update off, contact guidance on);
      * `msa_overrides` -- `subsample_msa`, `num_subsampled_msa` merged over the checkpoint's
        `msa_args`;
      * `use_kernels`, and `ema=False`;
      * `affinity_mw_correction` (affinity checkpoints; None keeps the checkpoint's), as upstream's
        `boltz predict --affinity_mw_correction` does.

    Returns (model, info) with info = {path, random_preset (str or None), hparams (summary),
    num_parameters, pytorch_lightning_version}. Raises CheckpointError for a missing, unreadable or
    mismatching checkpoint, ConfigError for a bad override.
    """
    path = Path(path).expanduser()
    _check_predict_args(predict_args)

    ckpt = read_checkpoint(path, map_location=map_location)
    hp = dict(ckpt["hyper_parameters"])
    random_preset = hp.get(RANDOM_MARKER, ckpt.get(RANDOM_MARKER))

    for key in ("token_s", "token_z", "atom_s", "atom_z", "pairformer_args", "msa_args", "score_model_args"):
        if key not in hp:
            raise CheckpointError(
                f"Boltz-2 checkpoint {path}: hyper_parameters lack {key!r}; not a Boltz-2 checkpoint"
            )

    hp = inference_hparams(hp, predict_args=predict_args, diffusion_overrides=diffusion_overrides,
                           steering_args=steering_args, msa_overrides=msa_overrides, use_kernels=use_kernels,
                           affinity_mw_correction=affinity_mw_correction)

    try:
        if cp:
            from boltz_cp.models.boltz2 import Boltz2CP

            model = Boltz2CP(hp)
        else:
            model = build_model(hp)
    except RankFailure:
        raise
    except Exception as e:  # noqa: BLE001 -- hparams that do not build a Boltz2
        raise CheckpointError(
            f"Boltz-2 checkpoint {path}: its hyper_parameters do not build a Boltz2 model "
            f"({type(e).__name__}: {e})"
        ) from None

    state_dict = ckpt["state_dict"]
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise CheckpointError(
            f"Boltz-2 checkpoint {path}: weights do not fit the model its hyper_parameters describe ({detail})"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise CheckpointError(
            f"Boltz-2 checkpoint {path}: state_dict does not match the model its hyper_parameters "
            f"describe: {'; '.join(parts)}"
        )
    device = next((t.device for t in state_dict.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    model = model.to(device)
    model.eval()

    summary = summarize_hparams(hp)
    n_params = count_parameters(model)
    summary["num_parameters"] = n_params
    info = {
        "path": str(path),
        "random_preset": str(random_preset) if random_preset else None,
        "hparams": summary,
        "num_parameters": n_params,
        "pytorch_lightning_version": ckpt.get("pytorch-lightning_version"),
    }
    return model, info


def describe_preset(preset: str) -> dict[str, Any]:
    """Summary of a preset (no model built)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown checkpoint preset {preset!r}; choose one of {sorted(PRESETS)}")
    return summarize_hparams(PRESETS[preset])
