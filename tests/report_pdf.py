"""How full each page of a Chromium (Skia) PDF is, without a PDF library.

Skia writes each page as one Flate stream of plain operators; the vertical extent of what is
drawn (filled rectangles that are not white, images, text positions), mapped through the
current transformation matrix, over the page height is the page's fill. Clipping rectangles
and white backgrounds are not content.
"""

from __future__ import annotations

import re
import zlib

OBJECT = re.compile(rb"(\d+) 0 obj(.*?)endobj", re.S)
TOKEN = re.compile(rb"/[^\s/\[\]<>()]+|\((?:\\.|[^\\)])*\)|<[0-9A-Fa-f\s]*>|\[|\]|[^\s\[\]<>()/]+")


def _stream(body: bytes) -> bytes:
    raw = body[body.index(b"stream") + 6 : body.rindex(b"endstream")].lstrip(b"\r\n")
    return zlib.decompress(raw) if b"FlateDecode" in body[: body.index(b"stream")] else raw


def _mul(a, b):
    return [a[0] * b[0] + a[1] * b[2], a[0] * b[1] + a[1] * b[3], a[2] * b[0] + a[3] * b[2],
            a[2] * b[1] + a[3] * b[3], a[4] * b[0] + a[5] * b[2] + b[4], a[4] * b[1] + a[5] * b[3] + b[5]]


def _ys(m, points):
    return [m[1] * x + m[3] * y + m[5] for x, y in points]


def page_extent(ops: bytes) -> tuple[float, float] | None:
    """(lowest, highest) y of drawn content in page points, or None for an empty page."""
    ctm, stack, ys = [1, 0, 0, 1, 0, 0], [], []
    args: list[bytes] = []
    pending: list[float] = []
    white = False
    for tok in TOKEN.findall(ops):
        if tok[:1].isdigit() or tok[:1] in b"-.":
            args.append(tok)
            continue
        nums = [float(a) for a in args if re.fullmatch(rb"[-+]?\d*\.?\d+", a)]
        if tok == b"q":
            stack.append((ctm, white))
        elif tok == b"Q" and stack:
            ctm, white = stack.pop()
        elif tok == b"cm" and len(nums) >= 6:
            ctm = _mul(nums[-6:], ctm)
        elif tok == b"rg" and len(nums) >= 3:
            white = all(v > 0.99 for v in nums[-3:])
        elif tok == b"re" and len(nums) >= 4:
            x, y, w, h = nums[-4:]
            pending = _ys(ctm, [(x, y), (x + w, y + h)])
        elif tok in (b"f", b"f*", b"B", b"b", b"S") and pending:
            if not white or tok == b"S":
                ys.extend(pending)
            pending = []
        elif tok in (b"W", b"W*", b"n"):
            pending = []
        elif tok == b"Do":
            ys.extend(_ys(ctm, [(0, 0), (1, 1)]))
        elif tok == b"Tm" and len(nums) >= 6:
            ys.extend(_ys(_mul(nums[-6:], ctm), [(0, 0)]))
        if not (tok[:1] in b"/[]<(" or tok == b"]"):
            args = []
        else:
            args.append(tok)
    return (min(ys), max(ys)) if ys else None


def page_fills(pdf: bytes) -> list[float]:
    """Each page's drawn height over its height, in page order."""
    objects = {int(m.group(1)): m.group(2) for m in OBJECT.finditer(pdf)}
    pages = [body for _, body in sorted(objects.items()) if re.search(rb"/Type\s*/Page\b", body)]
    fills = []
    for body in pages:
        height = float(re.search(rb"/MediaBox\s*\[\s*[-\d.]+\s+[-\d.]+\s+[-\d.]+\s+([-\d.]+)", body).group(1))
        refs = re.search(rb"/Contents\s*(\[[^\]]*\]|\d+ 0 R)", body).group(1)
        ops = b"\n".join(_stream(objects[int(n)]) for n in re.findall(rb"(\d+) 0 R", refs))
        extent = page_extent(ops)
        fills.append(0.0 if extent is None else (extent[1] - extent[0]) / height)
    return fills
