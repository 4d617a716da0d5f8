"""Random-weight Boltz-2 architectures (`PRESETS`): hyperparameters in the layout of upstream's
checkpoints, for tests and benchmarks that have no real weights. `tiny` is narrow and shallow (a
whole predict in seconds on one CPU core), `full` has the released model's widths and depths,
`tiny-affinity` adds the affinity heads. Written to disk by
`boltz_cp.models.checkpoint.make_random_checkpoint`.

How the `full` preset was put together (the real checkpoint's hyperparameters are not available
offline): architecture keys from upstream's training config `scripts/train/configs/structurev2.yaml`
(jwohlwend/boltz) with the inference-release values that differ from it -- 64 pairformer blocks
(upstream's `PairformerArgsV2`), templates v2 on, confidence head on (8-block pairformer, separate
intra/inter PAE/PDE heads), b-factor head on. It builds 506,724,992 parameters, exactly the count
reported for the released `boltz2_conf.ckpt` loaded strictly into `Boltz2`, and a random `full`
checkpoint loads through upstream's own predict-time call (its 64-block / MSA / diffusion
overrides, strict=True). Guessed keys (none of which shapes a weight) are in `FULL_PRESET_NOTES`.

The affinity checkpoint (`boltz2_aff.ckpt`, read by the affinity pass of `boltz_cp predict`) is a
whole Boltz-2 (trunk, diffusion, confidence) plus the affinity heads; preset `tiny-affinity` is
the `tiny` model with an ensemble of two small affinity heads (see `AFFINITY_PRESET_NOTES`).
"""

from __future__ import annotations

import copy
from typing import Any

from boltz_cp.errors import ConfigError

# = dataclasses.asdict(boltz.main.Boltz2DiffusionParams()), what upstream's predict always
# passes; a test checks the two agree. With these in the checkpoint, loading without overrides
# samples exactly as upstream's `boltz predict` does.
_BOLTZ2_DIFFUSION = {
    "gamma_0": 0.8,
    "gamma_min": 1.0,
    "noise_scale": 1.003,
    "rho": 7,
    "step_scale": 1.5,
    "sigma_min": 0.0001,
    "sigma_max": 160.0,
    "sigma_data": 16.0,
    "P_mean": -1.2,
    "P_std": 1.5,
    "coordinate_augmentation": True,
    "alignment_reverse_diff": True,
    "synchronize_sigmas": True,
}

# Training-only arguments: unused at inference, but `on_load_checkpoint` reads max_lr,
# weight_decay, diffusion_multiplicity and recycling_steps. structurev2.yaml values with the
# confidence stage's overrides (the released checkpoint comes out of that stage).
_TRAINING_ARGS = {
    "recycling_steps": 3,
    "sampling_steps": 200,
    "diffusion_multiplicity": 16,
    "diffusion_samples": 1,
    "affinity_loss_weight": 3e-3,
    "confidence_loss_weight": 3e-3,
    "diffusion_loss_weight": 4.0,
    "distogram_loss_weight": 3e-2,
    "bfactor_loss_weight": 1e-3,
    "adam_beta_1": 0.9,
    "adam_beta_2": 0.95,
    "adam_eps": 1e-8,
    "lr_scheduler": "af3",
    "base_lr": 0.0,
    "max_lr": 0.0018,
    "lr_warmup_no_steps": 1000,
    "lr_start_decay_after_n_steps": 50000,
    "lr_decay_every_n_steps": 50000,
    "lr_decay_factor": 0.95,
    "weight_decay": 0.003,
    "weight_decay_exclude": True,
    "symmetry_correction": True,
    "run_confidence_sequentially": False,
}

_VALIDATION_ARGS = {
    "recycling_steps": 3,
    "sampling_steps": 200,
    "diffusion_samples": 5,
    "symmetry_correction": True,
    "run_confidence_sequentially": True,
}

_DIFFUSION_LOSS_ARGS = {
    "add_smooth_lddt_loss": True,
    "nucleotide_loss_weight": 5.0,
    "ligand_loss_weight": 10.0,
    "filter_by_plddt": 0.0,
}


