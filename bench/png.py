"""A PNG of line charts without a plotting library: one panel per series (small multiples),
drawn on a pixel grid and written with zlib. No text: the caption goes beside it (markdown)."""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

WHITE, GREY, BLACK, RED = (255, 255, 255), (215, 215, 215), (20, 20, 20), (200, 30, 30)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * width * height)

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        """Bresenham."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        for x0_, y0_, x1_, y1_ in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1),
                                   (x0, y1, x0, y0)):
            self.line(x0_, y0_, x1_, y1_, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width:3 * (y + 1) * self.width])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def small_multiples(path: Path, x: Sequence[float], series: Sequence[Sequence[float]],
                    marker_x: float | None = None, columns: int = 2,
                    panel: tuple[int, int] = (420, 150)) -> None:
    """One panel per series (row-major, `columns` wide), each scaled from 0 to 1.1 x its maximum,
    on the same x axis; a grey grid at quarters; a red vertical line at `marker_x`."""
    width, height = panel
    pad = 10
    rows = (len(series) + columns - 1) // columns
    canvas = Canvas(columns * (width + pad) + pad, rows * (height + pad) + pad)
    x_min, x_max = (min(x), max(x)) if x else (0.0, 1.0)
    x_span = (x_max - x_min) or 1.0
    for index, values in enumerate(series):
        left = pad + (index % columns) * (width + pad)
        top = pad + (index // columns) * (height + pad)
        y_max = 1.1 * max((v for v in values if v is not None), default=0.0) or 1.0  # a margin
        for q in (1, 2, 3):
            canvas.line(left, top + q * height // 4, left + width, top + q * height // 4, GREY)
            canvas.line(left + q * width // 4, top, left + q * width // 4, top + height, GREY)
        if marker_x is not None and x_min <= marker_x <= x_max:
            mx = left + round((marker_x - x_min) / x_span * width)
            canvas.line(mx, top, mx, top + height, RED)
        points = [(left + round((xi - x_min) / x_span * width),
                   top + height - round(v / y_max * height))
                  for xi, v in zip(x, values, strict=True) if v is not None]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            canvas.line(x0, y0, x1, y1, BLACK)
        canvas.rect(left, top, left + width, top + height, BLACK)
    path.write_bytes(canvas.png())
