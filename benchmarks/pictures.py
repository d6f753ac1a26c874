"""The README's picture and the demo's pictures, redrawn by the commands a user runs (``make pictures``).

1. ``aptvit demo --out DEMO --layouts-only``: the bundled photos (resized to 448 px, shorter side) and their
   layouts, each drawn as ``aptvit show PHOTO.png --size 448 --patch-sizes 16,32,64 --heatmap --json`` draws it.
2. The README's picture (HERO, docs/results/layout.png) is the demo's picture of scikit-image's ``camera`` photo,
   copied with its JSON (the tokens, sizes, scorer and thresholds it states) beside it as HERO with .json.

    python benchmarks/pictures.py                    # aptvit-demo/ and docs/results/layout.png + docs/results/layout.json
    python benchmarks/pictures.py --smoke --demo /tmp/d --hero /tmp/h.png   # 64-px photos, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERO_PHOTO = "camera"


def hero_record(shown: dict, hero: Path) -> dict:
    """The demo's JSON of the hero photo, with paths that do not depend on where it was drawn."""
    return {**shown, "image": f"{HERO_PHOTO}.png", "png": hero.name}


def main(argv=None) -> int:
    from aptvit.cli import main as aptvit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="aptvit-demo", help="the demo's folder (photos and pictures)")
    parser.add_argument("--hero", default="docs/results/layout.png", help="where the README's picture goes")
    parser.add_argument("--smoke", action="store_true", help="64-px photos: seconds, for the test suite")
    args = parser.parse_args(argv)
    demo, hero = Path(args.demo), Path(args.hero)
    code = aptvit(["demo", "--out", str(demo), "--layouts-only", *(["--photo-size", "64"] if args.smoke else [])])
    if code:
        return code
    hero.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo / f"{HERO_PHOTO}_apt.png", hero)
    shown = json.loads((demo / f"{HERO_PHOTO}_apt.json").read_text())
    hero.with_suffix(".json").write_text(json.dumps(hero_record(shown, hero), indent=1) + "\n")
    print(f"README picture: {hero} ({shown['tokens']}/{shown['base_tokens']} tokens; {hero.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