def _common(**over: Any) -> dict[str, Any]:
    """Keys shared by both presets (flags of the released model; no shape depends on most)."""
    hp: dict[str, Any] = {
        "num_bins": 64,  # distogram bins
        "atom_feature_dim": 388,  # ref_pos 3 + charge 1 + element 128 + atom-name chars 256
        "atoms_per_window_queries": 32,  # fixed by the featurizer's windowing
        "atoms_per_window_keys": 128,
        "compile_pairformer": False,
        "compile_structure": False,
        "compile_confidence": False,
        "compile_affinity": False,
        "compile_msa": False,
        "compile_templates": False,
        "ema": False,
        "ema_decay": 0.999,
        "exclude_ions_from_lddt": True,
        "fix_sym_check": True,
        "cyclic_pos_enc": True,
        "num_val_datasets": 1,
        "bond_type_feature": True,
        "conditioning_cutoff_min": 4.0,
        "conditioning_cutoff_max": 20.0,
        "use_templates": True,
        "use_templates_v2": True,
        "predict_bfactor": True,
        "checkpoint_diffusion_conditioning": True,
        "confidence_prediction": True,
        "affinity_prediction": False,
        "structure_prediction_training": False,
        "token_level_confidence": True,
        "alpha_pae": 1.0,  # > 0: PAE / pTM / ipTM are predicted and written
        "min_dist": 2.0,
        "max_dist": 22.0,
        "use_kernels": False,
        "predict_args": None,
        "steering_args": None,
        "training_args": copy.deepcopy(_TRAINING_ARGS),
        "validation_args": copy.deepcopy(_VALIDATION_ARGS),
        "diffusion_process_args": dict(_BOLTZ2_DIFFUSION),
        "diffusion_loss_args": dict(_DIFFUSION_LOSS_ARGS),
    }
    hp.update(over)
    return hp


def _confidence_args(blocks: int, heads: int, **pairformer_extra: Any) -> dict[str, Any]:
    return {
        # The first block of keys is what two independent ports report for the released
        # checkpoint; the unused ones (use_gaussian, use_miniformer, ...) are absorbed by
        # ConfidenceModule's **kwargs.
        "use_gaussian": False,
        "num_dist_bins": 64,
        "max_dist": 22,
        "use_miniformer": False,
        "no_trunk_feats": False,
        "add_s_to_z_prod": True,
        "add_s_input_to_s": True,
        "use_s_diffusion": False,
        "add_z_input_to_z": True,
        "pairformer_args": {
            "num_blocks": blocks,
            "num_heads": heads,
            "dropout": 0.0,
            "v2": True,  # ConfidenceModule forces it anyway
            **pairformer_extra,
        },
        "confidence_args": {
            "num_plddt_bins": 50,
            "num_pde_bins": 64,
            "num_pae_bins": 64,
            "relative_confidence": "none",
            "use_separate_heads": True,
        },
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The released Boltz-2 structure + confidence model: 506,724,992 parameters (2.03 GB fp32).
    "full": _common(
        atom_s=128,
        atom_z=16,
        token_s=384,
        token_z=128,
        ema=True,
        embedder_args={
            "atom_encoder_depth": 3,
            "atom_encoder_heads": 4,
            "add_mol_type_feat": True,
            "add_method_conditioning": True,
            "add_modified_flag": True,
            "add_cyclic_flag": True,
        },
        msa_args={
            "msa_s": 64,
            "msa_blocks": 4,
            "msa_dropout": 0.15,
            "z_dropout": 0.25,
            "pairwise_head_width": 32,
            "pairwise_num_heads": 4,
            "use_paired_feature": True,
            "activation_checkpointing": True,
            "subsample_msa": False,
            "num_subsampled_msa": 1024,
        },
        template_args={
            "template_dim": 64,
            "template_blocks": 2,
            "activation_checkpointing": True,
        },
        pairformer_args={
            "num_blocks": 64,
            "num_heads": 16,
            "dropout": 0.25,
            "post_layer_norm": False,
            "activation_checkpointing": True,
            "v2": True,
        },
        score_model_args={
            "sigma_data": 16,
            "dim_fourier": 256,
            "atom_encoder_depth": 3,
            "atom_encoder_heads": 4,
            "token_transformer_depth": 24,
            "token_transformer_heads": 16,
            "atom_decoder_depth": 3,
            "atom_decoder_heads": 4,
            "conditioning_transition_layers": 2,
            "transformer_post_ln": False,
            "activation_checkpointing": True,
        },
        confidence_model_args=_confidence_args(8, 16),
    ),
    # Same switches as `full` (templates v2, confidence with separate heads, b-factor, bond types,
    # method / modified / cyclic / mol-type conditioning), every stack 1-2 deep and narrow: a full
    # predict of a ~30-token complex takes seconds on one CPU core.
    "tiny": _common(
        atom_s=16,
        atom_z=8,
        token_s=32,
        token_z=16,
        embedder_args={
            "atom_encoder_depth": 1,
            "atom_encoder_heads": 2,
            "add_mol_type_feat": True,
            "add_method_conditioning": True,
            "add_modified_flag": True,
            "add_cyclic_flag": True,
        },
        msa_args={
            "msa_s": 8,
            "msa_blocks": 1,
            "msa_dropout": 0.15,
            "z_dropout": 0.25,
            "pairwise_head_width": 8,
            "pairwise_num_heads": 2,
            "use_paired_feature": True,
            "activation_checkpointing": False,
            "subsample_msa": False,
            "num_subsampled_msa": 1024,
        },
        template_args={
            "template_dim": 8,
            "template_blocks": 1,
            "pairwise_head_width": 8,
            "pairwise_num_heads": 2,
            "activation_checkpointing": False,
        },
        pairformer_args={
            "num_blocks": 2,
            "num_heads": 2,
            "pairwise_head_width": 8,
            "pairwise_num_heads": 2,
            "dropout": 0.25,
            "post_layer_norm": False,
            "activation_checkpointing": False,
            "v2": True,
        },
        score_model_args={
            "sigma_data": 16,
            "dim_fourier": 16,
            "atom_encoder_depth": 1,
            "atom_encoder_heads": 2,
            "token_transformer_depth": 2,
            "token_transformer_heads": 2,
            "atom_decoder_depth": 1,
            "atom_decoder_heads": 2,
            "conditioning_transition_layers": 1,
            "transformer_post_ln": False,
            "activation_checkpointing": False,
        },
        confidence_model_args=_confidence_args(1, 2, pairwise_head_width=8, pairwise_num_heads=2),
    ),
}


