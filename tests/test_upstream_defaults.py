"""`boltz_cp predict`'s defaults against `boltz predict` with the flag left out. Tier: no PG.

Upstream's effective default is read off its click command (`boltz.main.predict.params`): the
click default (called when it is a function), False for an `is_flag` without one, and the few
values `predict()` substitutes for None. Every upstream option is either mapped to our setting
of the same name and compared, or listed below with the reason we do not have it; a new
upstream option or a drifting default fails here. The MSA test runs a 2,000-row a3m through
upstream's own preprocessing and featurizer and through ours, both at their defaults.
"""

from __future__ import annotations

import inspect
import random
from pathlib import Path

import pytest
import torch

from boltz_cp.cli.config import compose_config

# Upstream options with no boltz_cp setting, and why.
NOT_OURS = {
    "data": "the input path is the positional argument of `boltz_cp predict`",
    "devices": "ranks come from torchrun's world, split by `mesh` and `dp`",
    "accelerator": "`device` (auto | cpu | cuda) picks the device",
    "num_workers": "no dataloader: each input is featurized in the process that folds it",
    "preprocessing_threads": "inputs are parsed by the mesh that folds them, one at a time",
    "model": "Boltz-2 only (boltz1 is not ported); our `model` group is model.backend, another thing",
    "no_kernels": "`kernels.attention` (auto | torch | fused | cueq) picks the attention kernel; "
                  "cuEquivariance is opt-in (cueq), not the default as upstream's kernels are",
}

# Settings whose default deliberately differs: (upstream's effective default, ours, why).
DEVIATIONS = {
    "seed": (None, 0, "a run is a function of its seed (same result on every mesh and backend); "
                      "upstream leaves its RNGs unseeded"),
}

# Same name, same meaning, compared after resolution (paths, step_scale).
MAPPED = (
    "out_dir", "cache", "checkpoint", "affinity_checkpoint", "recycling_steps", "sampling_steps",
    "diffusion_samples", "max_parallel_samples", "step_scale", "write_full_pae", "write_full_pde",
    "output_format", "override", "use_potentials", "method", "affinity_mw_correction",
    "sampling_steps_affinity", "diffusion_samples_affinity", "max_msa_seqs", "subsample_msa",
    "num_subsampled_msa", "write_embeddings",
    # the MSA server client's options
    "use_msa_server", "msa_server_url", "msa_pairing_strategy", "msa_server_username",
    "msa_server_password", "api_key_header", "api_key_value",
)


def upstream_defaults() -> dict:
    """What `boltz predict` uses for each option left out (before predict()'s own substitutions)."""
    import boltz.main

    out = {}
    for p in boltz.main.predict.params:
        value = p.default() if callable(p.default) else p.default
        if getattr(p, "is_flag", False) and value is None:
            value = False
        out[p.name] = value
    return out


def _effective(name: str, value, cache: Path):
    """Upstream predict()'s substitutions for None, checked against its source."""
    import boltz.main

    src = inspect.getsource(boltz.main.predict.callback)
    if name == "step_scale" and value is None:
        assert "step_scale = 1.5 if step_scale is None else step_scale" in src
        return 1.5
    if name == "checkpoint" and value is None:
        assert 'checkpoint = cache / "boltz2_conf.ckpt"' in src
        return cache / "boltz2_conf.ckpt"
    if name == "affinity_checkpoint" and value is None:
        assert 'affinity_checkpoint = cache / "boltz2_aff.ckpt"' in src
        return cache / "boltz2_aff.ckpt"
    if name in ("write_full_pae", "write_full_pde"):
        # Boltz-2's predict_step never reads these flags and the writer saves whatever it gets:
        # `boltz predict` writes both matrices, flag or not.
        from boltz.data.write.writer import BoltzWriter
        from boltz.model.models.boltz2 import Boltz2

        assert name not in inspect.getsource(Boltz2.predict_step)
        assert f'if "{name[11:]}" in prediction' in inspect.getsource(BoltzWriter.write_on_batch_end)
        return True
    if name in ("cache", "out_dir"):
        return Path(value).expanduser()
    if name == "api_key_header" and value is None:
        assert 'key = api_key_header if api_key_header else "X-API-Key"' in inspect.getsource(boltz.main.compute_msa)
        return "X-API-Key"
    return value


