"""Tests for data/shards.py: round trip, manifest, batching, determinism, exact resume, errors."""

import hashlib
import itertools
import json
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data import shards
from data.shards import BucketBatches, ShardError, ShardWriter, iter_samples, read_manifest

BUCKETS = [(32, 32), (48, 32), (32, 48)]
SAMPLES_PER_BUCKET = [11, 9, 7]
MAX_PER_SHARD = 4
TEXT_DIM = 8
LATENT_CHANNELS = 4


def make_samples(seed=0):
    """Reference samples: random images, variable-length text embeddings, latents."""
    rng = np.random.default_rng(seed)
    samples = []
    for bucket, n in zip(BUCKETS, SAMPLES_PER_BUCKET):
        width, height = bucket
        for i in range(n):
            length = int(rng.integers(2, 7))
            samples.append(
                dict(
                    bucket=bucket,
                    key=f"b{width}x{height}-{i:03d}",
                    caption=f"sample {i} in {width}x{height}",
                    image=Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
                    tensors=dict(
                        text_emb=rng.normal(size=(length, TEXT_DIM)).astype(np.float16),
                        text_mask=np.ones(length, dtype=bool),
                        latents=torch.from_numpy(
                            rng.normal(size=(LATENT_CHANNELS, height // 8, width // 8)).astype(np.float16)
                        ),
                    ),
                    meta={"index": i, "spec": {"shape": "circle", "n": [1, 2]}},
                )
            )
    return samples


def write(out_dir, samples, max_per_shard=MAX_PER_SHARD):
    with ShardWriter(out_dir, max_samples_per_shard=max_per_shard) as writer:
        for s in samples:
            writer.write(s["bucket"], s["key"], s["caption"], image=s["image"], tensors=s["tensors"], meta=s["meta"])
    return read_manifest(out_dir)


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, samples):
    out_dir = tmp_path_factory.mktemp("shards")
    write(out_dir, samples)
    return out_dir


# ----------------------------------------------------------------------------- round trip


def test_round_trip_values(shard_dir, samples):
    expected = {s["key"]: s for s in samples}
    read = list(iter_samples(shard_dir))
    assert len(read) == len(samples)
    assert len({r["key"] for r in read}) == len(samples)
    for r in read:
        s = expected[r["key"]]
        assert r["bucket"] == s["bucket"]
        assert r["caption"] == s["caption"]
        assert r["meta"] == s["meta"]
        assert r["image"].size == s["bucket"]
        assert np.array_equal(np.asarray(r["image"]), np.asarray(s["image"]))
        for name, value in s["tensors"].items():
            value = torch.as_tensor(value)
            assert r[name].dtype == value.dtype  # float16 kept as stored, mask stays bool
            assert torch.equal(r[name], value)


def test_read_order_is_fixed_and_buckets_filter(shard_dir):
    first = [s["key"] for s in iter_samples(shard_dir, load_images=False)]
    assert first == [s["key"] for s in iter_samples(shard_dir, load_images=False)]
    # buckets ascending by (W, H), then shards in order, then stored order
    assert [k.split("-")[0] for k in first] == sorted(k.split("-")[0] for k in first)
    only = list(iter_samples(shard_dir, buckets=[(48, 32)], load_images=False))
    assert {s["bucket"] for s in only} == {(48, 32)} and len(only) == 9
    assert all("image" not in s for s in only)
    with pytest.raises(ValueError, match="99x99"):
        list(iter_samples(shard_dir, buckets=[(99, 99)]))


def test_iter_samples_splits_shards_between_nodes(shard_dir, monkeypatch):
    # WebDataset's split_by_node reads RANK/WORLD_SIZE like torch.distributed would give
    keys_per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys_per_rank.append({s["key"] for s in iter_samples(shard_dir, load_images=False)})
    assert keys_per_rank[0] and keys_per_rank[1]
    assert not keys_per_rank[0] & keys_per_rank[1]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert keys_per_rank[0] | keys_per_rank[1] == {s["key"] for s in iter_samples(shard_dir, load_images=False)}


def test_manifest_counts_and_hashes(shard_dir):
    manifest = read_manifest(shard_dir)
    assert manifest["count"] == sum(SAMPLES_PER_BUCKET)
    assert manifest["fields"] == ["latents", "text_emb", "text_mask"]
    assert list(manifest["buckets"]) == ["32x32", "32x48", "48x32"]
    for bucket, n in zip(BUCKETS, SAMPLES_PER_BUCKET):
        entry = manifest["buckets"][f"{bucket[0]}x{bucket[1]}"]
        assert entry["count"] == n
        assert len(entry["shards"]) == -(-n // MAX_PER_SHARD)
        assert sum(manifest["shard_counts"][p] for p in entry["shards"]) == n
    for relpath, sha in manifest["shards"].items():
        assert hashlib.sha256((shard_dir / relpath).read_bytes()).hexdigest() == sha
    assert manifest["content_hash"] == shards.content_hash(manifest["shards"].values())
    assert not list(shard_dir.rglob("*.tmp"))
    # tensors are plain .npy (no pickles): every member is caption/meta/png/npy
    with tarfile.open(shard_dir / manifest["buckets"]["32x32"]["shards"][0]) as tar:
        suffixes = {name.split(".", 1)[1] for name in tar.getnames()}
    assert suffixes == {"caption.txt", "meta.json", "image.png", "latents.npy", "text_emb.npy", "text_mask.npy"}


def test_content_hash_is_reproducible_and_tracks_data(tmp_path, shard_dir, samples):
    original = read_manifest(shard_dir)["content_hash"]
    assert write(tmp_path / "same", samples)["content_hash"] == original
    changed = make_samples()
    changed[5]["tensors"]["text_emb"][0, 0] += 1
    assert write(tmp_path / "changed", changed)["content_hash"] != original


def test_writer_rejects_bad_input(tmp_path):
    with ShardWriter(tmp_path / "dup") as writer:
        writer.write((32, 32), "a", "x", tensors={"text_emb": np.zeros((2, 4), np.float16)})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write((32, 48), "a", "y")
        with pytest.raises(ValueError, match="key"):
            writer.write((32, 32), "has.dot", "y")
        with pytest.raises(ValueError, match="bucket"):
            writer.write((32, 32), "b", "y", image=Image.new("RGB", (16, 16)))
    assert read_manifest(tmp_path / "dup")["count"] == 1


def test_writer_crash_leaves_no_manifest_and_no_half_shard(tmp_path):
    out_dir = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="^boom$"):  # the error inside the block, not one of the writer's
        with ShardWriter(out_dir, max_samples_per_shard=2) as writer:
            for i in range(3):  # one full shard, one half shard
                writer.write((32, 32), f"k{i}", "c")
            raise RuntimeError("boom")
    assert [p.name for p in (out_dir / "32x32").iterdir()] == ["shard-000000.tar"]
    assert not (out_dir / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="run the data stage first"):
        read_manifest(out_dir)


# ----------------------------------------------------------------------------- batches


def test_batches_are_bucket_homogeneous_with_padding(shard_dir, samples):
    expected = {s["key"]: s for s in samples}
    batches = list(BucketBatches(shard_dir, batch_size=3, seed=0))
    assert len(batches) == sum(n // 3 for n in SAMPLES_PER_BUCKET)
    seen = [k for b in batches for k in b["key"]]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    for batch in batches:
        width, height = batch["bucket"]
        assert {expected[k]["bucket"] for k in batch["key"]} == {batch["bucket"]}
        assert batch["caption"] == [expected[k]["caption"] for k in batch["key"]]
        assert batch["latents"].shape == (3, LATENT_CHANNELS, height // 8, width // 8)
        assert batch["latents"].dtype == torch.float32
        lengths = [len(expected[k]["tensors"]["text_mask"]) for k in batch["key"]]
        assert batch["text_emb"].shape == (3, max(lengths), TEXT_DIM) and batch["text_emb"].dtype == torch.float32
        assert batch["text_mask"].shape == (3, max(lengths)) and batch["text_mask"].dtype == torch.bool
        for i, key in enumerate(batch["key"]):
            length = lengths[i]
            assert batch["text_mask"][i].sum() == length and batch["text_mask"][i, :length].all()
            stored = torch.from_numpy(expected[key]["tensors"]["text_emb"]).float()
            assert torch.equal(batch["text_emb"][i, :length], stored)
            assert not batch["text_emb"][i, length:].any()  # zero padding
            assert torch.equal(batch["latents"][i], expected[key]["tensors"]["latents"].float())


def test_keep_last_images_and_meta(shard_dir):
    loader = BucketBatches(shard_dir, 4, seed=1, fields=("text_emb", "meta"), drop_last=False, load_images=True)
    batches = list(loader)
    assert len(batches) == len(loader) == sum(-(-n // 4) for n in SAMPLES_PER_BUCKET)
    assert sum(len(b["key"]) for b in batches) == sum(SAMPLES_PER_BUCKET)
    for batch in batches:
        assert "latents" not in batch and "text_mask" not in batch
        assert all(image.size == batch["bucket"] for image in batch["image"])
        assert [m["index"] for m in batch["meta"]] == [int(k.rsplit("-", 1)[1]) for k in batch["key"]]
    with pytest.raises(ValueError, match="no field"):
        BucketBatches(shard_dir, 4, seed=0, fields=("clip_emb",))
    with pytest.raises(ValueError, match="no batches"):
        BucketBatches(shard_dir, 100, seed=0)


def keys(batches):
    return [tuple(b["key"]) for b in batches]


def test_order_is_deterministic_per_seed_and_epoch(shard_dir):
    epoch0 = keys(BucketBatches(shard_dir, 2, seed=7))
    assert epoch0 == keys(BucketBatches(shard_dir, 2, seed=7))
    assert epoch0 != keys(BucketBatches(shard_dir, 2, seed=8))
    loader = BucketBatches(shard_dir, 2, seed=7)
    loader.set_epoch(1)
    epoch1 = keys(loader)
    assert epoch1 != epoch0 and sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))
    assert loader.position() == {"epoch": 2, "batch": 0}


@pytest.mark.parametrize("cut", [5, 12, 19])  # mid-epoch 0, exactly the epoch boundary, mid-epoch 1
def test_exact_resume(shard_dir, cut):
    def take(loader, n):
        return list(itertools.islice(loader.batches_forever(), n))

    loader = BucketBatches(shard_dir, 2, seed=3)
    assert len(loader) == 12  # 5 + 4 + 3 batches of 2
    uninterrupted = take(loader, 30)

    first = BucketBatches(shard_dir, 2, seed=3)
    head = take(first, cut)
    position = json.loads(json.dumps(first.position()))  # as saved in a checkpoint
    assert position == {"epoch": cut // 12, "batch": cut % 12}
    tail = take(BucketBatches(shard_dir, 2, seed=3, start=position), 30 - cut)

    resumed = head + tail
    assert keys(resumed) == keys(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        assert all(torch.equal(a[name], b[name]) for name in ("latents", "text_emb", "text_mask"))


def test_cache_in_memory_reads_shards_once(shard_dir, monkeypatch):
    reads = []
    real_read_shard = shards._read_shard

    def counting_read_shard(shard, *args):
        reads.append(shard.relpath)
        return real_read_shard(shard, *args)

    monkeypatch.setattr(shards, "_read_shard", counting_read_shard)
    plain = BucketBatches(shard_dir, 2, seed=0)
    cached = BucketBatches(shard_dir, 2, seed=0, cache_in_memory=True)
    plain_epochs, cached_epochs, cached_reads = [], [], []
    for _ in range(3):
        plain_epochs.append(keys(plain))
        reads.clear()
        cached_epochs.append(keys(cached))
        cached_reads += reads
    assert cached_epochs == plain_epochs
    assert cached_reads and len(cached_reads) == len(set(cached_reads))  # each shard read once over all epochs


def test_preload_reads_every_shard_up_front_and_changes_no_batch(shard_dir, monkeypatch):
    reads = []
    real_read_shard = shards._read_shard
    monkeypatch.setattr(shards, "_read_shard", lambda shard, *a: reads.append(shard.relpath) or real_read_shard(shard, *a))
    plain = BucketBatches(shard_dir, 2, seed=0)
    expected = [keys(plain) for _ in range(2)]
    reads.clear()
    loaded = BucketBatches(shard_dir, 2, seed=0, cache_in_memory=True)
    n_samples = loaded.preload()
    assert n_samples == sum(entry["count"] for entry in read_manifest(shard_dir)["buckets"].values())
    assert sorted(reads) == sorted(set(reads)) and reads
    reads.clear()
    assert [keys(loaded) for _ in range(2)] == expected
    assert reads == []  # nothing decoded inside the epochs
    with pytest.raises(ValueError, match="cache_in_memory"):
        BucketBatches(shard_dir, 2, seed=0).preload()


def test_distributed_ranks_split_every_global_batch(shard_dir):
    whole = list(BucketBatches(shard_dir, 4, seed=0))
    ranks = [list(BucketBatches(shard_dir, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) > 1
    for one, first, second in zip(whole, *ranks):
        assert first["key"] + second["key"] == one["key"]  # rank 0 the first half, rank 1 the second
        assert torch.equal(torch.cat([first["latents"], second["latents"]]), one["latents"])
    with pytest.raises(ValueError, match="must split evenly over 2 processes"):
        BucketBatches(shard_dir, 3, seed=0, rank=0, world_size=2)


# ----------------------------------------------------------------------------- errors


def test_missing_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^no shard manifest at .*manifest.json: run the data stage first$"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="run the data stage first"):
        iter_samples(tmp_path / "nowhere")  # at the call, not at the first next()
    with pytest.raises(FileNotFoundError, match="run the data stage first"):
        BucketBatches(tmp_path / "nowhere", 2, seed=0)


def test_empty_and_invalid_manifest_errors(tmp_path):
    ShardWriter(tmp_path / "empty").close()
    with pytest.raises(ValueError, match="empty") as info:
        read_manifest(tmp_path / "empty")
    assert "\n" not in str(info.value)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json") as info:
        read_manifest(bad)
    assert "\n" not in str(info.value)


def corrupt_copy(tmp_path, shard_dir, how):
    """Copy the shards and damage the first 32x32 shard."""
    out_dir = tmp_path / how
    shutil.copytree(shard_dir, out_dir)
    relpath = read_manifest(out_dir)["buckets"]["32x32"]["shards"][0]
    path = out_dir / relpath
    data = path.read_bytes()
    if how == "garbage":
        data = data[:1000] + b"\xff" * 600 + data[1600:]
    elif how == "truncated":
        data = data[: len(data) // 2 + 77]
    elif how == "whole_samples_missing":
        # cut exactly after the first sample's files: a valid-looking but short tar
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        first_key = members[0].name.split(".")[0]
        last = [m for m in members if m.name.startswith(first_key + ".")][-1]
        data = data[: last.offset_data + -(-last.size // 512) * 512]
    path.write_bytes(data)
    return out_dir, path


@pytest.mark.parametrize("how", ["garbage", "truncated", "whole_samples_missing"])
def test_corrupt_shard_error_names_the_shard(tmp_path, shard_dir, how):
    out_dir, path = corrupt_copy(tmp_path, shard_dir, how)
    with pytest.raises(ShardError, match="corrupt") as info:
        list(iter_samples(out_dir))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ShardError, match=re.escape(str(path))):
        list(BucketBatches(out_dir, 2, seed=0))