def _affinity_head_args(pairformer_blocks: int, head_s: int) -> dict[str, Any]:
    """`affinity_model_args{,1,2}` of one AffinityModule: its pair stack and head widths."""
    return {
        "use_cross_transformer": False,
        "num_dist_bins": 64,
        "max_dist": 22,
        "groups": {},
        "pairformer_args": {
            "num_blocks": pairformer_blocks,
            "dropout": 0.25,
            "pairwise_head_width": 8,
            "pairwise_num_heads": 2,
            "activation_checkpointing": False,
        },
        # AffinityHeadsTransformer reads token_s (the MLP width); num_blocks / num_heads are unused.
        "transformer_args": {"token_s": head_s, "num_blocks": 1, "num_heads": 2, "activation_checkpointing": False},
    }


# The `tiny` model with Boltz-2's affinity heads (an ensemble of two, as the released affinity
# checkpoint), narrow and shallow: what the affinity pass of `boltz_cp predict` reads in tests.
PRESETS["tiny-affinity"] = {
    **copy.deepcopy(PRESETS["tiny"]),
    "affinity_prediction": True,
    "affinity_ensemble": True,
    "affinity_mw_correction": True,  # upstream Boltz2's default; the CLI sets it (default false)
    "affinity_model_args1": _affinity_head_args(2, 16),
    "affinity_model_args2": _affinity_head_args(1, 16),
}

# What in the `tiny-affinity` preset follows upstream and what is guessed.
AFFINITY_PRESET_NOTES = {
    "from upstream code": (
        "affinity_prediction with affinity_ensemble (Boltz2 builds affinity_module1 / 2; upstream's "
        "writer and docs report the ensemble's *1 / *2 values), AffinityModule defaults num_dist_bins "
        "64 / max_dist 22, the heads' MLP width from transformer_args['token_s']; the affinity forward "
        "needs the confidence module (ipTM picks the sample), which the preset keeps on"
    ),
    "guessed (released values reported by third parties: pair stacks of 8 and 4 blocks, head width "
    "384, groups {0: 1, 1: 4, 2: 6, 3: 4, 4: 1})": (
        "the sizes here (2 and 1 blocks, width 16, no groups), and that the affinity checkpoint's "
        "trunk has the structure checkpoint's architecture; affinity_mw_correction true in the saved "
        "hparams (upstream's __init__ default; `boltz predict` and `boltz_cp predict` override it)"
    ),
}

