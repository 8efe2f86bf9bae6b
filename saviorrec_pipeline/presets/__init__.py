"""Named presets of each model kind, as data: `{kind}/{name}.json` beside this file holds a model's
architecture and its training together. A stage's Dagster config names a preset and overrides fields.

    encoder  tiny | paper | minilm   SaviorEnc and its two training phases
    rqvae    tiny | paper            the RQ-VAE (its input width comes from the embeddings)
    ctr      main | ablation         the CTR variants to train, their shared architecture and training

Adding a preset is adding a file.
"""

import dataclasses
import json
from functools import cache
from pathlib import Path

from saviorrec_pipeline.method.ctr_training import CTRTrainConfig
from saviorrec_pipeline.method.encoder import EncoderConfig, with_text_tower
from saviorrec_pipeline.method.encoder_training import TrainConfig
from saviorrec_pipeline.method.rqvae import RQVAEConfig, RQVAETrainConfig

_FOLDER = Path(__file__).parent


def names(kind: str) -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in (_FOLDER / kind).glob("*.json")))


@cache
def load(kind: str, name: str) -> dict:
    path = _FOLDER / kind / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown {kind} preset {name!r}: choose one of {list(names(kind))}")
    return json.loads(path.read_text())


def overridden(config, **fields):
    """`config` (a dataclass) with the fields given a value; None leaves the preset's."""
    return dataclasses.replace(config, **{key: value for key, value in fields.items() if value is not None})


def encoder(name: str) -> tuple[EncoderConfig, TrainConfig]:
    preset = load("encoder", name)
    architecture = EncoderConfig(**preset["architecture"])
    if "text_tower_package" in preset:
        architecture = with_text_tower(architecture, _package_folder(preset["text_tower_package"], name))
    return architecture, TrainConfig(**preset["training"])


def rqvae(name: str, input_dim: int) -> tuple[RQVAEConfig, RQVAETrainConfig]:
    preset = load("rqvae", name)
    return RQVAEConfig.from_dict({"input_dim": input_dim, **preset["architecture"]}), RQVAETrainConfig(**preset["training"])


def ctr(name: str) -> tuple[list[str], dict, CTRTrainConfig]:
    """(variants, the architecture fields the data does not fix, training)."""
    preset = load("ctr", name)
    architecture = {**preset["architecture"], "dnn_dims": tuple(preset["architecture"]["dnn_dims"])}
    return list(preset["variants"]), architecture, CTRTrainConfig(**preset["training"])


def _package_folder(package: str, preset: str) -> str:
    """The Hugging Face model folder an installed package ships (its `get_model_path()`)."""
    try:
        module = __import__(package)
    except ImportError:
        raise ValueError(f"preset {preset!r} needs the optional package: pip install 'saviorrec-pipeline[{preset}]'") from None
    return str(module.get_model_path())
