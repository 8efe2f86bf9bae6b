"""The models in use: when the encoder and the RQ-VAE retrain, and the gate that decides whether a
day's CTR challenger (with the encoder and RQ-VAE it was trained with) becomes the champion.

The registered-model alias `champion` marks the versions in use. Each day the gate scores the day's
evaluation window, which neither model trained on, with the challenger and with the champion as it
would serve that day (its own encoder and RQ-VAE embedding and coding today's catalog), and
promotes the challenger only if it is not worse beyond a tolerance. Promotion moves forward only: a
partition not later than the champion's own (an old day re-materialized, or the same day again)
never moves it, unless its run asks with `promote: true`.
"""

from typing import Iterator

import dagster as dg
import polars as pl
import torch
from pydantic import Field

from saviorrec_pipeline.assets.common import RANKING_GROUP
from saviorrec_pipeline.assets.ctr_model import CONFIG as CTR_CONFIG, CTR_MODEL
from saviorrec_pipeline.assets.encoder import ENCODER_MODEL, load_encoder, read_catalog
from saviorrec_pipeline.assets.semantic_ids import RQVAE_MODEL, load_rqvae
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.ctr_model import CTRConfig
from saviorrec_pipeline.method.ctr_training import carry_model, ctr_inputs, predict
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.encoder_training import embedding_table
from saviorrec_pipeline.method.item_rows import embedding_matrix
from saviorrec_pipeline.method.metrics import PAPER_PV_EDGES, auc_report, gate_decision
from saviorrec_pipeline.method.rqvae import assign_codes
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.tracking import ChampionVersion, MlflowTracking

GATE_CHECK = "challenger_not_worse"


class ChampionGateConfig(dg.Config):
    tolerance: float = Field(default=0.002, ge=0, description="how much lower than the champion's the challenger's AUC may be")
    pv_edges: list[float] = Field(default=list(PAPER_PV_EDGES), description="the PV buckets; the lowest with clicks is compared")
    promote: bool = Field(default=False, description="let a partition not later than the champion's promote its challenger")


@dg.asset(
    group_name=RANKING_GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={name: dg.AssetIn() for name in ("ctr_model", "ranking_dataset", "item_embeddings", "semantic_ids", "item_encoder")},
    deps=["item_catalog"],
    check_specs=[dg.AssetCheckSpec(GATE_CHECK, asset="champion_gate", description="the challenger is not worse than the champion beyond the tolerance")],
    description="Champion/challenger: AUC of the day's saviorrec challenger and of the champion on the evaluation window; "
    "the challenger becomes `@champion` (with its encoder and RQ-VAE) only if it is not worse beyond the tolerance.",
)
def champion_gate(
    context: dg.AssetExecutionContext, config: ChampionGateConfig, ctr_model: pl.DataFrame, ranking_dataset: pl.DataFrame,
    item_embeddings: pl.DataFrame, semantic_ids: pl.DataFrame, item_encoder: pl.DataFrame, raw: RawStore, tracking: MlflowTracking,
) -> Iterator:
    challenger = ctr_model.filter(pl.col("variant") == "saviorrec")
    if challenger.is_empty():
        raise ValueError(f"ctr_model for {context.partition_key} has no saviorrec predictions: the gate has no challenger")
    partition, challenger_uri = context.partition_key, challenger["model_uri"][0]
    with_models = {CTR_MODEL: challenger_uri, ENCODER_MODEL: item_encoder["model_uri"][0], RQVAE_MODEL: semantic_ids["model_uri"][0]}
    champion = tracking.champion(CTR_MODEL, "champion_gate")
    if champion is None:
        report, (passed, reason) = auc_report(challenger.with_columns(variant=pl.lit("challenger")), tuple(config.pv_edges)), (True, "no champion yet: the first model becomes champion")
    else:
        scores = champion_scores(champion, ranking_dataset, item_embeddings, semantic_ids, with_models, raw, tracking, partition)
        rows = pl.concat([frame.select("item_id", "pv", "label", "pctr", variant=pl.lit(role)) for role, frame in (("challenger", challenger), ("champion", scores))])
        report = auc_report(rows, tuple(config.pv_edges), baseline="champion")
        passed, reason = gate_decision(report, config.tolerance)
    later = champion is None or champion.partition is None or partition > champion.partition
    promoted = passed and (later or config.promote)
    if passed and not promoted:
        reason += f"; not promoted: {partition} is not later than the champion's day {champion.partition} (set `promote: true` to promote anyway)"
    if promoted:
        for name, uri in with_models.items():
            tracking.promote(name, uri.rsplit("/", 1)[1])
    decision = "promoted" if promoted else "held back"
    context.log.info(f"champion gate for {partition}: {decision}: {reason}")
    tracking.tag_version(challenger_uri, {"gate.decision": decision, "gate.reason": reason, "gate.partition": partition})
    if champion is not None:
        tracking.tag_version(champion.uri, {f"gate.{partition}": f"{decision}: version {challenger_uri.rsplit('/', 1)[1]}"})
    totals = {r["variant"]: r["auc"] for r in report.filter(pl.col("bucket") == "total").iter_rows(named=True)}
    with tracking.start_run(context, "champion_gate") as run:
        run.log_params({"challenger": challenger_uri, "champion": champion.uri if champion else "none", "tolerance": config.tolerance, "decision": decision})
        run.log_metrics({f"{role}_total_auc": auc for role, auc in totals.items() if auc is not None} | {"promoted": float(promoted)})
    yield dg.Output(report.drop("delta_vs_base"), metadata={
        "decision": decision, "reason": reason, "challenger": challenger_uri, "champion_before": champion.uri if champion else "none",
        "champion_after": challenger_uri if promoted else (champion.uri if champion else "none"),
        "auc": dg.MetadataValue.md(_gate_markdown(report)), "mlflow_run_id": run.run_id,
        **{f"{role}_total_auc": round(auc, 5) for role, auc in totals.items() if auc is not None},
    })
    yield dg.AssetCheckResult(check_name=GATE_CHECK, passed=passed, severity=dg.AssetCheckSeverity.WARN, metadata={"decision": decision, "reason": reason})


