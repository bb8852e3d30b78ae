"""Can a trained VAE carry every colour-shape pair, held-out ones included? Render single objects of each of the
synthetic world's 12 pairs, encode -> decode with the VAE, and count the reconstructions the verifier reads as the
right colour and shape. A held-out pair the VAE reconstructs but the DiT never draws is the DiT's failure, not the
codec's. The VAE stage's own reconstruction check sees training images only, so it cannot tell this.

python benchmarks/vae_pairs.py [--images 16] [--resolution 128] RUN/vae [RUN2/vae ...]
python benchmarks/vae_pairs.py --colours RUN/vae [RUN/vae/failed-attempt-0 ...]

Prints one line per VAE: each pair (colour initial + shape initial) and how many of its images came back right.
--colours: instead, the decoded RGB at the middle of a flat square of every palette colour (training-only extras
too), for each checkpoint of each folder (a `vae` stage folder or a failed attempt's): two colours decoded alike are
two colours the VAE cannot tell apart.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from data.synthetic import COLOURS, PALETTE_RGB, SHAPES, SceneSpec, render
from kiln.generate import to_pil
from kiln.images import image_tensor
from kiln.vae import decode_latents, encode_images, load_vae
from reward.verifier import verify


def pairs_reconstructed(vae_dir: Path, images: int, resolution: int) -> dict[str, int]:
    vae = load_vae(vae_dir)  # the weights say which encoder it has
    rng = random.Random(0)  # the same scenes for every VAE
    right = {}
    for colour in COLOURS:
        for shape in SHAPES:
            spec = SceneSpec("single", colour, shape)
            scenes = torch.stack([image_tensor(render(spec, resolution, resolution, rng)[0]) for _ in range(images)])
            with torch.no_grad():
                recon = decode_latents(vae, encode_images(vae, scenes))  # (N, 3, H, W) in [-1, 1]
            right[f"{colour[0]}{shape[0]}"] = sum(verify(img, spec).correct for img in to_pil(recon))
    return right


def decoded_colours(vae_dir: Path, resolution: int) -> dict[str, tuple[int, ...]]:
    """{colour: decoded RGB at the middle of a flat square of that colour}."""
    vae, colours = load_vae(vae_dir), {}
    for colour in PALETTE_RGB:
        image, placed = render(SceneSpec("single", colour, "square"), resolution, resolution, random.Random(0))
        with torch.no_grad():
            recon = np.asarray(to_pil(decode_latents(vae, encode_images(vae, image_tensor(image)[None])))[0])
        x, y = round(placed[0].cx), round(placed[0].cy)
        colours[colour] = tuple(int(v) for v in recon[y - 3:y + 3, x - 3:x + 3].reshape(-1, 3).mean(0))
    return colours


def checkpoint_folders(folder: Path) -> list[Path]:
    """Each step-N checkpoint of a vae stage folder (its checkpoints/) or of a failed attempt's folder."""
    return sorted((folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder).glob("step-*"),
                  key=lambda p: int(p.name.split("-")[1]))


def as_vae_dir(step: Path, config_from: Path, tmp: Path) -> Path:
    """A folder load_vae reads as a VAE whose final checkpoint is `step` (intermediate checkpoints keep no
    config.json: the final checkpoint's, which is the same architecture, is linked in)."""
    link = tmp / step.parent.parent.name / step.parent.name / "checkpoints" / step.name
    link.mkdir(parents=True)
    for f in step.iterdir():
        (link / f.name).symlink_to(f.resolve())
    if not (link / "config.json").exists():
        (link / "config.json").symlink_to((config_from / "config.json").resolve())
    return link.parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae_dirs", nargs="+", type=Path, help="vae stage folders")
    parser.add_argument("--images", type=int, default=16, help="images per pair")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--colours", action="store_true", help="decoded colour per checkpoint instead")
    args = parser.parse_args()
    if args.colours:
        tmp = Path(tempfile.mkdtemp())
        try:
            for folder in args.vae_dirs:
                final = checkpoint_folders(folder.parent if folder.name.startswith("failed-attempt") else folder)[-1]
                for step in checkpoint_folders(folder):
                    colours = decoded_colours(as_vae_dir(step, final, tmp), args.resolution)
                    print(f"{step}: " + " ".join(f"{c} {rgb}" for c, rgb in colours.items()), flush=True)
        finally:
            shutil.rmtree(tmp)
        return
    for vae_dir in args.vae_dirs:
        right = pairs_reconstructed(vae_dir, args.images, args.resolution)
        print(f"{vae_dir}: " + " ".join(f"{pair} {n}/{args.images}" for pair, n in right.items()), flush=True)


if __name__ == "__main__":
    main()
