"""The curation funnel on planted cases: every operator drops what it should (and counts it), clean samples pass,
a wrong column name is one line naming what exists, a corrupt file mid-source is counted and named while the rest
is processed, rebalancing caps a category, and the result does not depend on the number of worker processes."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data.curate import _ordered_bounded_map, curate
from data.funnel import THUMB
from data.shards import iter_samples, read_manifest
from kiln.config import load_config

N_CLEAN = 8


def clean_image(i: int, size=(64, 64)) -> Image.Image:
    """Sharp random blocks plus noise: high entropy and clarity, and far apart in perceptual hash."""
    rng = np.random.default_rng(i)
    blocks = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    noisy = np.asarray(image).astype(int) + rng.integers(-10, 10, (size[1], size[0], 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _bytes(image: Image.Image, fmt="PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def planted_records():
    """(file name, bytes, caption, category, the operator that must drop it or None)."""
    rows = [(f"clean{i}.png", _bytes(clean_image(i)), f"clean scene {i}", "a" if i < 6 else "b", None)
            for i in range(N_CLEAN)]
    jpeg = _bytes(clean_image(100), "JPEG")
    rows += [
        ("truncated.jpg", jpeg[: len(jpeg) // 2], "a truncated file", "a", "unreadable"),
        ("tiny.png", _bytes(clean_image(101, (16, 16))), "too small", "a", "resolution"),
        ("wide.png", _bytes(clean_image(102, (256, 48))), "too wide", "a", "aspect_ratio"),
        ("dark.png", _bytes(Image.new("RGB", (64, 64), (2, 2, 2))), "almost black", "a", "luma"),
        ("blank.png", _bytes(Image.new("RGB", (64, 64), (120, 130, 140))), "one flat colour", "a", "entropy"),
        ("blurred.png", _bytes(clean_image(0).filter(ImageFilter.GaussianBlur(4))), "a blurred copy", "a", "clarity"),
        ("nocaption.png", _bytes(clean_image(103)), "", "a", "caption"),
        ("copy.png", _bytes(clean_image(1)), "the same pixels again", "a", "exact_duplicate"),
        ("near.png", _bytes(Image.fromarray((np.asarray(clean_image(2)).astype(int) + 3).clip(0, 255)
                                            .astype(np.uint8))), "slightly brighter", "a", "near_duplicate"),
    ]
    return rows


def write_imagefolder(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as meta:
        for name, data, caption, category, _ in rows:
            (folder / name).write_bytes(data)
            meta.write(json.dumps({"file_name": name, "caption": caption, "kind": category}) + "\n")
    return folder


def fake_embed(captions):
    return torch.ones(len(captions), 4, 8), torch.ones(len(captions), 4, dtype=torch.bool)


def _cfg(sources, *extra):
    # No held-out split and no post-training: these tests count what the funnel keeps (tests/test_captions_task.py
    # tests the split and the stages after it).
    return load_config("smoke", [f"data.sources={json.dumps(sources)}", "data.funnel.num_proc=1",
                                 "data.heldout_fraction=0", "post_training=[]", *extra])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("planted") / "images", planted_records())


def test_every_operator_drops_its_planted_case_and_clean_images_pass(folder, tmp_path):
    cfg = _cfg([{"kind": "imagefolder", "path": str(folder), "category_column": "kind"}])
    funnel = curate(cfg, tmp_path / "shards", fake_embed, progress=False)
    report = funnel.report()
    dropped = {row["operator"]: row["dropped"] for row in report["operators"]}
    expected = {op: 1 for *_, op in planted_records() if op}
    assert {op: n for op, n in dropped.items() if n} == expected
    assert report["seen"] == len(planted_records()) and report["kept"] == N_CLEAN
    for row in report["operators"]:
        assert len(row["examples"]) == row["dropped"]  # each drop named in the report (up to 4 per operator)
    samples = list(iter_samples(tmp_path / "shards", load_images=True))
    # smoke rungs are 32 and 64 px: a 64 px image qualifies for both, resized and cropped to its bucket
    assert len(samples) == 2 * N_CLEAN
    assert all(s["image"].size == s["bucket"] for s in samples)
    assert {s["caption"] for s in samples} == {f"clean scene {i}" for i in range(N_CLEAN)}
    # One row of thumbnails per operator that dropped a decodable image (an unreadable file has none; duplicates
    # keep none, their first copy is in the shards).
    grid = funnel.example_grid()
    assert grid.height == THUMB * len(set(expected) - {"unreadable", "exact_duplicate", "near_duplicate"})


def test_result_is_the_same_with_two_worker_processes(folder, tmp_path):
    sources = [{"kind": "imagefolder", "path": str(folder), "category_column": "kind"}]
    curate(_cfg(sources), tmp_path / "one", fake_embed, progress=False)
    curate(_cfg(sources, "data.funnel.num_proc=2", "data.funnel.chunk_size=3"), tmp_path / "two", fake_embed,
           progress=False)
    assert read_manifest(tmp_path / "one")["content_hash"] == read_manifest(tmp_path / "two")["content_hash"]
    assert not (tmp_path / ".spill").exists()  # the workers' per-chunk files are gone once written to the shards


def _sigterm_action(_task) -> str:
    import signal

    return "default" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else "python handler"


def test_pool_workers_die_on_sigterm_whatever_handler_the_parent_has():
    """Inside a Prefect flow the parent's SIGTERM handler raises an exception; a forked worker that inherited it
    could outlive Pool.terminate() and hang the stage. Workers reset it, and the parent keeps its own."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        actions = list(_ordered_bounded_map(_sigterm_action, range(4), 2, lambda: None, ()))
        assert actions == ["default"] * 4
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_rebalancing_caps_the_larger_category(folder, tmp_path):
    cfg = _cfg([{"kind": "imagefolder", "path": str(folder), "category_column": "kind"}],
               "data.funnel.rebalance_max_ratio=1.5")
    funnel = curate(cfg, tmp_path / "shards", fake_embed, progress=False)
    kinds = [s["meta"]["kind"] for s in iter_samples(tmp_path / "shards", load_images=False)
             if s["meta"]["resolution"] == 64]
    assert sorted(kinds) == ["a"] * 3 + ["b"] * 2  # clean: 6 of a, 2 of b; a capped at 1.5 x 2
    assert {r["operator"]: r["dropped"] for r in funnel.report()["operators"]}["rebalance"] == 3


