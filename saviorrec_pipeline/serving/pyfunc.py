"""The three registered models as MLflow pyfunc models built from code.

Each model's directory holds an `MLmodel` file, a signature and an input example, the model class
as a Python file (`model_code/`, run by MLflow when it loads the model) and the weights as
safetensors with a JSON config under `artifacts/`: loading rebuilds the module from this package's
code, and nothing is unpickled.

- saviorrec-item-encoder: `title` and `image` (bytes; base64 in JSON) -> `embedding` (z)
- saviorrec-rqvae: `embedding` -> `codes` (the semantic ID)
- saviorrec-ctr: a ranking row (see `serving.ranker`) -> `pctr`

A request the model cannot read is refused with an MlflowException of INVALID_PARAMETER_VALUE
(HTTP 400 from `mlflow models serve`) whose message names the column.
"""

import base64
import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, DataType, Schema
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from torch import nn

from saviorrec_pipeline.method.ctr_model import CTRConfig, CTRModel
from saviorrec_pipeline.method.ctr_training import STAT_COLUMNS
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.encoder import EncoderConfig, SaviorEnc
from saviorrec_pipeline.method.encoder_training import catalog_tensors, embed_catalog
from saviorrec_pipeline.method.rqvae import RQVAE, RQVAEConfig, assign_codes
from saviorrec_pipeline.serving.ranker import Ranker, RequestError

MODEL_CODE = Path(__file__).parent / "model_code"
WEIGHTS, CONFIG = "weights", "config"  # the artifact keys every model has


@dataclass
class ServedModel:
    """What makes logged weights an MLflow model: the class file, the signature, an input example."""

    code: Path
    signature: ModelSignature
    input_example: pd.DataFrame

    def save(self, folder: Path, weights: Path, config: Path, files: dict[str, Path]) -> None:
        """The model directory at `folder` (which must not exist), with copies of the `weights`
        (safetensors), the JSON `config` and further `files` (name: local file) as its artifacts."""
        artifacts = {WEIGHTS: str(weights), CONFIG: str(config), **{name: str(path) for name, path in files.items()}}
        mlflow.pyfunc.save_model(
            path=str(folder), python_model=str(self.code), artifacts=artifacts, signature=self.signature,
            input_example=self.input_example,
            # Said, not inferred: inferring loads the model in a subprocess at every logging.
            pip_requirements=[f"saviorrec-pipeline=={version('saviorrec-pipeline')}"],
        )


def _rebuilt(context, build: Callable[[dict], nn.Module]) -> tuple[nn.Module, dict]:
    """The module `build` makes from the logged architecture, with the logged weights, in eval
    mode; and the logged JSON config."""
    saved = json.loads(Path(context.artifacts[CONFIG]).read_text())
    model = build(saved["architecture"])
    model.load_state_dict(load_file(context.artifacts[WEIGHTS]))
    return model.eval(), saved


def refused(error: RequestError) -> MlflowException:
    return MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE)


# ---- saviorrec-ctr ----

class RankerModel(mlflow.pyfunc.PythonModel):
    """pCTR for ranking rows (`serving.ranker.Ranker`)."""

    def load_context(self, context) -> None:
        self.ranker = Ranker.from_saved(*_rebuilt(context, lambda architecture: CTRModel(CTRConfig.from_dict(architecture))))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return pd.DataFrame({"pctr": self.ranker.score(model_input)})
        except RequestError as error:
            raise refused(error) from None


def ranker_served(rows: pl.DataFrame, vocabularies: dict[str, list[str]], use_base_pctr: bool) -> ServedModel:
    """The ranker's signature and input example, from ranking rows (`ranking_dataset`'s columns)."""
    columns = ["user_id", *vocabularies, "item_id", *(f"item_{n}" for n in STAT_COLUMNS), "seq_items", *(f"seq_{n}" for n in STAT_COLUMNS)]
    columns += ["base_pctr"] if use_base_pctr else []
    example = rows.head(2).select(columns)
    schema = Schema([_column_spec(name, dtype) for name, dtype in example.schema.items()] + [
        ColSpec(Array(DataType.double), "embedding", required=False), ColSpec(Array(DataType.long), "codes", required=False),
    ])
    return ServedModel(MODEL_CODE / "ctr.py", ModelSignature(schema, Schema([ColSpec(DataType.float, "pctr")])), _pandas(example))


# ---- saviorrec-item-encoder ----

class ItemEncoderModel(mlflow.pyfunc.PythonModel):
    """z of items from their `title` and `image`, either of which may be missing."""

    def load_context(self, context) -> None:
        self.model, _ = _rebuilt(context, lambda architecture: SaviorEnc(EncoderConfig.from_dict(architecture)))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            items = items_frame(model_input)
        except RequestError as error:
            raise refused(error) from None
        z = embed_catalog(self.model, catalog_tensors(items, self.model.config), device_for_training())
        return pd.DataFrame({"embedding": list(z)})