# What in the `full` preset is known and what is guessed (reported by `describe_preset`).
FULL_PRESET_NOTES = {
    "from upstream code": (
        "pairformer 64 blocks x 16 s-heads, v2 (PairformerArgsV2); MSA 4 blocks, msa_s 64, "
        "tri-attn 4 x 32, paired feature (MSAModuleArgs); pair-weighted averaging 8 x 32 and OPM "
        "c_hidden 32 are hard-coded in MSALayer; sampling defaults (Boltz2DiffusionParams)"
    ),
    "from structurev2.yaml (training config)": (
        "token_s 384, token_z 128, atom_s 128, atom_z 16, num_bins 64, atom_feature_dim 388, "
        "windows 32/128, embedder (3 x 4 heads, mol-type/method/modified/cyclic conditioning), "
        "templates dim 64 x 2 blocks, score model (fourier 256, atom enc/dec 3 x 4, token "
        "transformer 24 x 16, 2 conditioning transitions), bond_type_feature, fix_sym_check, "
        "cyclic_pos_enc, predict_bfactor, conditioning cutoffs 4/20"
    ),
    "from third-party ports that read the real checkpoint": (
        "confidence_model_args (8 blocks x 16 heads, add_s_to_z_prod / add_s_input_to_s / "
        "add_z_input_to_z, 64 dist bins, plddt 50 / pde 64 / pae 64, use_separate_heads), "
        "use_templates_v2 true"
    ),
    "guessed (no effect on weights or inference)": (
        "training_args, validation_args, diffusion_loss_args, dropouts, activation_checkpointing, "
        "ema, structure_prediction_training, exclude_ions_from_lddt, alpha_pae 1.0 (only needs > 0), "
        "diffusion_process_args (upstream predict overrides them with Boltz2DiffusionParams)"
    ),
}


# blocks.<name> -> the hyperparameter paths it sets (upstream's hparams layout).
BLOCK_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pairformer": (("pairformer_args", "num_blocks"),),
    "msa": (("msa_args", "msa_blocks"),),
    "template": (("template_args", "template_blocks"),),
    "confidence": (("confidence_model_args", "pairformer_args", "num_blocks"),),
    "token_transformer": (("score_model_args", "token_transformer_depth"),),
    "atom_encoder": (("score_model_args", "atom_encoder_depth"), ("embedder_args", "atom_encoder_depth")),
    "atom_decoder": (("score_model_args", "atom_decoder_depth"),),
}


def _set(hp: dict, path: tuple[str, ...], value: int) -> int | None:
    node = hp
    for key in path[:-1]:
        if node.get(key) is None:
            return None
        node = node[key]
    old = node.get(path[-1])
    node[path[-1]] = value
    return old


def apply_blocks(hp: dict, blocks: dict, limit_to_existing: bool) -> dict[str, int]:
    """Set the block counts of `blocks` (name -> K or None) in hp, in place; returns the counts
    in effect. With `limit_to_existing` a count above the architecture's own is refused (its
    weights do not exist)."""
    unknown = sorted(set(blocks) - set(BLOCK_KEYS))
    if unknown:
        raise ConfigError(f"unknown blocks.{unknown[0]} (known: {', '.join(BLOCK_KEYS)})")
    used = {}
    for name, paths in BLOCK_KEYS.items():
        value = blocks.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"blocks.{name} must be a positive integer or null, got {value!r}")
        for path in paths:
            node = hp
            for key in path[:-1]:
                node = node.get(key) or {}
            own = node.get(path[-1])
            if value is not None and own is not None:
                if limit_to_existing and value > own:
                    raise ConfigError(f"blocks.{name}={value}: the checkpoint has only {own} "
                                      f"(no weights for more)")
                _set(hp, path, value)
            if own is not None and name not in used:
                used[name] = value if value is not None else own
    return used
