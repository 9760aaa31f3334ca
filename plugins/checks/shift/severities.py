"""Which corruptions each modality gets, their five severities, and their families.

Severities are MedMNIST-C's (Di Salvo, Doerrich and Ledig 2024) for the MedMNIST set of the
same modality: ChestMNIST for radiography, OrganAMNIST for CT, DermaMNIST for dermoscopy,
PathMNIST for pathology, BreastMNIST for ultrasound. MedMNIST-C has no MRI set and no stain
shift: those tables are ours, from mild (barely visible) to what a failed acquisition gives.
DermaMNIST's black corner ends 0.90, 0.95 (milder at 5 than at 4); severity 5 here is 0.85.
Severity 0 is the clean image for every corruption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import mri, overlays, photometric, spatial


@dataclass(frozen=True)
class Corruption:
    apply: Callable[..., Any]
    family: str  # noise, blur, digital, intensity, artefact, k-space: the accuracy curve's panel
    what: str


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": Corruption(photometric.gaussian_noise, "noise", "additive Gaussian noise"),
    "shot_noise": Corruption(photometric.shot_noise, "noise", "Poisson (quantum) noise of a lower dose"),
    "speckle_noise": Corruption(photometric.speckle_noise, "noise", "multiplicative speckle"),
    "gaussian_blur": Corruption(spatial.gaussian_blur, "blur", "Gaussian blur"),
    "defocus_blur": Corruption(spatial.defocus_blur, "blur", "defocus (disk) blur"),
    "motion_blur": Corruption(spatial.motion_blur, "blur", "motion blur"),
    "pixelate": Corruption(spatial.pixelate, "digital", "lower resolution (box down- and upsampling)"),
    "jpeg": Corruption(spatial.jpeg, "digital", "JPEG compression"),
    "brightness_up": Corruption(photometric.brightness, "intensity", "brighter"),
    "brightness_down": Corruption(photometric.brightness, "intensity", "darker"),
    "gain_up": Corruption(photometric.brightness, "intensity", "higher ultrasound gain"),
    "gain_down": Corruption(photometric.brightness, "intensity", "lower ultrasound gain"),
    "contrast_up": Corruption(photometric.contrast, "intensity", "higher contrast"),
    "contrast_down": Corruption(photometric.contrast, "intensity", "lower contrast"),
    "gamma_up": Corruption(photometric.gamma, "intensity", "gamma above 1 (darker mid-tones)"),
    "gamma_down": Corruption(photometric.gamma, "intensity", "gamma below 1 (brighter mid-tones)"),
    "saturate": Corruption(photometric.saturate, "intensity", "higher colour saturation"),
    "stain_shift": Corruption(overlays.stain_shift, "artefact", "haematoxylin-eosin stain shift"),
    "bubble": Corruption(overlays.bubble, "artefact", "air bubbles"),
    "black_corner": Corruption(overlays.black_corner, "artefact", "black corners of a round field of view"),
    "characters": Corruption(overlays.characters, "artefact", "ink characters"),
    "motion": Corruption(mri.motion, "k-space", "patient motion during the acquisition"),
    "ghosting": Corruption(mri.ghosting, "k-space", "ghosting along the phase-encoding axis"),
    "spike": Corruption(mri.spike, "k-space", "k-space spike (herringbone)"),
    "bias_field": Corruption(mri.bias_field, "k-space", "coil bias field"),
    "gibbs": Corruption(mri.gibbs, "k-space", "Gibbs ringing (truncated k-space)"),
}

_RADIOGRAPHY = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "shot_noise": (60, 25, 18, 10, 5),
    "gaussian_blur": (3, 5, 7, 9, 11),
    "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
    "jpeg": (50, 30, 15, 10, 7),
    "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
    "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    "gamma_up": (1.1, 1.2, 1.3, 1.4, 1.6),
    "gamma_down": (0.9, 0.8, 0.7, 0.6, 0.4),
}
_CT = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.16, 0.20),
    "shot_noise": (200, 100, 50, 25, 15),
    "gaussian_blur": (11, 13, 15, 17, 21),
    "pixelate": (0.7, 0.6, 0.5, 0.40, 0.35),
    "jpeg": (50, 30, 15, 10, 7),
    "contrast_up": (1.3, 1.4, 1.6, 1.7, 1.8),
    "contrast_down": (0.8, 0.7, 0.6, 0.55, 0.5),
    "gamma_up": (1.3, 1.4, 1.6, 1.8, 2.0),
    "gamma_down": (0.9, 0.8, 0.7, 0.6, 0.4),
}
_MRI = {
    "motion": ((2, 2, 2), (4, 4, 2), (6, 6, 3), (8, 8, 4), (10, 10, 5)),
    "ghosting": ((2, 0.2), (4, 0.35), (6, 0.5), (8, 0.7), (10, 0.9)),
    "spike": ((1, 0.1), (1, 0.2), (2, 0.3), (2, 0.5), (3, 0.7)),
    "bias_field": (0.1, 0.2, 0.3, 0.45, 0.6),
    "gibbs": (0.3, 0.45, 0.6, 0.7, 0.8),
    "gaussian_noise": (0.02, 0.04, 0.06, 0.08, 0.10),
}
_DERMOSCOPY = {
    "defocus_blur": ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
    "motion_blur": ((10, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
    "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "saturate": (0.05, 0.10, 0.15, 0.20, 0.25),
    "black_corner": (1.10, 1.05, 1.00, 0.90, 0.85),
    "characters": ((1, 6, 0.14), (2, 7, 0.15), (3, 8, 0.16), (4, 9, 0.17), (6, 10, 0.18)),
    "jpeg": (30, 20, 15, 10, 7),
}
_PATHOLOGY = {
    "defocus_blur": ((3, 0.1), (4, 0.1), (5, 0.2), (6, 0.2), (7, 0.3)),
    "motion_blur": ((5, 5), (10, 5), (15, 5), (15, 8), (15, 12)),
    "brightness_up": (1.1, 1.15, 1.2, 1.22, 1.25),
    "brightness_down": (0.85, 0.80, 0.75, 0.72, 0.70),
    "saturate": (0.05, 0.10, 0.15, 0.20, 0.25),
    "stain_shift": (0.02, 0.05, 0.1, 0.15, 0.2),
    "bubble": ((7, 15), (10, 15), (12, 15), (15, 20), (17, 25)),
    "jpeg": (50, 30, 15, 10, 7),
}
_ULTRASOUND = {
    "speckle_noise": (0.10, 0.15, 0.20, 0.25, 0.30),
    "gain_up": (1.4, 1.5, 1.6, 1.8, 2.0),
    "gain_down": (0.55, 0.5, 0.45, 0.4, 0.3),
    "motion_blur": ((5, 5), (9, 7), (9, 10), (13, 10), (17, 12)),
    "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
    "jpeg": (50, 30, 15, 10, 7),
    "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
}

SEVERITY_TABLES: dict[str, dict[str, tuple]] = {
    "radiography": _RADIOGRAPHY, "ct": _CT, "mri": _MRI, "dermoscopy": _DERMOSCOPY,
    "pathology": _PATHOLOGY, "ultrasound": _ULTRASOUND,
}
MODALITIES = tuple(SEVERITY_TABLES)

# The quick profile's three per modality: one noise, one resolution loss, one more, all cheap
# on a CPU (TorchIO's motion resamples the slice once per movement: 0.3 s a slice).
CORE: dict[str, tuple[str, ...]] = {
    "radiography": ("gaussian_noise", "gaussian_blur", "jpeg"),
    "ct": ("shot_noise", "gaussian_blur", "jpeg"),
    "mri": ("ghosting", "bias_field", "gibbs"),
    "dermoscopy": ("defocus_blur", "brightness_down", "jpeg"),
    "pathology": ("defocus_blur", "stain_shift", "jpeg"),
    "ultrasound": ("speckle_noise", "gain_down", "jpeg"),
}


def level(modality: str, corruption: str, severity: int):
    """The corruption's strength at ``severity`` (1 to 5) for ``modality``."""
    return SEVERITY_TABLES[modality][corruption][severity - 1]


def select(modality: str, names: list[str]) -> list[str]:
    """The corruptions to run: ``all`` (every one the modality has), ``core`` (the quick
    three) and names, in the order given; a name the modality lacks raises ValueError."""
    table = SEVERITY_TABLES[modality]
    chosen: list[str] = []
    for name in names:
        expanded = list(table) if name == "all" else list(CORE[modality]) if name == "core" else [name]
        for item in expanded:
            if item not in table:
                raise ValueError(f"{item!r} has no severities for {modality} (its corruptions: {', '.join(table)})")
            if item not in chosen:
                chosen.append(item)
    return chosen
