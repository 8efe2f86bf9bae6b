"""The chain job and the concurrency pool of the training stages."""

import dagster as dg

# Stages that train a model carry this pool; dagster.yaml limits it to one step at a time, so two
# trainings never share the machine, whether in one run or in several.
TRAINING_POOL = "training"

chain_job = dg.define_asset_job(
    "saviorrec_chain",
    selection=dg.AssetSelection.all(),
    description="The whole chain for one day D: validate the raw sources, mine co-clicks from D's training window, "
    "train SaviorEnc, embed the catalog, report i2i Hit@K, assign RQ-VAE semantic IDs, build the ranking dataset, "
    "train the CTR variants and report AUC per PV bucket.",
)