def test_a_wrong_column_name_is_one_line_naming_the_columns(folder, tmp_path):
    cfg = _cfg([{"kind": "imagefolder", "path": str(folder), "caption_column": "text"}])
    with pytest.raises(ValueError) as error:
        curate(cfg, tmp_path / "shards", fake_embed, progress=False)
    message = str(error.value)
    assert "\n" not in message and "no column 'text'" in message and "caption" in message and "image" in message


def test_an_image_folder_opened_by_its_metadata_gives_the_records_of_the_whole_listing(folder, tmp_path):
    """An image folder with metadata opens by its metadata files alone (datasets then need not resolve every image
    before the first record): the same rows as listing every file; a folder without metadata still lists its files."""
    from datasets import Image as ImageFeature, load_dataset

    from data.sources import _imagefolder_patterns, iter_unit
    from kiln.config import SourceConfig

    src = SourceConfig(kind="imagefolder", path=str(folder), category_column="kind")
    assert _imagefolder_patterns(folder, str(folder)) == [f"{folder}/**/metadata.jsonl"]
    listed = load_dataset("imagefolder", data_files={"train": f"{folder}/**"}, split="train", streaming=True)
    listed = listed.cast_column("image", ImageFeature(decode=False))
    assert ([(r["image_path"], r["caption"], r["category"]) for r in iter_unit(src, str(folder), "t")]
            == [(row["image"]["path"], row["caption"], row["kind"]) for row in listed])
    bare = tmp_path / "bare"
    bare.mkdir()
    assert _imagefolder_patterns(bare, str(bare)) == f"{bare}/**"


