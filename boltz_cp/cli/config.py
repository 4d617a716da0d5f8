"""Hydra configuration for the CLI, composed in-process.

The compose API is used instead of `@hydra.main`: under torchrun every rank runs the app, and
compose never changes directory or creates output folders, so ranks cannot race. The resolved
config is written by the writer rank alone, next to the results.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from boltz_cp.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_MESH = re.compile(r"^mesh=(\d+)x(\d+)$")


def mesh_choices() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "mesh").glob("*.yaml"))


def _expand_mesh(override: str) -> list[str]:
    """`mesh=RxC` for a shape without a config file becomes `mesh.rows=R mesh.cols=C`."""
    m = _MESH.match(override)
    if m and f"{m[1]}x{m[2]}" not in mesh_choices():
        return [f"mesh.rows={m[1]}", f"mesh.cols={m[2]}"]
    return [override]


def compose_config(overrides: list[str], name: str = "predict") -> DictConfig:
    """Compose `configs/<name>.yaml` with command-line overrides; errors become ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    expanded = [o for ov in overrides for o in _expand_mesh(ov)]
    for ov in expanded:
        if "=" not in ov:
            raise ConfigError(f"unexpected argument '{ov}': settings are given as key=value")
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=name, overrides=expanded)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).splitlines()[0]
        if "mesh" in msg:
            msg += f" (mesh configs: {', '.join(mesh_choices())}; or mesh=RxC, or mesh.rows=R mesh.cols=C)"
        raise ConfigError(f"bad setting: {msg}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_help(cfg: DictConfig) -> str:
    """The composed config with its comments stripped: what a user can set (secrets hidden)."""
    from boltz_cp.data.msa_server import redacted

    return OmegaConf.to_yaml(redacted(cfg))
