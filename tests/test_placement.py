"""Where a caption index is searched (CPU, one GPU, sharded or replicated over several) and the search batch
size that follows it. The choice is a pure function, tested here without a GPU; on this CPU machine the real
loading path must choose CPU and say why."""

from __future__ import annotations

import numpy as np
import pytest
from transresnet.index import faiss_index as fx
from transresnet.index.faiss_index import GPU_SCRATCH_BYTES, Placement, choose_placement

GIB = 1 << 30


@pytest.mark.parametrize(("kwargs", "kind", "gpus", "reason"), [
    ({"ngpu": 0}, "cpu", 0, "no GPU"),
    ({"ngpu": 4, "prefer": "cpu"}, "cpu", 0, "CPU requested"),
    ({"ngpu": 2, "mmap": True}, "cpu", 0, "memory-mapped"),
    ({"ngpu": 2, "index_kind": "hnsw"}, "cpu", 0, "HNSW"),
    ({"ngpu": 1}, "gpu", 1, "one GPU"),
    ({"ngpu": 1, "prefer": "replicate"}, "gpu", 1, "one GPU"),
    ({"ngpu": 4}, "sharded", 4, "4 GPUs hold"),
    ({"ngpu": 4, "prefer": "shard"}, "sharded", 4, "4 GPUs hold"),
    ({"ngpu": 3, "prefer": "replicate"}, "replicated", 3, "replication requested"),
])
def test_choice_with_enough_memory(kwargs, kind, gpus, reason):
    args = {"ngpu": 0, "index_kind": "flat", "index_bytes": GIB, "free_bytes": None, **kwargs}
    if args["free_bytes"] is None and args["ngpu"]:
        args["free_bytes"] = [80 * GIB] * args["ngpu"]
    placement = choose_placement(args.pop("ngpu"), args.pop("index_kind"), args.pop("index_bytes"),
                                 args.pop("free_bytes"), **args)
    assert (placement.kind, placement.gpus) == (kind, gpus)
    assert reason in placement.reason
    assert placement.on_gpu == (kind != "cpu")


def test_one_gpu_too_small_stays_on_cpu_and_says_how_short():
    placement = choose_placement(1, "ivf", 10 * GIB, [8 * GIB])
    assert placement.kind == "cpu"
    assert "does not fit" in placement.reason and "8.00 GiB free" in placement.reason


def test_sharding_adds_up_memory_that_one_gpu_lacks():
    """20 GiB on four 8 GiB GPUs: 5 GiB each (plus scratch) fits sharded, not whole."""
    assert choose_placement(4, "flat", 20 * GIB, [8 * GIB] * 4).kind == "sharded"
    replicate = choose_placement(4, "flat", 20 * GIB, [8 * GIB] * 4, prefer="replicate")
    assert replicate.kind == "sharded" and "so sharded instead" in replicate.reason
    too_big = choose_placement(4, "flat", 40 * GIB, [8 * GIB] * 4)
    assert too_big.kind == "cpu" and "even sharded" in too_big.reason


def test_the_fullest_gpu_decides_and_scratch_space_counts():
    fits = 4 * GIB + GPU_SCRATCH_BYTES
    assert choose_placement(1, "flat", 4 * GIB, [fits]).kind == "gpu"
    assert choose_placement(1, "flat", 4 * GIB, [fits - 1]).kind == "cpu"
    assert choose_placement(2, "flat", 8 * GIB, [fits, fits - 1]).kind == "cpu"


def test_unknown_free_memory_is_assumed_to_fit_and_said():
    placement = choose_placement(2, "ivfpq", 100 * GIB, None)
    assert placement.kind == "sharded" and "free GPU memory unknown" in placement.reason


