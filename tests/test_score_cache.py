from pathlib import Path

import pytest
import torch
from ddp_models import gather_worker, rank_scores, run_two_processes

from lightning_sbp.score_cache import ScoreCache
from lightning_sbp.selectors import Scores


def scores(values: list[float]) -> Scores:
    losses = torch.tensor(values)
    return Scores(losses=losses, features=losses[:, None].repeat(1, 3), logit_grads=-losses[:, None], bias=False)


def test_scores_are_fresh_for_stale_epochs_after_the_epoch_that_computed_them() -> None:
    cache = ScoreCache(size=10, stale_epochs=2)
    indices = torch.tensor([7, 2, 5])
    assert cache.lookup(indices, epoch=0) is None
    cache.store(indices, scores([1.0, 2.0, 3.0]), epoch=0)
    for epoch in (0, 1, 2):
        hit = cache.lookup(torch.tensor([5, 7]), epoch)
        assert hit is not None and hit.losses.tolist() == [3.0, 1.0]
        assert hit.features is not None and hit.features.shape == (2, 3) and hit.bias is False
    assert cache.lookup(torch.tensor([5, 7]), epoch=3) is None
    assert cache.lookup(torch.tensor([5, 6]), epoch=1) is None, "one unscored example makes the batch miss"


def test_cache_state_round_trips() -> None:
    cache = ScoreCache(size=4, stale_epochs=1)
    cache.store(torch.tensor([0, 3]), scores([0.5, 1.5]), epoch=4)
    restored = ScoreCache(size=4, stale_epochs=1)
    restored.load_state_dict(cache.state_dict())
    hit = restored.lookup(torch.tensor([3, 0]), epoch=5)
    assert hit is not None and hit.losses.tolist() == [1.5, 0.5]


def test_cache_state_holds_the_scored_examples_only() -> None:
    cache = ScoreCache(size=1000, stale_epochs=1)
    assert cache.state_dict()["indices"].numel() == 0
    cache.store(torch.tensor([999, 3]), scores([0.5, 1.5]), epoch=2)
    state = cache.state_dict()
    assert state["indices"].tolist() == [3, 999]
    assert {name: tuple(row.shape) for name, row in state["rows"].items()} == {
        "losses": (2,),
        "features": (2, 3),
        "logit_grads": (2, 1),
        "scored_epoch": (2,),
    }
    restored = ScoreCache(size=1000, stale_epochs=1)
    restored.load_state_dict(state)
    assert restored.lookup(torch.tensor([3, 4]), epoch=2) is None, "an example never scored stays a miss"
    hit = restored.lookup(torch.tensor([999]), epoch=3)
    assert hit is not None and hit.features is not None and hit.features.tolist() == [[0.5] * 3]
    assert restored.lookup(torch.tensor([999]), epoch=4) is None, "the saved epoch keeps its age"


def test_a_cache_state_from_a_larger_training_set_is_refused() -> None:
    cache = ScoreCache(size=10, stale_epochs=1)
    cache.store(torch.tensor([9]), scores([1.0]), epoch=0)
    with pytest.raises(ValueError, match="holds example 9, beyond this training set of 5 examples"):
        ScoreCache(size=5, stale_epochs=1).load_state_dict(cache.state_dict())


@pytest.mark.parametrize("capacity", [None, 6])
def test_gather_scores_concatenates_every_ranks_batch_in_rank_order(tmp_path: Path, capacity: int | None) -> None:
    # Rank 0 holds 3 examples and rank 1 holds 5: the gather pads and trims, or, with a capacity known to
    # every rank, pads each batch to it in one gather and marks the padding with index -1.
    run_two_processes(gather_worker, str(tmp_path), capacity)
    batches = [rank_scores(rank) for rank in range(2)]
    for rank in range(2):
        indices, gathered = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        real = indices >= 0
        assert real.sum() == 8 and len(indices) == (8 if capacity is None else 2 * capacity)
        assert torch.equal(indices[real], torch.cat([batch_indices for batch_indices, _ in batches]))
        for name in ("losses", "logits", "logit_grads", "features"):
            expected = torch.cat([getattr(scores, name).float() for _, scores in batches])
            assert torch.equal(getattr(gathered, name)[real], expected), name
        assert gathered.bias is False
        # Storing the gathered rows leaves the padding out.
        cache = ScoreCache(size=20, stale_epochs=1)
        cache.store(indices, gathered, epoch=0)
        assert torch.nonzero(cache.scored_epochs == 0).flatten().tolist() == sorted(set(indices[real].tolist()))


