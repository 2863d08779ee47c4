"""Hospital sites on disk for tests: small PNGs in one folder per class, and a site config."""

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

# The quickstart experiment's classes (BTMRI), which deployed test sites must list.
CLASSNAMES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]


def write_site(
    root: Path,
    name: str,
    seed: int = 0,
    train: int = 3,
    test: int = 2,
    classnames: list[str] = CLASSNAMES,
) -> Path:
    """``root/<name>/images/{train,test}/<class>/<i>.png`` and ``root/<name>/site.yaml``.

    Each class is a different brightness, so a prompt can learn something from a few images.
    """
    rng = np.random.default_rng(seed)
    site = root / name
    for split, count in (("train", train), ("test", test)):
        for label, cls in enumerate(classnames):
            folder = site / "images" / split / cls.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((32, 32, 3)) * 60 + 60 * label).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    config = {
        "site_name": name,
        "data": {"format": "image_folder", "path": "images"},
        "classnames": classnames,
        "device": "cpu",
        "state_dir": "state",
    }
    path = site / "site.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def corrupt_one_image(config: Path) -> Path:
    """Overwrite the site's first training image with bytes no decoder reads."""
    image = sorted((config.parent / "images/train").rglob("*.png"))[0]
    image.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return image