def test_a_corrupt_file_mid_source_is_counted_named_and_skipped(tmp_path):
    import pandas as pd

    rows = [r for r in planted_records() if r[4] is None]
    files = tmp_path / "parquet"
    files.mkdir()
    for part, chunk in enumerate([rows[:4], None, rows[4:]]):
        path = files / f"part-{part}.parquet"
        if chunk is None:
            path.write_bytes(b"PAR1 this is not a parquet file" * 10)
            continue
        pd.DataFrame({"image": [{"bytes": d, "path": None} for _, d, *_ in chunk],
                      "caption": [c for _, _, c, *_ in chunk]}).to_parquet(path)
    cfg = _cfg([{"kind": "parquet", "path": str(files / "*.parquet")}])
    funnel = curate(cfg, tmp_path / "shards", fake_embed, progress=False)
    report = funnel.report()
    assert report["kept"] == N_CLEAN  # both good files processed, before and after the bad one
    assert len(report["failed_sources"]) == 1 and "part-1.parquet" in report["failed_sources"][0]


def test_alignment_scorer_drops_misaligned_records_and_its_absence_is_noted(folder, tmp_path):
    sources = [{"kind": "imagefolder", "path": str(folder)}]
    without = curate(_cfg(sources), tmp_path / "plain", fake_embed, progress=False).report()
    assert any(n.startswith("alignment: no text-image scorer") for n in without["notices"])

    def scorer(images, captions):  # a planted judge: scene 3's caption does not describe its image
        return [0.0 if caption == "clean scene 3" else 1.0 for caption in captions]

    funnel = curate(_cfg(sources, "data.funnel.min_alignment=0.5"), tmp_path / "scored", fake_embed,
                    progress=False, scorer=scorer)
    report = funnel.report()
    assert {r["operator"]: r["dropped"] for r in report["operators"]}["alignment"] == 1
    assert report["kept"] == N_CLEAN - 1 and not report["notices"]
    captions = {s["caption"] for s in iter_samples(tmp_path / "scored", load_images=False)}
    assert "clean scene 3" not in captions and len(captions) == N_CLEAN - 1


def test_webdataset_and_parquet_sources_mix_by_weight(tmp_path):
    import pandas as pd
    import webdataset as wds

    rows = [r for r in planted_records() if r[4] is None]
    tars = tmp_path / "tars"
    tars.mkdir()
    with wds.TarWriter(str(tars / "shard-000.tar")) as tar:
        for name, data, caption, *_ in rows[:4]:
            tar.write({"__key__": name.split(".")[0], "png": data, "txt": caption})
    pd.DataFrame({"image": [{"bytes": d, "path": None} for _, d, *_ in rows[4:]],
                  "caption": [c for _, _, c, *_ in rows[4:]]}).to_parquet(tmp_path / "part.parquet")
    sources = [{"kind": "webdataset", "path": str(tars), "image_column": "png", "caption_column": "txt", "weight": 3},
               {"kind": "parquet", "path": str(tmp_path / "part.parquet")}]
    report = curate(_cfg(sources), tmp_path / "shards", fake_embed, progress=False).report()
    assert report["seen"] == N_CLEAN and report["kept"] == N_CLEAN
    keys = [s["meta"]["source_key"] for s in iter_samples(tmp_path / "shards", load_images=False)
            if s["meta"]["resolution"] == 64]
    assert sorted(k.split("-")[0] for k in keys) == ["s0u0"] * 4 + ["s1u0"] * 4  # both sources, every record


def test_data_stage_logs_report_dataset_input_and_prefect_artifact(folder, tmp_path, prefect_harness):
    from mlflow import MlflowClient
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import publish_funnel_report
    from kiln.tracking import start_run
    from stages import data

    cfg = _cfg([{"kind": "imagefolder", "path": str(folder)}])
    tracker = start_run("kiln-funnel-test", "data")
    out = tmp_path / "data"
    out.mkdir()
    result = data.run(cfg, {}, out, tracker)
    tracker.end()
    assert result.metrics["funnel/seen"] == len(planted_records()) and result.metrics["funnel/dropped_luma"] == 1
    assert (out / "funnel_examples.png").exists() and (out / "uncond.safetensors").exists()
    client = MlflowClient()
    inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == read_manifest(out / "shards")["content_hash"][:36]
    assert {"funnel.json", "funnel_report.json"} <= {a.path for a in client.list_artifacts(tracker.run_id)}

    @flow
    def publish():
        publish_funnel_report(out)

    publish()
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curation-funnel"])))
    assert found and "kept" in found[0].description


