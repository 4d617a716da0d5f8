"""Checkpoints: random-weight checkpoints in upstream format, our loader, its errors. Tier: no
process group (single process, CPU)."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from boltz_cp.errors import CheckpointError, ConfigError
from boltz_cp.models import checkpoint as C
from boltz_cp.models.presets import PRESETS

REPO = Path(__file__).resolve().parent.parent
PREDICT = {"recycling_steps": 1, "sampling_steps": 2, "diffusion_samples": 1, "max_parallel_samples": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return C.make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", preset="tiny", seed=0)


def _raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_state_equal(model: torch.nn.Module, saved: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(saved)
    for k, v in saved.items():
        assert torch.equal(got[k], v), k


def test_tiny_checkpoint_layout(tiny):
    from omegaconf import DictConfig

    raw = _raw(tiny)
    for key in ("state_dict", "hyper_parameters", "pytorch-lightning_version"):
        assert key in raw
    hp = raw["hyper_parameters"]
    assert isinstance(hp["training_args"], DictConfig) and isinstance(hp["validation_args"], DictConfig)
    assert hp[C.RANDOM_MARKER] == "tiny" and raw[C.RANDOM_MARKER] == "tiny"
    assert hp["use_templates"] and hp["use_templates_v2"] and hp["confidence_prediction"]
    assert not hp["affinity_prediction"]
    # the atomic write leaves no temp file behind
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["tiny.ckpt"]


def test_upstream_loads_tiny_with_its_own_architecture(tiny):
    """Upstream's loader, architecture NOT overridden (only what predict always passes besides)."""
    from boltz.model.models.boltz2 import Boltz2

    model = Boltz2.load_from_checkpoint(
        tiny, strict=True, map_location="cpu", predict_args=PREDICT, ema=False, use_kernels=False
    )
    _assert_state_equal(model, _raw(tiny)["state_dict"])
    assert len(model.pairformer_module.layers) == 2


def test_our_loader_accepts_tiny(tiny):
    model, info = C.load_boltz2(tiny, predict_args=PREDICT)
    _assert_state_equal(model, _raw(tiny)["state_dict"])
    assert not model.training and model.use_ema is False and model.use_kernels is False
    assert info["random_preset"] == "tiny" and info["path"] == str(tiny)
    hs = info["hparams"]
    assert (hs["pairformer_blocks"], hs["msa_blocks"], hs["template_blocks"]) == (2, 1, 1)
    assert (hs["diffusion_transformer_depth"], hs["confidence_pairformer_blocks"]) == (2, 1)
    assert hs["token_s"] == 32 and hs["token_z"] == 16 and hs["use_templates_v2"]
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters()) > 0
    assert type(model.template_module).__name__ == "TemplateV2Module"


def test_loader_builds_the_cp_model_with_the_same_weights(tiny):
    """cp=True: Boltz2CP straight from the checkpoint (no upstream model), every tensor equal."""
    from boltz_cp.models.boltz2 import Boltz2CP

    cp, _ = C.load_boltz2(tiny, predict_args=PREDICT, cp=True)
    upstream, _ = C.load_boltz2(tiny, predict_args=PREDICT)
    assert isinstance(cp, Boltz2CP) and not cp.training
    assert cp.predict_args == upstream.predict_args and cp.steering_args == upstream.steering_args
    ref = upstream.state_dict()
    got = cp.state_dict()
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_plain_dict_hparams_load_too(tiny, tmp_path):
    """A checkpoint whose nested hparams are plain dicts (not DictConfigs) loads the same."""
    from omegaconf import DictConfig, OmegaConf

    raw = _raw(tiny)
    raw["hyper_parameters"] = {
        k: (OmegaConf.to_container(v) if isinstance(v, DictConfig) and k not in ("training_args", "validation_args")
            else v)
        for k, v in raw["hyper_parameters"].items()
    }
    path = tmp_path / "plain.ckpt"
    torch.save(raw, path)
    model, _ = C.load_boltz2(path, predict_args=PREDICT)
    _assert_state_equal(model, raw["state_dict"])


def test_no_parameter_is_all_zero(tiny):
    """Boltz zero-initialises output/gating layers and biases; the random checkpoint must not."""
    model, _ = C.load_boltz2(tiny, predict_args=PREDICT)
    zero = [n for n, p in model.named_parameters() if not bool(p.any())]
    assert zero == []
    # e.g. the diffusion module's final coordinate projection (zero at init upstream)
    dec = model.structure_module.score_model.atom_attention_decoder
    assert dec.atom_feat_to_atom_pos_update[1].weight.abs().sum() > 0


def test_seed_determinism(tiny, tmp_path):
    rng = torch.get_rng_state()
    same = C.make_random_checkpoint(tmp_path / "same.ckpt", preset="tiny", seed=0)
    other = C.make_random_checkpoint(tmp_path / "other.ckpt", preset="tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "global RNG state must be restored"
    a, b, c = _raw(tiny)["state_dict"], _raw(same)["state_dict"], _raw(other)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every random parameter differs with another seed; constant-initialised ones (LayerNorm
    # weights = 1, gating biases = -2) and buffers (distance-bin boundaries) are the same
    model, _ = C.load_boltz2(tiny, predict_args=PREDICT)
    random_params = [n for n, p in model.named_parameters() if p.numel() > 1 and p.min() != p.max()]
    assert len(random_params) > 300
    assert all(not torch.equal(a[k], c[k]) for k in random_params)


def test_inference_overrides(tiny):
    model, _ = C.load_boltz2(
        tiny,
        predict_args=PREDICT,
        diffusion_overrides={"step_scale": 1.7, "noise_scale": None},
        steering_args={"fk_steering": True},
        msa_overrides={"subsample_msa": True, "num_subsampled_msa": 7},
    )
    assert model.structure_module.step_scale == 1.7
    assert model.structure_module.noise_scale == PRESETS["tiny"]["diffusion_process_args"]["noise_scale"]
    # steering: upstream's BoltzSteeringParams defaults under ours
    assert model.steering_args["fk_steering"] is True and model.steering_args["contact_guidance_update"] is True
    assert model.msa_module.subsample_msa is True and model.msa_module.num_subsampled_msa == 7
    assert model.predict_args == PREDICT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"msa_overrides": {"msa_s": 4}},
        {"diffusion_overrides": {"score_model_args": {}}},
        {"steering_args": {"no_such_knob": 1}},
    ],
)
def test_architecture_overrides_refused(tiny, kwargs):
    with pytest.raises(ConfigError, match="not an inference-time setting"):
        C.load_boltz2(tiny, predict_args=PREDICT, **kwargs)


