"""Synthetic chest-radiograph phantoms, with and without focal opacities.

Each image is drawn from its own seeded generator, so image ``i`` of ``phantom:seed=S`` is
the same on every machine and the set never has to be stored. Every phantom carries an
acquisition ``site`` (A, B or C), a ``sex`` and an ``age``.

The planted defect: site C's scanner is noisy, blurred and low in contrast, so focal
opacities are fainter there, and site C is rare in the training set. A model trained on
these images is measurably worse on site C, which the fairness audit should find.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mcaudit.data.dataset import AuditDataset, Record
from mcaudit.errors import InputError
from mcaudit.hook_types import DataRequest

CLASSES = ["normal", "opacity"]
SITES = ("A", "B", "C")
NATIVE_SIZE = 64


def site_for(rng: np.random.Generator, site_weights) -> str:
    return str(rng.choice(SITES, p=site_weights))


def render_phantom(seed: int, index: int, label: int | None = None, site: str | None = None,
                   site_weights=(0.4, 0.4, 0.2), size: int = NATIVE_SIZE) -> tuple[np.ndarray, dict]:
    """One phantom (size x size float32 in [0, 1]) and its attributes."""
    rng = np.random.default_rng([seed, index])
    if label is None:
        label = int(rng.integers(0, 2))
    if site is None:
        site = site_for(rng, site_weights)
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(20, 91))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    img = np.full((size, size), 0.05, np.float32)
    body_w = 0.40 if sex == "M" else 0.36
    body = ((xx - 0.5) / body_w) ** 2 + ((yy - 0.55) / 0.48) ** 2 < 1
    img[body] = 0.55
    lung_specs = [(0.34, 0.5), (0.66, 0.5)]
    lung_masks = []
    for cx, cy in lung_specs:
        cx += rng.normal(0, 0.01)
        rx, ry = 0.12 + rng.normal(0, 0.008), 0.26 + rng.normal(0, 0.01)
        m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[m] = 0.22
        lung_masks.append((cx, cy, rx, ry))
    heart = ((xx - 0.56) / 0.11) ** 2 + ((yy - 0.64) / 0.12) ** 2 < 1
    img[heart] = 0.62
    for k in range(6):  # ribs: faint bright arcs across the lungs
        y0 = 0.3 + 0.085 * k + rng.normal(0, 0.005)
        arc = np.abs(yy - (y0 + 0.08 * (xx - 0.5) ** 2 * 4)) < 0.012
        img[arc & body] += 0.08
    if sex == "F":
        breast = ((yy - 0.78) / 0.1) ** 2 + ((np.abs(xx - 0.5) - 0.17) / 0.12) ** 2 < 1
        img[breast & body] += 0.06

    if label == 1:
        cx, cy, rx, ry = lung_masks[int(rng.integers(0, 2))]
        r = np.sqrt(rng.random())
        t = rng.random() * 2 * np.pi
        ox, oy = cx + 0.6 * r * rx * np.cos(t), cy + 0.6 * r * ry * np.sin(t)
        sigma = rng.uniform(0.05, 0.08)
        amp = rng.uniform(0.3, 0.45)
        img += amp * np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * sigma**2)))

    contrast, noise, blur = {"A": (1.0, 0.03, 0), "B": (1.1, 0.02, 0), "C": (0.55, 0.09, 1)}[site]
    img = 0.5 + (img - 0.5) * contrast
    if site == "B":
        img = img + 0.05
    if blur:
        img = _box_blur(img)
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), {"label": label, "site": site, "sex": sex, "age": age}


def _box_blur(img: np.ndarray) -> np.ndarray:
    padded = np.pad(img, 1, mode="edge")
    out = sum(padded[dy : dy + img.shape[0], dx : dx + img.shape[1]] for dy in range(3) for dx in range(3))
    return out / 9.0


class PhantomDataset(AuditDataset):
    """``phantom:n=400,seed=1``: phantoms generated on demand, never stored."""

    def __init__(self, seed: int, site_weights, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.site_weights = site_weights

    @classmethod
    def from_spec(cls, spec: str, request: DataRequest) -> "PhantomDataset":
        params = {"n": 300, "seed": 1}
        body = spec.split(":", 1)[1] if ":" in spec else ""
        for part in filter(None, body.split(",")):
            key, _, value = part.partition("=")
            if key not in params or not value.strip().lstrip("-").isdigit():
                raise InputError(f"--data {spec}: expected phantom:n=N,seed=S, got {part!r}")
            params[key] = int(value)
        if params["n"] < 1:
            raise InputError(f"--data {spec}: n must be at least 1")
        for g in request.groups:
            if g not in ("site", "sex", "age"):
                raise InputError(f"--group {g}: phantoms have the subgroup columns site, sex, age")
        weights = (0.4, 0.4, 0.2)
        records = []
        for i in range(params["n"]):
            _, attrs = render_phantom(params["seed"], i, site_weights=weights, size=8)
            records.append(
                Record(
                    source=f"phantom-{params['seed']}-{i:05d}",
                    label=attrs["label"],
                    groups={"site": attrs["site"], "sex": attrs["sex"], "age": str(attrs["age"])},
                )
            )
        fingerprint = hashlib.sha256(f"phantom-v1:{params['n']}:{params['seed']}".encode()).hexdigest()
        return cls(
            params["seed"],
            weights,
            spec=spec,
            records=records,
            classes=request.options.get("classes") or CLASSES,
            image_size=request.image_size,
            fingerprint=fingerprint,
            format_name="phantom",
            group_columns=tuple(request.groups),
            options=request.options,
        )

    def load_pixels(self, index: int):
        from mcaudit.data.images import to_rgb

        img, _ = render_phantom(self.seed, index, site_weights=self.site_weights)
        return to_rgb(img)
