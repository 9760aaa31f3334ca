"""Write an mcaudit CSV manifest with a ``boxes`` column from COCO box annotations.

    python examples/coco_to_manifest.py ANNOTATIONS.json IMAGE_ROOT OUT.csv [--label folder|category]

COCO files list images and boxes, not image labels, so the label comes from the first folder
of each image's ``file_name`` (TBX11K: ``tb/``, ``health/``, ``sick/``) or, with
``--label category``, from the category of its first box (images without a box are then
labelled ``none``). Boxes keep COCO's ``[x, y, width, height]`` in the image's pixels, which
is what the manifest's ``boxes`` column takes; the saliency check scores localisation
against them. Image paths in the manifest are relative to OUT.csv's folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict
from pathlib import Path


def manifest_rows(annotations: dict, image_root: Path, out_dir: Path, label_from: str = "folder") -> list[dict[str, str]]:
    categories = {c["id"]: c["name"] for c in annotations.get("categories", [])}
    boxes = defaultdict(list)
    for a in annotations.get("annotations", []):
        boxes[a["image_id"]].append(a)
    rows = []
    for image in annotations["images"]:
        name = image["file_name"]
        if label_from == "folder":
            parts = Path(name).parts
            if len(parts) < 2:
                raise ValueError(f"{name}: no folder to take the label from; use --label category")
            label = parts[0]
        else:
            label = categories.get(boxes[image["id"]][0]["category_id"], "unknown") if boxes[image["id"]] else "none"
        path = os.path.relpath(image_root / name, out_dir)
        rows.append({
            "path": Path(path).as_posix(),
            "label": label,
            "boxes": ";".join(",".join(f"{v:.2f}" for v in a["bbox"]) for a in boxes[image["id"]]),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("annotations", type=Path)
    ap.add_argument("image_root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--label", choices=("folder", "category"), default="folder")
    args = ap.parse_args(argv)
    try:
        annotations = json.loads(args.annotations.read_text())
        rows = manifest_rows(annotations, args.image_root.resolve(), args.out.resolve().parent, args.label)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.annotations}: {exc}", file=sys.stderr)
        return 2
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "boxes"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}: {len(rows)} images, {sum(bool(r['boxes']) for r in rows)} with boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
