"""Writes the Pillow reference images for deepeyes-tools' rotate tests.

Run from anywhere with Pillow and numpy installed (scripts/requirements.txt):
    python deepeyes-tools/tests/data/make_rotate_fixtures.py
The pattern must match `fixture_pattern` in deepeyes-tools/src/rotate.rs.
"""

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def pattern(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    rgb = np.stack(
        [(x * 37 + y * 11) % 256, (x * x + 3 * y) % 256, (x * y * 5 + 17) % 256], axis=-1
    ).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def main() -> None:
    img = pattern(37, 23)
    for angle in [30, -45, 90, 270, 123.4, 180, 725]:
        # DeepEyes' toolbox calls `image.rotate(angle)`: nearest, no expand, black fill.
        img.rotate(angle).save(HERE / f"rotate_37x23_{angle}.png")
    pattern(20, 20).rotate(90).save(HERE / "rotate_20x20_90.png")


if __name__ == "__main__":
    main()