def test_the_gather_sends_only_the_cached_fields_in_their_storage_dtype(tmp_path: Path) -> None:
    storage = "bfloat16"  # the narrowest: an index's 64 bits travel as four of its elements
    run_two_processes(gather_worker, str(tmp_path), 6, storage)
    batches = [rank_scores(rank) for rank in range(2)]
    dtype = getattr(torch, storage)
    indices, gathered = torch.load(tmp_path / "rank0.pt", weights_only=False)
    real = indices >= 0
    # Indices above 2**53 come back exactly: they travel as bits, not as floating-point values.
    expected_indices = torch.cat([batch_indices for batch_indices, _ in batches]) + 2**53 + 1
    assert torch.equal(indices[real], expected_indices)
    assert gathered.logits is None and gathered.features is None, "fields the cache does not keep stay home"
    for name in ("losses", "logit_grads"):
        value = getattr(gathered, name)
        assert value.dtype == dtype
        assert torch.equal(value[real], torch.cat([getattr(scores, name).to(dtype) for _, scores in batches]))


def test_loss_scores_of_a_million_examples_take_four_bytes_each_plus_the_epoch_stamp() -> None:
    from lightning_sbp.score_cache import fields_read_by
    from lightning_sbp.selectors import get_selector

    fields = fields_read_by(get_selector("loss"))
    assert fields == fields_read_by(get_selector("topk")) == ("losses",)
    cache = ScoreCache(size=1_000_000, stale_epochs=1, fields=fields)
    indices = torch.randperm(1_000_000, generator=torch.Generator().manual_seed(0))[:256]
    cache.store(indices, scores(torch.rand(256).tolist()), epoch=0)
    stamps = cache.scored_epochs.nbytes
    assert stamps == 4 * 1_000_000  # bookkeeping: one int32 epoch per example
    assert cache.nbytes - stamps <= 4 * 1_000_000
    assert set(cache.tensors) == {"losses"}
    assert cache.nbytes == ScoreCache.nbytes_for(1_000_000, {"losses": 1}, torch.float32)
    hit = cache.lookup(indices[:5], epoch=1)
    assert hit is not None and hit.features is None and hit.logit_grads is None


def test_storage_dtype_and_host_placement() -> None:
    cache = ScoreCache(size=8, stale_epochs=1, dtype=torch.bfloat16, placement="cpu")
    cache.store(torch.tensor([1, 6]), scores([1.0, 2.5]), epoch=0)
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in cache.tensors.values())
    assert cache.nbytes == ScoreCache.nbytes_for(8, {"losses": 1, "logit_grads": 1, "features": 3}, torch.bfloat16)
    hit = cache.lookup(torch.tensor([6, 1]), epoch=1)
    assert hit is not None and hit.losses.dtype == torch.float32 and hit.losses.tolist() == [2.5, 1.0]


def test_lookup_of_host_indices_reads_nothing_back() -> None:
    from dispatch import DispatchRecorder

    cache = ScoreCache(size=10, stale_epochs=1)
    cache.store(torch.tensor([1, 2]), scores([1.0, 2.0]), epoch=0)
    with DispatchRecorder() as recorder:
        assert cache.lookup(torch.tensor([2, 1]), epoch=1) is not None
        assert cache.lookup(torch.tensor([2, 3]), epoch=1) is None
    assert recorder.host_syncs() == {}