def test_synthetic_source_goes_through_the_funnel(tmp_path, monkeypatch):
    """The default source: every scene rendered in a worker, checked by every operator, counted in the report; the
    shards keep what training reads (bucketed native renders, kind, resolution, object boxes, embeddings) and no
    held-out composition."""
    from data.buckets import buckets_for
    from data.funnel import OPERATORS
    from data.synthetic import make_holdout, parse_caption
    from kiln.tracking import Tracker
    from stages import data

    cfg = load_config("smoke", ["data.funnel.num_proc=2", "data.funnel.chunk_size=7"])
    result = data.run(cfg, {}, tmp_path / "two", Tracker(None))
    report = json.loads((tmp_path / "two" / "funnel_report.json").read_text())
    resolutions = sorted({r.resolution for r in cfg.train.rungs})
    assert report["seen"] == len(resolutions) * cfg.data.samples_per_resolution
    assert [row["operator"] for row in report["operators"]] == list(OPERATORS)
    for row, following in zip(report["operators"], report["operators"][1:]):
        assert following["saw"] == row["saw"] - row["dropped"]  # each operator sees what the one before kept
    dropped = {row["operator"]: row["dropped"] for row in report["operators"]}
    assert report["kept"] == report["seen"] - sum(dropped.values()) == result.metrics["samples"]
    assert dropped["entropy"] == dropped["near_duplicate"] == dropped["clarity"] == 0  # clean scenes pass
    assert report["kept"] >= 0.95 * report["seen"]

    holdout = make_holdout(cfg.data.holdout_seed)
    samples = list(iter_samples(tmp_path / "two" / "shards", load_images=True))
    assert len(samples) == report["kept"]
    for sample in samples:
        meta = sample["meta"]
        assert holdout.is_training_spec(parse_caption(sample["caption"]))
        assert sample["image"].size == sample["bucket"]
        assert sample["bucket"] in buckets_for(meta["resolution"], cfg.data.aspect_ratios, cfg.data.bucket_multiple)
        assert meta["kind"] == parse_caption(sample["caption"]).kind
        assert len(meta["objects"]) == len(parse_caption(sample["caption"]).pairs()) * \
            parse_caption(sample["caption"]).count
        assert sample["text_emb"].shape[0] == sample["text_mask"].shape[0] == int(sample["text_mask"].sum())
    assert {s["meta"]["resolution"] for s in samples} == set(resolutions)
    assert (tmp_path / "two" / "uncond.safetensors").exists()
    # Training-only extra colours join the shards; the verifier-reading consumers leave them out.
    extra = data.run(load_config("smoke", ["data.funnel.num_proc=1", "data.extra_colours=[purple]"]), {},
                     tmp_path / "extra", Tracker(None))
    specs = [parse_caption(s["caption"]) for s in iter_samples(tmp_path / "extra" / "shards", load_images=False)]
    assert any(not spec.verifiable() for spec in specs) and all(holdout.is_training_spec(spec) for spec in specs)
    assert extra.content_hash != result.content_hash
    import reward.verifier
    from stages.reward import data_records

    def score(image, text):
        assert parse_caption(text).verifiable(), text
        return float(np.asarray(image).sum() % 7)  # any order of the two images

    monkeypatch.setattr(reward.verifier, "score", score)
    data_records(tmp_path / "extra", 32, 40, 0)
    from stages import features  # its labels are COLOURS x SHAPES: it trains on the verifiable scenes alone
    (tmp_path / "features").mkdir()
    features.run(load_config("smoke", ["features.steps=2"]), {"data": tmp_path / "extra"}, tmp_path / "features",
                 Tracker(None))
    # the same shards from one process (the seed decides every scene, not the worker that rendered it)
    one = data.run(load_config("smoke", ["data.funnel.num_proc=1", "data.funnel.chunk_size=7"]), {},
                   tmp_path / "one", Tracker(None))
    assert one.content_hash == result.content_hash


