"""The pipeline's definitions with Dagster's multiprocess executor (every step in its own process):
the whole-chain benchmark's alternative (benchmarks/chain.py) to the project's in-process executor.

    dagster job execute -f benchmarks/multiprocess_definitions.py -j saviorrec_chain --tags '{"dagster/partition": "2025-07-22"}'
"""

import dagster as dg

# The module, not its `defs`: Dagster refuses a file with two Definitions objects at module scope.
from saviorrec_pipeline import definitions as project

defs = dg.Definitions(
    assets=project.defs.assets,
    asset_checks=project.defs.asset_checks,
    jobs=project.defs.jobs,
    resources=project.defs.resources,
    executor=dg.multiprocess_executor,
)
