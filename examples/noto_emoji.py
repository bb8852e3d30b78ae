"""Write a real captioned image dataset nobody in this project made, from a package registry: Google's Noto emoji
as 64 px PNGs (transparent backgrounds) with their Unicode names as captions, from the npm package
emoji-datasource-google (images Apache-2.0, data MIT), as an image folder Kiln reads (metadata.jsonl: file_name,
text, category).

python examples/noto_emoji.py OUT [--package emoji-datasource-google-16.0.0.tgz] [--every N]

Without --package it runs `npm pack emoji-datasource-google@16.0.0` (npm's registry; nothing else is contacted).
--every N keeps every Nth emoji (the test suite's fixture is --every 50).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "emoji-datasource-google@16.0.0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--package", type=Path, help=f"a downloaded `npm pack {PACKAGE}` tarball")
    parser.add_argument("--every", type=int, default=1, help="keep every Nth emoji (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.package
        if tarball is None:
            name = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
            tarball = Path(tmp) / name
        with tarfile.open(tarball) as archive:
            emoji = json.load(archive.extractfile("package/emoji.json"))
            rows = [e for e in emoji if e.get("has_img_google")][:: args.every]
            args.out.mkdir(parents=True, exist_ok=True)
            with (args.out / "metadata.jsonl").open("w") as listing:
                for entry in rows:
                    member = archive.extractfile(f"package/img/google/64/{entry['image']}")
                    with (args.out / entry["image"]).open("wb") as image:
                        shutil.copyfileobj(member, image)
                    listing.write(json.dumps({"file_name": entry["image"], "text": entry["name"].lower(),
                                              "category": entry["category"]}) + "\n")
    print(f"{len(rows)} captioned images in {args.out}")


if __name__ == "__main__":
    main()
