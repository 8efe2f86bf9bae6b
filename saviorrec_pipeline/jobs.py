"""The chain job."""

import dagster as dg

chain_job = dg.define_asset_job(
    "saviorrec_chain",
    selection=dg.AssetSelection.all(),
    description="The whole chain for one day D: validate the raw sources, mine co-clicks from D's training window, "
    "train SaviorEnc, embed the catalog, report i2i Hit@K, assign RQ-VAE semantic IDs, build the ranking dataset, "
    "train the CTR variants and report AUC per PV bucket.",
)