def test_predict_args_checked(tiny):
    with pytest.raises(ConfigError, match="max_parallel_samples"):
        C.load_boltz2(tiny, predict_args={"recycling_steps": 1, "sampling_steps": 2, "diffusion_samples": 1})


def _corrupt(kind: str, tiny: Path, path: Path) -> None:
    data = tiny.read_bytes()
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_a_dict":
        torch.save(torch.zeros(3), path)
    elif kind == "no_hparams":
        torch.save({"state_dict": _raw(tiny)["state_dict"]}, path)
    elif kind == "missing_weight":
        raw = _raw(tiny)
        raw["state_dict"].pop("pairformer_module.layers.1.transition_z.fc3.weight")
        torch.save(raw, path)
    elif kind == "wrong_shape":
        raw = _raw(tiny)
        raw["hyper_parameters"]["token_z"] = 24
        torch.save(raw, path)


@pytest.mark.parametrize(
    "kind", ["garbage", "truncated", "empty", "not_a_dict", "no_hparams", "missing_weight", "wrong_shape"]
)
def test_bad_checkpoint_raises_checkpoint_error(kind, tiny, tmp_path):
    path = tmp_path / f"{kind}.ckpt"
    _corrupt(kind, tiny, path)
    with pytest.raises(CheckpointError) as ei:
        C.load_boltz2(path, predict_args=PREDICT)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg


def test_missing_checkpoint_says_where_and_how(tmp_path):
    path = tmp_path / "cache" / "boltz2_conf.ckpt"
    with pytest.raises(CheckpointError) as ei:
        C.load_boltz2(path, predict_args=PREDICT)
    msg = str(ei.value)
    assert str(path) in msg
    for hint in ("boltz predict", "boltz-community/boltz-2", "checkpoint=PATH", "make_random_checkpoint.py"):
        assert hint in msg, hint
    with pytest.raises(CheckpointError, match="directory"):
        C.load_boltz2(tmp_path, predict_args=PREDICT)


def test_default_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("BOLTZ_CACHE", str(tmp_path / "bc"))
    assert C.default_cache() == (tmp_path / "bc").resolve()
    monkeypatch.delenv("BOLTZ_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert C.default_cache() == tmp_path / "home" / ".boltz"
    assert C.default_checkpoint_path(tmp_path) == tmp_path / "boltz2_conf.ckpt"


def test_presets_sample_like_upstream_predict():
    """The presets' diffusion params are what upstream's `boltz predict` passes for Boltz-2."""
    from boltz.main import Boltz2DiffusionParams, PairformerArgsV2

    for preset in PRESETS.values():
        assert preset["diffusion_process_args"] == asdict(Boltz2DiffusionParams())
    full = PRESETS["full"]
    assert full["pairformer_args"]["num_blocks"] == PairformerArgsV2().num_blocks == 64
    assert full["pairformer_args"]["num_heads"] == PairformerArgsV2().num_heads


def test_full_preset_summary():
    s = C.describe_preset("full")
    assert (s["token_s"], s["token_z"], s["atom_s"], s["atom_z"]) == (384, 128, 128, 16)
    assert (s["pairformer_blocks"], s["msa_blocks"], s["template_blocks"]) == (64, 4, 2)
    assert (s["diffusion_transformer_depth"], s["diffusion_transformer_heads"]) == (24, 16)
    assert s["confidence_pairformer_blocks"] == 8 and s["use_templates_v2"] and not s["affinity_prediction"]
    with pytest.raises(ConfigError):
        C.describe_preset("huge")


def test_script_writes_checkpoint(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_random_checkpoint", REPO / "scripts" / "make_random_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "s.ckpt"
    assert mod.main([str(out), "--seed", "3"]) == 0
    cap = capsys.readouterr()
    assert str(out) in cap.out and "RANDOM weights" in cap.err
    assert _raw(out)["hyper_parameters"]["boltz_cp_random_seed"] == 3


# Parameter count of the released boltz2_conf.ckpt as loaded strictly into upstream's Boltz2
# (reported by third parties who loaded the real file); the full preset must build exactly it.
REAL_BOLTZ2_PARAMETERS = 506_724_992


@pytest.mark.slow
def test_full_preset_builds_the_released_architecture():
    import copy

    model = C.build_model(copy.deepcopy(PRESETS["full"]))
    assert len(model.pairformer_module.layers) == 64
    assert len(model.msa_module.layers) == 4
    assert len(model.template_module.pairformer.layers) == 2
    assert len(model.structure_module.score_model.token_transformer.layers) == 24
    assert len(model.confidence_module.pairformer_stack.layers) == 8
    assert not hasattr(model, "affinity_module")
    n = C.count_parameters(model)
    print(f"full preset: {n:,} parameters ({n * 4 / 2**30:.2f} GiB fp32)")
    assert n == REAL_BOLTZ2_PARAMETERS
