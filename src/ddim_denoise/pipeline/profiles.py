"""params.yaml as `dvc exp run` composes it: conf/config.yaml's defaults with a profile (DVC's Hydra composition).

DVC composes params.yaml itself before each `dvc exp run`; the project composes it the same way, through Hydra's
compose API, where it changes a profile (``sweep best --apply``) and must leave params.yaml what DVC would write.
"""

from __future__ import annotations

from pathlib import Path

from ddim_denoise.pipeline import params as params_module
from ddim_denoise.pipeline.checkpoint import atomic_write_text


def conf_dir_or_default(conf_dir: Path | None) -> Path:
    return Path(conf_dir or params_module.CONF_DIR)


def profile_file(profile: str, conf_dir: Path | None = None) -> Path:
    return conf_dir_or_default(conf_dir) / "profile" / f"{profile}.yaml"


def compose_params(overrides: list[str] | None = None, conf_dir: Path | None = None) -> dict:
    """The composed params as a plain dict; ``overrides`` as `dvc exp run -S` takes them (``profile=gpu``,
    ``train.lr=1e-3``)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(conf_dir_or_default(conf_dir).resolve()), version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides or []), resolve=True)


def write_params_yaml(path: str | Path, overrides: list[str] | None = None, conf_dir: Path | None = None) -> None:
    """Write the composition to ``path`` as DVC does (OmegaConf's YAML), atomically."""
    from omegaconf import OmegaConf

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(compose_params(overrides, conf_dir))))