def _ours(name: str, cfg, cache: Path):
    """Our setting after the CLI's resolution of null (boltz_cp/cli/predict.py)."""
    from boltz_cp.cli.affinity import affinity_checkpoint_path
    from boltz_cp.models.checkpoint import default_cache, default_checkpoint_path

    value = cfg[name]
    if name == "cache":
        return Path(value).expanduser() if value else default_cache()
    if name == "checkpoint":
        return Path(value).expanduser() if value else default_checkpoint_path(cache)
    if name == "affinity_checkpoint":
        return affinity_checkpoint_path(cfg, cache)
    if name == "out_dir":
        return Path(value).expanduser()
    if name == "api_key_header" and value is None:  # null: the header upstream's client sends
        return "X-API-Key"
    return value


def test_every_upstream_option_is_accounted_for():
    upstream = set(upstream_defaults())
    listed = set(NOT_OURS) | set(DEVIATIONS) | set(MAPPED)
    assert upstream - listed == set(), "new upstream options: map them or say why not"
    assert listed - upstream == set(), "stale entries: upstream has no such option"
    cfg = compose_config([])
    missing = [k for k in (*MAPPED, *DEVIATIONS) if k not in cfg]
    assert not missing, f"mapped options missing from configs/predict.yaml: {missing}"
    clash = [k for k in NOT_OURS if k in cfg and k != "model"]
    assert not clash, f"options listed as not ours are in the config: {clash}"


def test_defaults_equal_upstream(monkeypatch):
    monkeypatch.delenv("BOLTZ_CACHE", raising=False)
    upstream = upstream_defaults()
    cfg = compose_config([])
    cache = _ours("cache", cfg, Path())
    diffs = {}
    for name in MAPPED:
        want, got = _effective(name, upstream[name], cache), _ours(name, cfg, cache)
        if want != got:
            diffs[name] = (want, got)
    assert diffs == {}, "defaults drifted from upstream's (name: (upstream, ours))"
    for name, (want, ours, _) in DEVIATIONS.items():
        assert (upstream[name], cfg[name]) == (want, ours), f"{name}: documented deviation changed"


def test_cache_follows_boltz_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BOLTZ_CACHE", str(tmp_path))
    cfg = compose_config([])
    assert _ours("cache", cfg, Path()) == _effective("cache", upstream_defaults()["cache"], Path()) == tmp_path


def test_subsample_default_is_off_as_upstream():
    """The issue's case: `--subsample_msa` is a flag, so `boltz predict` does not subsample."""
    assert upstream_defaults()["subsample_msa"] is False
    assert compose_config([]).subsample_msa is False


# -- the MSA rows reaching the model ----------------------------------------------------------

PREDICT_ARGS = {"recycling_steps": 0, "sampling_steps": 1, "diffusion_samples": 1, "max_parallel_samples": 1}
MSA_ROWS = 2000
LENGTH = 40
MSA_KEYS = ("msa", "msa_paired", "deletion_value", "has_deletion", "deletion_mean", "profile", "msa_mask")


