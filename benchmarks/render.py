"""Synthetic scene rendering speed: milliseconds per image at a few sizes (the test suite counts layout tries,
tests/test_synthetic.py; the seconds are measured here, not asserted in a test).

python benchmarks/render.py [--images 300] [--sizes 64 256 1328] [--repeats 5]

Renders the same seeded training specs --repeats times per size and prints the median and range of ms per image
(the clock covers render() only: layout and drawing, not spec sampling).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from data.synthetic import make_holdout, render, sample_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1328])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    holdout = make_holdout(seed=0)
    for size in args.sizes:
        per_image = []
        for _ in range(args.repeats):
            rng = random.Random(9)
            specs = [sample_spec(rng, holdout, "train") for _ in range(args.images)]
            start = time.perf_counter()
            for spec in specs:
                render(spec, size, size, rng)
            per_image.append(1000 * (time.perf_counter() - start) / args.images)
        print(f"{size:>5} px: {statistics.median(per_image):.3f} ms/image "
              f"(range {min(per_image):.3f}-{max(per_image):.3f}, {args.images} images x {args.repeats})")


if __name__ == "__main__":
    main()
