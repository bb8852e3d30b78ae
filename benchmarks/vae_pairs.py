"""Can a trained VAE carry every colour-shape pair, held-out ones included? Render single objects of each of the
synthetic world's 12 pairs, encode -> decode with the VAE, and count the reconstructions the verifier reads as the
right colour and shape. A held-out pair the VAE reconstructs but the DiT never draws is the DiT's failure, not the
codec's. The VAE stage's own reconstruction check sees training images only, so it cannot tell this.

python benchmarks/vae_pairs.py [--images 16] [--resolution 128] RUN/vae [RUN2/vae ...]

Prints one line per VAE: each pair (colour initial + shape initial) and how many of its images came back right.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from data.synthetic import COLOURS, SHAPES, SceneSpec, render
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae_dirs", nargs="+", type=Path, help="vae stage folders")
    parser.add_argument("--images", type=int, default=16, help="images per pair")
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    for vae_dir in args.vae_dirs:
        right = pairs_reconstructed(vae_dir, args.images, args.resolution)
        print(f"{vae_dir}: " + " ".join(f"{pair} {n}/{args.images}" for pair, n in right.items()), flush=True)


if __name__ == "__main__":
    main()