def test_bad_inputs_name_what_to_fix():
    with pytest.raises(ValueError, match="choose one of auto, cpu, shard, replicate"):
        choose_placement(1, "flat", 1, [GIB], prefer="everywhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="free memory given for 1 GPUs, but there are 2"):
        choose_placement(2, "flat", 1, [GIB])
    with pytest.raises(ValueError, match=">= 0"):
        choose_placement(-1, "flat", 1)


def test_placement_reads_as_a_sentence():
    assert str(Placement("sharded", 4, "why")) == "sharded over 4 GPUs (why)"
    assert Placement("replicated", 2, "r").to_dict() == {"kind": "replicated", "gpus": 2, "reason": "r"}


def _flat(n: int = 50, dim: int = 8):
    import faiss

    index = faiss.IndexFlatIP(dim)
    index.add(np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32))
    return index


def test_index_kinds():
    import faiss

    assert fx.index_kind(_flat()) == "flat"
    assert fx.index_kind(faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT)) == "hnsw"
    assert fx.index_kind(faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)) == "ivf"
    assert fx.index_kind(faiss.index_factory(8, "IVF4,PQ2x4,RFlat", faiss.METRIC_INNER_PRODUCT)) == "ivfpq"


@pytest.mark.skipif(fx.gpu_count() > 0, reason="checks the CPU machine's choice")
def test_on_a_cpu_machine_the_index_stays_put_with_a_reason():
    index = _flat()
    placed, placement = fx.place_index(index)
    assert placed is index and placement == Placement("cpu", 0, "FAISS sees no GPU")
    assert fx.to_gpu(index) is None
    assert fx.gpu_free_bytes(0) is None


def test_loaded_index_carries_its_placement(service_index_root, tiny_checkpoint):
    from transresnet.index import load_index

    loaded = load_index(service_index_root, checkpoint=tiny_checkpoint, placement="cpu")
    assert loaded.placement == Placement("cpu", 0, "CPU requested") and not loaded.on_gpu
    mapped = load_index(service_index_root, checkpoint=tiny_checkpoint, mmap=True)
    assert mapped.placement.kind == "cpu" and "memory-mapped" in mapped.placement.reason
    assert "cpu" in repr(loaded)


# ------------------------------------------------------------------------------ the service follows it


def test_search_batch_follows_the_placement(service_settings):
    gpu, cpu = service_settings.max_search_batch_gpu, service_settings.max_search_batch
    assert gpu > cpu  # the documented defaults: large batches on a GPU
    assert service_settings.search_batch_for(True) == gpu and service_settings.search_batch_for(False) == cpu
    unbatched = service_settings.model_copy(update={"batching": False})
    assert unbatched.search_batch_for(True) == unbatched.search_batch_for(False) == 1


def test_service_shows_the_placement_and_sizes_search_batches_by_it(service_client, service_settings):
    index = service_client.get("/readyz").json()["index"]
    assert index["placement"]["kind"] == "cpu" and index["placement"]["gpus"] == 0
    assert index["placement"]["reason"]
    text = service_client.get("/metrics").text
    assert 'transresnet_index_placement_info{kind="cpu"} 1.0' in text
    assert "transresnet_index_gpus 0.0" in text
    assert f"transresnet_search_max_batch {float(service_settings.max_search_batch)}" in text
    assert service_client.app.state.resources.ranker.searcher.max_batch == service_settings.max_search_batch


def test_a_resized_batcher_collects_at_most_the_new_size():
    import asyncio

    from transresnet.service.batching import MicroBatcher

    sizes: list[int] = []
    batcher = MicroBatcher(lambda items: [x * 2 for x in items], name="t", max_batch=8, max_wait_s=0.2,
                           on_batch=lambda n, _: sizes.append(n))
    with pytest.raises(ValueError, match="at least 1"):
        batcher.resize(0)
    batcher.resize(3)
    batcher.start()

    async def submit_all() -> list[int]:
        return [value for value, _ in await asyncio.gather(*(batcher.submit(i) for i in range(7)))]

    try:
        assert asyncio.run(submit_all()) == [0, 2, 4, 6, 8, 10, 12]
    finally:
        batcher.stop()
    assert max(sizes) == 3 and sum(sizes) == 7
