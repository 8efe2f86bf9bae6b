"""The ranker as an ONNX graph, its item tables inside, and its scores in onnxruntime.

The graph takes a batch of encoded rows (what `Ranker.encode` makes of requests) and returns pCTR;
the item tables (z, codes, ID rows) are initialisers of the graph, so it scores the items the
ranker was trained with. The batch size and the sequence length are dynamic. The request encoding
(vocabularies, user hashing, sequence padding) stays in Python: its settings are in the graph's
metadata (`saviorrec.vocabularies`, `saviorrec.sequence_length`, `saviorrec.user_buckets`).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from saviorrec_pipeline.method.ctr_model import Batch, CTRModel
from saviorrec_pipeline.method.ctr_training import EncodedRows
from saviorrec_pipeline.serving.ranker import Ranker, RequestError

INPUTS = ("user", "profile", "item", "stats", "seq_items", "seq_stats", "seq_mask", "base_pctr")  # Batch's fields, in order


class _Scores(nn.Module):
    """CTRModel's forward over Batch's tensors, as sigmoid probabilities."""

    def __init__(self, model: CTRModel):
        super().__init__()
        self.model = model

    def forward(self, user, profile, item, stats, seq_items, seq_stats, seq_mask, base_pctr) -> torch.Tensor:
        batch = Batch(user=user, profile=profile, item=item, stats=stats, seq_items=seq_items, seq_stats=seq_stats, seq_mask=seq_mask, base_pctr=base_pctr)
        return torch.sigmoid(self.model(batch))


def export_onnx(ranker: Ranker, out: str | Path) -> None:
    """Write the ranker's graph to `out`."""
    model = ranker.model.cpu().eval()
    example = _example_batch(model, rows=17, length=11)  # sizes no other dimension has, which export would tie them to
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: ({0: batch, 1: length} if name.startswith("seq_") else {0: batch}) for name in INPUTS}
    program = torch.onnx.export(_Scores(model).eval(), tuple(getattr(example, name) for name in INPUTS), dynamo=True, dynamic_shapes=shapes,
                                input_names=list(INPUTS), output_names=["pctr"], verbose=False)
    program.model.metadata_props.update({
        "saviorrec.vocabularies": json.dumps(ranker.vocabularies), "saviorrec.sequence_length": str(ranker.sequence_length),
        "saviorrec.user_buckets": str(model.config.user_buckets),
    })
    program.save(str(out))


def _example_batch(model: CTRModel, rows: int, length: int) -> Batch:
    """Inputs to trace with: distinct items (all-equal ones would let export fix the batch size
    through torch.unique's output size)."""
    config, generator = model.config, torch.Generator().manual_seed(0)
    items = torch.randint(0, config.num_items, (rows * (length + 1),), generator=generator)
    return Batch(
        user=torch.zeros(rows, dtype=torch.long), profile=torch.zeros(rows, len(config.profile_vocab_sizes), dtype=torch.long),
        item=items[:rows], stats=torch.rand(rows, config.stats_dim, generator=generator), seq_items=items[rows:].view(rows, length),
        seq_stats=torch.rand(rows, length, config.stats_dim, generator=generator), seq_mask=torch.ones(rows, length, dtype=torch.bool),
        base_pctr=torch.rand(rows, 1, generator=generator),
    )


class OnnxRanker:
    """Requests scored by the exported graph in onnxruntime, encoded as `ranker` encodes them."""

    def __init__(self, path: str | Path, ranker: Ranker, threads: int | None = None):
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.ranker = ranker

    def score(self, rows, batch_size: int = 8192) -> np.ndarray:
        encoded, new_items = self.ranker.encode(rows)
        if new_items is not None:
            raise RequestError("item_id", "the ONNX graph scores the items in its tables; score new items with the pyfunc model")
        return self.score_encoded(encoded, batch_size)

    def score_encoded(self, encoded: EncodedRows, batch_size: int = 8192) -> np.ndarray:
        out = []
        padding = self.ranker.model.config.num_items
        for start in range(0, len(encoded), batch_size):
            batch = encoded.batch(torch.arange(start, min(start + batch_size, len(encoded))), self.ranker.sequence_length, padding)
            out.append(self.session.run(None, {name: getattr(batch, name).numpy() for name in INPUTS})[0])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
