"""The two jobs: the daily chain production needs, and the paper's comparisons on demand."""

import dagster as dg

from saviorrec_pipeline.assets.common import PAPER_GROUP

paper_assets = dg.AssetSelection.groups(PAPER_GROUP)

chain_job = dg.define_asset_job(
    "saviorrec_chain",
    selection=dg.AssetSelection.all() - paper_assets,
    description="What production needs for one day D: validate the raw sources, mine co-clicks from D's training window, "
    "train SaviorEnc and the RQ-VAE when due (else reuse the champions'), embed and code the catalog, build the ranking dataset, "
    "train the CTR challenger (saviorrec and base, going on from the champion's state), gate it against the champion and report "
    "AUC per PV bucket.",
)

paper_tables_job = dg.define_asset_job(
    "paper_tables",
    selection=paper_assets,
    description="The paper's comparisons for a day whose chain has run: Table 4's encoder variants (i2i_retrieval), Fig. 5's "
    "embedding maps (embedding_map), the argmin RQ-VAE and faiss quantiser beside the semantic IDs (rq_comparison), Table 3's "
    "ablations and Fig. 4's feature removals (ctr_ablations), Table 5's MBA dimensions (mba_dimensions), and their AUC per PV "
    "bucket (ablation_report).",
)
