"""The registered models serving their users: MLflow pyfunc models loaded in a fresh process,
`mlflow models serve` answering requests, the ONNX export, batch scoring, and a cold-start item
onboarded and scored."""

import copy
import json
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from saviorrec_pipeline.assets.ctr_model import load_ctr_model
from saviorrec_pipeline.cli import main
from saviorrec_pipeline.demo import generate_demo
from saviorrec_pipeline.resources.tracking import MlflowTracking
from saviorrec_pipeline.serving.onnx_export import OnnxRanker
from saviorrec_pipeline.serving.ranker import Ranker, RequestError
from saviorrec_pipeline_tests.services import group_members, isolated_environ, start_model_server, stop, wait_until
from saviorrec_pipeline_tests.test_continuous_training import SPEC, Chain

pytestmark = pytest.mark.integration

DAY = "2025-07-06"
KEY = ["user_id", "item_id", "ts"]


@dataclass
class Served:
    home: Path
    raw: Path
    tracking_uri: str
    eval_rows: pl.DataFrame  # ranking_dataset's evaluation rows
    asset_pctr: pl.DataFrame  # ctr_model's saviorrec predictions, by KEY
    item_embeddings: pl.DataFrame
    semantic_ids: pl.DataFrame

    def ranker(self) -> Ranker:
        tracking = MlflowTracking(tracking_uri=self.tracking_uri, artifact_root=str(self.home / "artifacts"))
        return Ranker.from_saved(*load_ctr_model("models:/saviorrec-ctr@champion", tracking))

    def env(self) -> dict[str, str]:
        return {**isolated_environ(), "MLFLOW_TRACKING_URI": self.tracking_uri}

    def differences(self, rows: pl.DataFrame, pctr) -> np.ndarray:
        """|pctr - the asset's| per row of `rows` (every row must have an asset prediction)."""
        joined = rows.select(KEY).with_columns(pl.Series("served", np.asarray(pctr), dtype=pl.Float64)).join(self.asset_pctr, on=KEY)
        assert joined.height == rows.height
        return (joined["served"] - joined["pctr"]).abs().to_numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("serving")
    generate_demo(root / "raw", SPEC)
    chain = Chain(root / "raw", root / "home")
    assert chain.run(DAY).success
    storage = chain.storage
    predictions = storage.read("ctr_model", DAY).filter(pl.col("variant") == "saviorrec").select(*KEY, "pctr")
    return Served(root / "home", root / "raw", f"sqlite:///{root / 'home'}/mlflow.db",
                  storage.read("ranking_dataset", DAY).filter(pl.col("split") == "eval"), predictions,
                  storage.read("item_embeddings", DAY), storage.read("semantic_ids", DAY))


FRESH_PROCESS = """
import sys, mlflow, numpy as np, pandas as pd, polars as pl
requests, catalog, embeddings, out = sys.argv[1:]
ctr, encoder, rqvae = (mlflow.pyfunc.load_model(f"models:/{name}@champion") for name in ("saviorrec-ctr", "saviorrec-item-encoder", "saviorrec-rqvae"))
for model in (ctr, encoder, rqvae):
    assert model.metadata.get_input_schema() is not None and model.metadata.saved_input_example_info is not None
catalog = pl.read_parquet(catalog)
z = encoder.predict(pd.DataFrame({"title": catalog["title"].to_list(), "image": catalog["image"].to_list()}))["embedding"]
codes = rqvae.predict(pd.DataFrame({"embedding": pl.read_parquet(embeddings)["embedding"].to_list()}))["codes"]
pl.DataFrame({"item_id": catalog["item_id"], "embedding": [list(v) for v in z], "codes": [list(c) for c in codes]}).write_parquet(f"{out}/items.parquet")
pl.DataFrame({"pctr": ctr.predict(pl.read_parquet(requests).to_pandas())["pctr"].to_numpy()}).write_parquet(f"{out}/pctr.parquet")
"""


def test_the_three_champions_load_and_predict_in_a_fresh_process_as_the_assets_did(served, tmp_path):
    """`mlflow.pyfunc.load_model("models:/NAME@champion")` in a new interpreter: the ranker's pCTR
    equals ctr_model's (1e-5), the encoder's z item_embeddings' (1e-5), the RQ-VAE's codes semantic_ids'."""
    requests = tmp_path / "requests.parquet"
    served.eval_rows.write_parquet(requests)
    embeddings = tmp_path / "embeddings.parquet"
    served.item_embeddings.write_parquet(embeddings)
    catalog = served.raw / "items" / "part-0.parquet"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(requests), str(catalog), str(embeddings), str(tmp_path)],
                   env=served.env(), check=True, timeout=300, cwd=tmp_path)

    pctr = pl.read_parquet(tmp_path / "pctr.parquet")["pctr"]
    assert served.differences(served.eval_rows, pctr).max() <= 1e-5
    items = pl.read_parquet(tmp_path / "items.parquet")
    z = items.join(served.item_embeddings, on="item_id", suffix="_asset")
    assert z.height == served.item_embeddings.height
    assert np.abs(np.stack(z["embedding"].to_numpy()) - np.stack(z["embedding_asset"].to_numpy())).max() <= 1e-5
    codes = served.item_embeddings.select("item_id").join(served.semantic_ids, on="item_id").join(items, on="item_id", suffix="_served")
    assert np.array_equal(np.stack(codes["codes"].to_numpy()), np.stack(codes["codes_served"].to_numpy()))