def champion_scores(
    champion: ChampionVersion, ranking_dataset: pl.DataFrame, item_embeddings: pl.DataFrame, semantic_ids: pl.DataFrame,
    today: dict[str, str], raw: RawStore, tracking: MlflowTracking, partition: str,
) -> pl.DataFrame:
    """The champion's pCTR of the evaluation rows as it would serve them today: its own encoder and
    RQ-VAE embed and code today's catalog (today's tables when they are the same models), its ranker
    scores with its ID rows, an item new since it trained through its features alone."""
    saved, weights = tracking.load_model_files(champion.uri, CTR_CONFIG)
    encoder_uri, rqvae_uri = saved["encoder_uri"], saved["rqvae_uri"]
    if encoder_uri != today[ENCODER_MODEL]:
        item_embeddings, _ = embedding_table(load_encoder(encoder_uri, tracking), read_catalog(raw))
    rqvae, _ = load_rqvae(rqvae_uri, tracking)
    if (encoder_uri, rqvae_uri) != (today[ENCODER_MODEL], today[RQVAE_MODEL]):
        codes, _ = assign_codes(rqvae, torch.from_numpy(embedding_matrix(item_embeddings)), "argmin", device_for_training())
        semantic_ids = item_embeddings.select("item_id", pl.Series("codes", codes, dtype=pl.Array(pl.Int64, codes.shape[1])))
    config = CTRConfig.from_dict(saved["architecture"])
    inputs = ctr_inputs(ranking_dataset, item_embeddings, semantic_ids, rqvae.codebooks, config.user_buckets, config.use_base_pctr,
                        f"ranking_dataset {partition}", vocabularies=saved["vocabularies"], training=False)
    scores = predict(carry_model(config, weights, inputs), inputs.evaluation, saved["sequence_length"], device_for_training())
    return inputs.eval_rows.select("user_id", "item_id", "ts", pl.Series("pctr", scores, dtype=pl.Float32),
                                   pl.col("clicked").cast(pl.Int8).alias("label"), "pv", pl.lit(champion.uri).alias("model_uri"))


def _gate_markdown(report: pl.DataFrame) -> str:
    rows = [(r["bucket"], r["variant"], "n/a" if r["auc"] is None else f"{100 * r['auc']:.2f}", r["samples"], r["clicks"]) for r in report.iter_rows(named=True)]
    return table(["bucket", "model", "AUC (%)", "samples", "clicks"], rows, numeric_columns=3)
