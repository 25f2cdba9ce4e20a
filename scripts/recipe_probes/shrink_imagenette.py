"""Shrink imagenette2-224 so it fits a 64 MiB transfer to a lent GPU machine, for recipe probes.

    python scripts/recipe_probes/shrink_imagenette.py ../shared/data/imagenette2-224 OUT_DIR

Train photos at 144 px (webp q80); a fixed random 1,600-photo val subset already eval-transformed
(resize 183, centre crop 160, webp q85), so probes evaluate it with --eval-crop-pct 1.0. About 51 MB.
"""

import random
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image


def shrink(job):
    src, dst, split = job
    image = Image.open(src).convert("RGB")
    if split == "train":
        image = image.resize((144, 144), Image.BICUBIC)
    else:
        image = image.resize((183, 183), Image.BICUBIC)
        o = (183 - 160) // 2
        image = image.crop((o, o, o + 160, o + 160))
    dst.parent.mkdir(parents=True, exist_ok=True)
    image.save(dst, "WEBP", quality=80 if split == "train" else 85, method=4)


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    train = sorted(source.glob("train/*/*.JPEG"))
    val = sorted(source.glob("val/*/*.JPEG"))
    random.seed(0)
    val = sorted(random.sample(val, 1600))
    jobs = [(f, out / split / f.parent.name / (f.stem + ".webp"), split)
            for split, files in (("train", train), ("val", val)) for f in files]
    with Pool() as pool:
        pool.map(shrink, jobs, chunksize=64)


if __name__ == "__main__":
    main()