def test_a_candidate_the_ranker_never_saw_is_scored_through_its_embedding_and_codes(served):
    """A new item id with item X's embedding and codes scores exactly as X would with a zero ID row;
    another item's features score differently; without them the request names `embedding`."""
    ranker = served.ranker()
    rows = served.eval_rows.filter(pl.col("seq_items").list.len() > 0).head(40)
    x, y = rows["item_id"][0], rows["item_id"][1]
    features = served.item_embeddings.join(served.semantic_ids.select("item_id", "codes"), on="item_id")
    feature = {row["item_id"]: row for row in features.filter(pl.col("item_id").is_in([x, y])).iter_rows(named=True)}
    new_id = int(served.item_embeddings["item_id"].max()) + 1000
    requests = rows.filter(pl.col("item_id") == x)

    def as_new(source) -> pl.DataFrame:
        return requests.with_columns(pl.lit(new_id).alias("item_id"), pl.lit(list(map(float, feature[source]["embedding"]))).alias("embedding"),
                                     pl.lit(list(map(int, feature[source]["codes"]))).alias("codes"))

    without_id_row = copy.deepcopy(ranker.model)
    with torch.no_grad():
        without_id_row.item_id_embedding.weight[int(ranker.items.numbers(np.array([x]), "test")[0])] = 0.0
    expected = Ranker(without_id_row, ranker.vocabularies, ranker.sequence_length).score(requests)
    np.testing.assert_allclose(ranker.score(as_new(x)), expected, atol=1e-6)
    assert np.abs(ranker.score(as_new(y)) - expected).max() > 1e-4, "the new item's multimodal features changed nothing"
    with pytest.raises(RequestError, match=f"'embedding'.*item_id {new_id}"):
        ranker.score(as_new(x).drop("embedding", "codes"))

    # A click on an item outside the tables is left out of the sequence.
    unknown_click = requests.with_columns(*(pl.concat_list(pl.lit([value]), column).alias(column) for column, value in
                                            (("seq_items", new_id), ("seq_impressions", 5), ("seq_clicks", 1), ("seq_ctr", 0.2))))
    np.testing.assert_allclose(ranker.score(unknown_click), ranker.score(requests), atol=1e-7)


def _post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _split(frame: pl.DataFrame) -> dict:
    return {"dataframe_split": {"columns": frame.columns, "data": [list(row) for row in frame.iter_rows()]}}


@pytest.fixture
def model_server(served, tmp_path):
    process, url = start_model_server(tmp_path, "models:/saviorrec-ctr@champion", served.env())
    wait_until(lambda: urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200, "mlflow models serve", process,
               tmp_path / "model-server.log", timeout_s=180)
    yield process, url
    stop(process)


def test_mlflow_models_serve_scores_requests_and_answers_bad_ones_with_a_4xx_naming_the_column(served, model_server):
    process, url = model_server
    columns = [c for c in served.eval_rows.columns if c not in ("ts", "clicked", "split", "pv", "seq_length")]
    rows = served.eval_rows.head(200)
    good = _split(rows.select(columns))
    status, body = _post(url, good)
    assert status == 200, body
    pctr = [p["pctr"] for p in body["predictions"]]
    assert served.differences(rows, pctr).max() <= 1e-5

    bad = {
        "item_ctr": _split(rows.select(columns).drop("item_ctr")),  # a missing column
        "user_id": _split(rows.select(columns).with_columns(pl.lit("someone").alias("user_id"))),  # a wrong type
        "seq_items": _split(rows.select(columns).with_columns(pl.lit("1,2,3").alias("seq_items"))),  # not a sequence
        "seq_clicks": _split(rows.select(columns).with_columns(pl.col("seq_clicks").list.concat(pl.lit([1])))),  # lists disagree
    }
    for column, payload in bad.items():
        status, body = _post(url, payload)
        assert 400 <= status < 500, (column, status, body)
        assert column in body.get("message", ""), (column, body)
        assert _post(url, good)[0] == 200, f"the server stopped answering after a bad {column}"
    members = group_members(process.pid)
    stop(process)
    assert members and not group_members(process.pid), "the server outlived its stop"


def test_the_onnx_export_scores_evaluation_rows_as_pytorch_does(served, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.tracking_uri)
    assert main(["export-onnx", "--model", "models:/saviorrec-ctr@champion", "--out", str(tmp_path / "ctr.onnx")]) == 0
    ranker = served.ranker()
    onnx_pctr = OnnxRanker(tmp_path / "ctr.onnx", ranker).score(served.eval_rows)
    assert np.abs(onnx_pctr - ranker.score(served.eval_rows)).max() <= 1e-5
    assert served.differences(served.eval_rows, onnx_pctr).max() <= 1e-5


def test_saviorrec_score_streams_a_file_and_refuses_one_missing_a_column_before_it_starts(served, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.tracking_uri)
    requests, scores = tmp_path / "requests.parquet", tmp_path / "scores.parquet"
    served.eval_rows.write_parquet(requests, row_group_size=500)
    assert main(["score", "--model", "models:/saviorrec-ctr@champion", "--input", str(requests), "--out", str(scores), "--batch-rows", "300"]) == 0
    written = pl.read_parquet(scores)
    assert written.select(KEY).equals(served.eval_rows.select(KEY)), "rows out of order or lost"
    assert served.differences(written, written["pctr"]).max() <= 1e-5

    served.eval_rows.drop("seq_ctr").write_parquet(tmp_path / "lacking.parquet")
    again = tmp_path / "again.parquet"
    assert main(["score", "--model", "models:/saviorrec-ctr@champion", "--input", str(tmp_path / "lacking.parquet"), "--out", str(again)]) == 2
    assert "seq_ctr" in capsys.readouterr().err
    assert not again.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