def _a3m(query: str, rows: int, seed: int = 0) -> str:
    """The query and rows - 1 random homologs with gaps and insertions (lowercase)."""
    rng = random.Random(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    lines = [">query", query]
    for r in range(1, rows):
        seq = []
        for aa in query:
            u = rng.random()
            seq.append("-" if u < 0.1 else rng.choice(letters) if u < 0.5 else aa)
            if rng.random() < 0.05:
                seq.append("".join(rng.choice(letters).lower() for _ in range(rng.randint(1, 3))))
        lines += [f">hit{r}", "".join(seq)]
    return "\n".join(lines) + "\n"


def _upstream_msa_features(path: Path, out: Path, cache: Path, defaults: dict) -> dict:
    """`boltz predict`'s preprocessing and featurizer at its defaults (no model)."""
    from boltz.data.module.inferencev2 import Boltz2InferenceDataModule
    from boltz.data.types import Manifest
    from boltz.main import process_inputs

    process_inputs(
        data=[path], out_dir=out, ccd_path=cache / "ccd.pkl", mol_dir=cache / "mols",
        msa_server_url=defaults["msa_server_url"], msa_pairing_strategy=defaults["msa_pairing_strategy"],
        max_msa_seqs=defaults["max_msa_seqs"], use_msa_server=defaults["use_msa_server"], boltz2=True,
        preprocessing_threads=defaults["preprocessing_threads"],
    )
    processed = out / "processed"
    manifest = Manifest.load(processed / "manifest.json")  # as upstream's predict() reads it
    module = Boltz2InferenceDataModule(
        manifest=manifest, target_dir=processed / "structures", msa_dir=processed / "msa",
        mol_dir=cache / "mols", num_workers=0, constraints_dir=processed / "constraints",
        template_dir=processed / "templates", extra_mols_dir=processed / "mols", override_method=defaults["method"],
    )
    return next(iter(module.predict_dataloader()))


def test_same_msa_rows_as_upstream(tmp_path, boltz_cache, tiny_ckpt):
    """A 2,000-row a3m: every row reaches the model, as with `boltz predict`'s defaults."""
    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, parse_target, write_processed
    from boltz_cp.data.msa_compact import msa_features_block
    from boltz_cp.data.synthetic import AMINO_ACIDS
    from boltz_cp.models.checkpoint import load_boltz2

    rng = random.Random(1)
    query = "".join(rng.choice(AMINO_ACIDS) for _ in range(LENGTH))
    (tmp_path / "A.a3m").write_text(_a3m(query, MSA_ROWS))
    path = tmp_path / "deep.yaml"
    path.write_text(f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {query}\n"
                    f"      msa: {tmp_path / 'A.a3m'}\n")
    defaults = upstream_defaults()
    up = _upstream_msa_features(path, tmp_path / "upstream", boltz_cache, defaults)

    cfg = compose_config([])
    mol_dir = boltz_cache / "mols"
    dirs = ProcessedDirs(tmp_path / "ours" / "processed").make()
    record = write_processed(parse_target(path, mol_dir, cfg.seed), path, dirs, cfg.max_msa_seqs)
    ours = featurize_lean(record, dirs, mol_dir, seed=cfg.seed, method=cfg.method)
    # featurize_lean keeps the MSA compact; the model reads upstream's features decoded from it
    ours.update(msa_features_block(ours, slice(0, ours["msa_residues"].shape[-1])))

    assert up["msa"].shape == (1, MSA_ROWS, LENGTH)
    assert bool((up["msa"] != up["msa"][:, :1]).any(-1)[0, 1:].all()), "every homolog differs from the query"
    # NOTE(parity): upstream's construct_paired_msa keeps no deletion past the query row (it
    # overwrites `chain_deletions` in its loop), so has_deletion is all False on both sides.
    for key in MSA_KEYS:
        assert (ours[key].dtype, ours[key].shape) == (up[key].dtype, up[key].shape), key
        assert torch.equal(ours[key], up[key]), key

    # ... and the model keeps them all: subsampling is off under the defaults, on both backends.
    overrides = {"subsample_msa": cfg.subsample_msa, "num_subsampled_msa": cfg.num_subsampled_msa}
    for cp in (False, True):
        model, _ = load_boltz2(tiny_ckpt, predict_args=PREDICT_ARGS, msa_overrides=overrides, cp=cp)
        assert model.msa_module.subsample_msa is defaults["subsample_msa"] is False


@pytest.mark.parametrize("flag", [False, True])
def test_subsample_setting_reaches_the_model(tiny_ckpt, flag):
    from boltz_cp.models.checkpoint import load_boltz2

    cfg = compose_config([f"subsample_msa={str(flag).lower()}"])
    model, _ = load_boltz2(tiny_ckpt, predict_args=PREDICT_ARGS, msa_overrides={"subsample_msa": cfg.subsample_msa,
                                                     "num_subsampled_msa": cfg.num_subsampled_msa})
    assert model.msa_module.subsample_msa is flag