def test_a_curation_run_through_the_pipeline_flow_reports_its_funnel(folder, tmp_path, prefect_harness):
    """data.sources set, the Prefect flow run with only its data stage: the stage's funnel report and the flow run's
    curation-funnel artifact come out of it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.pipeline import pipeline

    sources = json.dumps([{"kind": "imagefolder", "path": str(folder), "category_column": "kind"}])
    overrides = [f"run_dir={tmp_path}", "experiment=kiln-curation-flow", f"data.sources={sources}",
                 "data.heldout_fraction=0", "post_training=[]"]
    state = pipeline(preset="smoke", overrides=overrides, run_name="curation", only=["data"], return_state=True)
    assert state.is_completed()
    report = json.loads((tmp_path / "curation" / "data" / "funnel_report.json").read_text())
    assert report["seen"] == len(planted_records()) and report["kept"] == N_CLEAN
    assert json.loads((tmp_path / "curation" / "data" / "manifest.json").read_text())["metrics"]["funnel/kept"] == N_CLEAN
    assert not (tmp_path / "curation" / "vae").exists()  # --only data: nothing else ran
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["curation-funnel"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(found) == 1 and found[0].description.startswith(f"{len(planted_records())} seen, {N_CLEAN} kept")
    rows = {row["operator"]: row for row in json.loads(found[0].data)}
    assert rows["luma"]["dropped"] == 1 and rows["exact_duplicate"]["dropped"] == 1


def _awkward_images():
    """(file name, bytes, what to_rgb must report, the RGB the centre pixel must have after decoding)."""
    base = clean_image(200)
    rgba = np.dstack([np.asarray(base), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32, :3], rgba[:, :32, 3] = (250, 0, 250), 0  # left half: magenta under fully transparent pixels
    la = Image.fromarray(np.dstack([np.asarray(base.convert("L")), rgba[..., 3]]), "LA")
    palette = base.quantize(16)
    palette.info["transparency"] = palette.getpixel((40, 32))  # one palette entry transparent (as in GIFs)
    cmyk = base.convert("CMYK")
    grey16 = Image.fromarray((np.asarray(clean_image(204).convert("L"), np.uint16) * 257))  # I;16, 0..65535
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    tall = Image.fromarray(np.asarray(clean_image(201, (48, 64))))
    tall.save(rotated, format="JPEG", quality=95, exif=exif)
    frames = io.BytesIO()
    clean_image(202).save(frames, format="GIF", save_all=True, append_images=[clean_image(203)], duration=100)
    return [
        ("rgba.png", _bytes(Image.fromarray(rgba, "RGBA")), ["transparency composited"], (255, 255, 255)),
        ("la.png", _bytes(la), ["transparency composited"], (255, 255, 255)),
        ("palette.png", _bytes(palette), ["transparency composited"], None),
        ("cmyk.jpg", _bytes(cmyk, "JPEG"), ["CMYK"], None),
        ("grey16.png", _bytes(grey16), ["16-bit", "greyscale"], None),
        ("grey.png", _bytes(base.convert("L")), ["greyscale"], None),
        ("rotated.jpg", rotated.getvalue(), ["EXIF orientation"], None),
        ("animated.gif", frames.getvalue(), ["first frame of an animation"], None),
    ]


def test_real_image_modes_decode_as_a_viewer_shows_them():
    """Transparency goes over the configured background (never the colours under it), CMYK, 16-bit and greyscale
    become the RGB they show, EXIF orientation is applied and an animation gives its first frame."""
    from data.funnel import to_rgb

    grey16 = np.asarray(clean_image(204).convert("L"), dtype=int)
    for name, data, conversions, centre in _awkward_images():
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image, done = to_rgb(opened, (255, 255, 255))
        assert image.mode == "RGB" and done == conversions, name
        pixels = np.asarray(image).astype(int)
        if name in ("rgba.png", "la.png"):
            assert (pixels[:, :32] == 255).all(), name  # the transparent half is the background, not magenta
            assert (np.abs(pixels[:, 32:] - np.asarray(clean_image(200).convert("L" if name == "la.png" else "RGB")
                                                      .convert("RGB"))[:, 32:]) <= 1).all(), name
        if name == "grey16.png":  # rescaled, not clipped to white
            assert np.abs(pixels[..., 0] - grey16).max() <= 1
        if name == "cmyk.jpg":  # colours survive the round trip (JPEG: roughly)
            assert np.abs(pixels - np.asarray(clean_image(200)).astype(int)).mean() < 12
        if name == "rotated.jpg":
            assert image.size == (64, 48)  # stored 48x64, shown rotated
        if name == "animated.gif":
            first = np.asarray(clean_image(202)).astype(int)
            assert np.abs(pixels - first).mean() < np.abs(pixels - np.asarray(clean_image(203)).astype(int)).mean()
    with Image.open(io.BytesIO(_awkward_images()[0][1])) as opened:
        black, _ = to_rgb(opened, (0, 0, 0))
    assert (np.asarray(black)[:, :32] == 0).all()


def test_awkward_rows_and_images_are_counted_and_named_never_fatal(tmp_path):
    """A metadata row naming a missing file, a caption that is a number, null or empty, a line that is not JSON and
    an image over max_pixels are each dropped, counted by cause and named; every awkward image mode is kept and its
    conversion counted; the rest of the folder goes on."""
    folder = tmp_path / "awkward"
    folder.mkdir()
    lines = []
    for name, data, *_ in _awkward_images():
        (folder / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "text": f"an awkward {name}"}))
    (folder / "huge.png").write_bytes(_bytes(clean_image(300, (640, 640))))
    for i, caption in enumerate([7, None, ""]):
        (folder / f"bad{i}.png").write_bytes(_bytes(clean_image(310 + i)))
        lines.append(json.dumps({"file_name": f"bad{i}.png", "text": caption}))
    lines += [json.dumps({"file_name": "huge.png", "text": "too many pixels"}),
              json.dumps({"file_name": "gone.png", "text": "a file that is not there"}),
              "{this line is not json", json.dumps({"text": "a row without a file name"})]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg([{"kind": "imagefolder", "path": str(folder), "caption_column": "text"}],
               "data.funnel.max_pixels=200000", "data.funnel.near_duplicate_bits=-1")
    funnel = curate(cfg, tmp_path / "shards", fake_embed, progress=False)
    report = funnel.report()
    causes = {row["operator"]: row["causes"] for row in report["operators"] if row["dropped"]}
    assert causes == {"unreadable": {"missing file": 1, "bad metadata row": 2},
                      "resolution": {"too many pixels": 1},
                      "caption": {"caption is not text (int)": 1, "empty caption": 2}}
    assert report["seen"] == len(lines) and report["kept"] == len(_awkward_images())
    assert report["conversions"] == {"transparency composited": 3, "CMYK": 1, "16-bit": 1, "greyscale": 2,
                                     "EXIF orientation": 1, "first frame of an animation": 1}
    examples = " ".join(e for row in report["operators"] for e in row["examples"])
    assert "gone.png" in examples and "not a JSON object" in examples and "max_pixels 200000" in examples
    assert len({s["caption"] for s in iter_samples(tmp_path / "shards", load_images=False)}) == len(_awkward_images())


def test_a_rung_the_curated_images_cannot_fill_is_one_line_at_the_end_of_the_data_stage(folder, tmp_path):
    """64 px images fill the smoke ladder's 32 and 64 px rungs but not a 128 px one: the data stage says so in one
    line that names the rung and the flag keeping the rungs it fills, before the VAE or any training."""
    from kiln.tracking import Tracker
    from stages import data

    sources = [{"kind": "imagefolder", "path": str(folder)}]
    ladder = "train.rungs=[{resolution: 32, steps: 2, batch_size: 8}, {resolution: 128, steps: 2, batch_size: 8}]"
    with pytest.raises(ValueError) as error:
        data.run(_cfg(sources, ladder), {}, tmp_path / "data", Tracker(None))
    message = str(error.value)
    assert "\n" not in message and "the 128 px rung (0 images < batch 8)" in message
    assert "train.rungs=[{resolution: 32, steps: 2, batch_size: 8}]" in message
    kept = _cfg(sources, "train.rungs=[{resolution: 32, steps: 2, batch_size: 8}]")  # the flag it names works
    assert data.run(kept, {}, tmp_path / "kept", Tracker(None)).metrics["samples"] == N_CLEAN
    # SFT's subset of your images is checked there too: 0.3 of 8 images is fewer than a batch of 4.
    small = _cfg(sources, "train.rungs=[{resolution: 32, steps: 2, batch_size: 8}]", "post_training=[sft]")
    with pytest.raises(ValueError, match=r"^data: sft would train on 2 images \(sft.top_fraction 0.3 of 8 at 32 px\)"):
        data.run(small, {}, tmp_path / "small", Tracker(None))