def items_frame(request: pd.DataFrame) -> pl.DataFrame:
    """A request as catalog rows: `title` (string) and `image` (the file's bytes, or them in base64)."""
    if "title" not in request.columns and "image" not in request.columns:
        raise RequestError("title", "missing; a request needs `title`, `image` or both")
    rows = len(request)
    titles = [None if _missing(t) else t for t in request["title"]] if "title" in request.columns else [None] * rows
    if any(t is not None and not isinstance(t, str) for t in titles):
        raise RequestError("title", f"row {next(i for i, t in enumerate(titles) if t is not None and not isinstance(t, str))} is not a string")
    images = [_image_bytes(value, row) for row, value in enumerate(request["image"])] if "image" in request.columns else [None] * rows
    return pl.DataFrame({"item_id": np.arange(rows), "title": titles, "image": images}, schema={"item_id": pl.Int64, "title": pl.String, "image": pl.Binary})


def _image_bytes(value, row: int) -> bytes | None:
    if _missing(value):
        return None
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image", f"row {row} is a string but not base64") from None
    if not isinstance(value, (bytes, bytearray)):
        raise RequestError("image", f"row {row} is {type(value).__name__}, not image bytes")
    try:
        Image.open(io.BytesIO(value)).verify()
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise RequestError("image", f"row {row} is not an image file PIL can read") from None
    return bytes(value)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def item_encoder_served(catalog: pl.DataFrame) -> ServedModel:
    """The encoder's signature, and an input example of two catalog items (with their images
    where both have one; MLflow writes them to JSON in base64 and decodes them back)."""
    example = catalog.head(2)
    frame = pd.DataFrame({"title": example["title"].to_list()})
    if "image" in example.columns and example["image"].null_count() == 0:
        frame["image"] = example["image"].to_list()
    schema = Schema([ColSpec(DataType.string, "title", required=False), ColSpec(DataType.binary, "image", required=False)])
    return ServedModel(MODEL_CODE / "item_encoder.py", ModelSignature(schema, Schema([ColSpec(Array(DataType.float), "embedding")])), frame)


# ---- saviorrec-rqvae ----

class SemanticIdModel(mlflow.pyfunc.PythonModel):
    """The semantic ID (L codes) of each `embedding`, assigned as the semantic_ids stage assigns them."""

    def load_context(self, context) -> None:
        self.model, saved = _rebuilt(context, lambda architecture: RQVAE(RQVAEConfig.from_dict(architecture)))
        self.assignment = saved["inference_assignment"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            z = embeddings_of(model_input, self.model.config.input_dim)
        except RequestError as error:
            raise refused(error) from None
        codes, _ = assign_codes(self.model, torch.from_numpy(z), self.assignment, device_for_training())
        return pd.DataFrame({"codes": [row.tolist() for row in codes.astype(np.int64)]})


def embeddings_of(request: pd.DataFrame, dim: int) -> np.ndarray:
    if "embedding" not in request.columns:
        raise RequestError("embedding", "missing")
    try:
        z = np.array([np.asarray(value, dtype=np.float32) for value in request["embedding"]], dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError("embedding", f"every row must be a list of {dim} numbers") from None
    if z.ndim != 2 or z.shape[1] != dim:
        raise RequestError("embedding", f"every row must be a list of {dim} numbers, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise RequestError("embedding", f"row {int(np.flatnonzero(~np.isfinite(z).all(axis=1))[0])} holds NaN or infinite values")
    return z


def rqvae_served(item_embeddings: pl.DataFrame) -> ServedModel:
    example = pd.DataFrame({"embedding": item_embeddings["embedding"].head(2).to_list()})
    signature = ModelSignature(Schema([ColSpec(Array(DataType.double), "embedding")]), Schema([ColSpec(Array(DataType.long), "codes")]))
    return ServedModel(MODEL_CODE / "rqvae.py", signature, example)


def _column_spec(name: str, dtype: pl.DataType) -> ColSpec:
    """A ranking column's MLflow type: integers as long and floats as double, so that JSON numbers of either width fit."""
    inner = dtype.inner if isinstance(dtype, (pl.List, pl.Array)) else dtype
    base = DataType.long if inner.is_integer() else DataType.double if inner.is_float() else DataType.boolean if inner == pl.Boolean else DataType.string
    return ColSpec(Array(base) if inner is not dtype else base, name)


def _pandas(frame: pl.DataFrame) -> pd.DataFrame:
    """Python values per cell (lists stay lists), as a JSON request carries them."""
    return pd.DataFrame({name: frame[name].to_list() for name in frame.columns})
