"""params.yaml as `dvc exp run` composes it from conf/ (DVC's Hydra composition), through Hydra's compose API."""

from __future__ import annotations

from pathlib import Path


def compose_params(conf_dir: Path, overrides: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides or []), resolve=True)
