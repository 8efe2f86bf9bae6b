"""Parquet storage on disk and on a real S3 server: exact replacement, atomic writes."""

import polars as pl
import pytest
import torch

from saviorrec_pipeline.checkpoints import Checkpoint, TrainingState
from saviorrec_pipeline.resources.storage import ParquetStorage, filesystem


@pytest.fixture(params=[pytest.param("local", marks=pytest.mark.unit), pytest.param("s3", marks=pytest.mark.integration)])
def storage(request: pytest.FixtureRequest, tmp_path) -> ParquetStorage:
    if request.param == "local":
        return ParquetStorage(root=str(tmp_path / "storage"))
    return ParquetStorage(root=request.getfixturevalue("s3_root") + "/storage")


def _frame(rows: int, offset: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"item_a": range(offset, offset + rows), "item_b": range(offset + 1, offset + rows + 1)})


def _folder_listing(storage: ParquetStorage, asset: str) -> list[str]:
    fs, path = filesystem(f"{storage.root}/{asset}")
    return sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False))


def test_layout_is_root_asset_partition(storage: ParquetStorage):
    uri = storage.write(_frame(3), "coclick_pairs", "2025-07-22")
    assert uri == f"{storage.root}/coclick_pairs/2025-07-22.parquet"
    assert _folder_listing(storage, "coclick_pairs") == ["2025-07-22.parquet"]


def test_rewrite_replaces_the_partition_exactly(storage: ParquetStorage):
    storage.write(_frame(10), "coclick_pairs", "2025-07-22")
    storage.write(_frame(3, offset=100), "coclick_pairs", "2025-07-22")
    storage.write(_frame(5), "coclick_pairs", "2025-07-23")
    assert storage.read("coclick_pairs", "2025-07-22").equals(_frame(3, offset=100))
    assert storage.read("coclick_pairs", "2025-07-23").equals(_frame(5))
    assert _folder_listing(storage, "coclick_pairs") == ["2025-07-22.parquet", "2025-07-23.parquet"]


def test_a_write_failing_midway_leaves_the_previous_file_readable(storage: ParquetStorage, monkeypatch):
    storage.write(_frame(10), "coclick_pairs", "2025-07-22")

    def write_half_then_fail(self, file, **kwargs):
        file.write(b"PAR1 half a file")
        raise OSError("disk full")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="disk full"):
        patch.setattr(pl.DataFrame, "write_parquet", write_half_then_fail)
        storage.write(_frame(3, offset=100), "coclick_pairs", "2025-07-22")
    assert storage.read("coclick_pairs", "2025-07-22").equals(_frame(10))
    assert _folder_listing(storage, "coclick_pairs") == ["2025-07-22.parquet"]  # no temp object left


def test_missing_partition_names_what_to_materialize(storage: ParquetStorage):
    with pytest.raises(FileNotFoundError, match="materialize coclick_pairs for partition 2025-07-22"):
        storage.read("coclick_pairs", "2025-07-22")


@pytest.mark.unit
@pytest.mark.parametrize("asset, partition", [("../escape", "2025-07-22"), ("coclick_pairs", "../../x"), ("", "p")])
def test_names_that_leave_the_root_are_refused(tmp_path, asset, partition):
    with pytest.raises(ValueError, match="unsafe"):
        ParquetStorage(root=str(tmp_path)).write(_frame(1), asset, partition)


@pytest.mark.parametrize("every", [0, 1, 3])
def test_checkpoints_keep_every_nth_epoch_and_clear_per_partition(storage: ParquetStorage, every: int):
    storage = storage.model_copy(update={"checkpoint_every_epochs": every})
    file = storage.checkpoint("ctr_model", "2025-07-22", "saviorrec-0123abcd")
    assert file.uri == f"{storage.root}/checkpoints/ctr_model/2025-07-22/saviorrec-0123abcd.safetensors"
    assert file.read() is None
    for epoch in range(1, 8):
        file.write(f"epoch {epoch}".encode())
    assert file.read() == (None if every == 0 else f"epoch {7 // every * every}".encode())
    storage.checkpoint("ctr_model", "2025-07-23", "base-0123abcd").write(b"other day")

    storage.clear_checkpoints("ctr_model", "2025-07-22")
    assert file.read() is None
    assert storage.checkpoint("ctr_model", "2025-07-23", "base-0123abcd").read() == (None if every != 1 else b"other day")


def test_saved_position_reads_a_checkpoints_phase_and_epoch_from_its_header(storage: ParquetStorage):
    file = storage.checkpoint("item_encoder", "2025-07-22", "0123abcd")
    assert file.saved_position() is None
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    for epoch in (1, 2, 3):
        file.write(Checkpoint.capture("alignment", epoch, [0.5] * epoch, TrainingState(model, optimizer, torch.Generator())).to_bytes())
    assert file.saved_position() == ("alignment", 3)
    assert Checkpoint.from_bytes(file.read()).epochs_done == 3
