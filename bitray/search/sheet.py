"""Contact sheets: a grid of thumbnails read from storage, each captioned, written as one PNG.

Geometry (``SheetLayout``): tiles of ``thumb`` x ``thumb`` pixels plus a caption band below, ``pad``
pixels apart, ``columns`` per row. A thumbnail is ``thumbnail(bytes, thumb)`` (decoded like the pipeline
decodes, fitted inside the tile keeping its aspect ratio) centred in its tile, so a test or a user can
find every image again at ``layout.image_box(i, thumbnail.size)``. An object that cannot be read any more
gets a grey tile that says so, not an error: a sheet is for looking, and one missing image should not
hide the rest.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError

BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
TEXT = (20, 20, 20)
HIGHLIGHT = (200, 30, 30)


@dataclass(frozen=True)
class SheetItem:
    """One tile: the image's URI and up to two caption lines."""

    uri: str
    caption: str
    detail: str = ""
    highlight: bool = False
    """Draw a red frame (the query of a search, a group's representative)."""


@dataclass(frozen=True)
class SheetLayout:
    thumb: int = 160
    caption: int = 30
    pad: int = 6
    columns: int = 6

    def size(self, count: int) -> tuple[int, int]:
        """(width, height) of a sheet of ``count`` tiles."""
        columns = max(1, min(self.columns, count))
        rows = max(1, -(-count // self.columns))
        return (
            self.pad + columns * (self.thumb + self.pad),
            self.pad + rows * (self.thumb + self.caption + self.pad),
        )

    def tile_origin(self, i: int) -> tuple[int, int]:
        row, column = divmod(i, self.columns)
        return self.pad + column * (self.thumb + self.pad), self.pad + row * (
            self.thumb + self.caption + self.pad
        )

    def image_box(self, i: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile ``i``'s thumbnail of ``image_size`` (width, height)."""
        left, top = self.tile_origin(i)
        width, height = image_size
        left += (self.thumb - width) // 2
        top += (self.thumb - height) // 2
        return left, top, left + width, top + height


def thumbnail(data: bytes, side: int) -> Image.Image:
    """The image decoded as the pipeline decodes it (orientation applied, RGB), fitted into side x side."""
    from bitray.images import decode_image

    image = Image.fromarray(decode_image(data).pixels)
    scale = min(side / image.width, side / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def contact_sheet(
    items: Sequence[SheetItem],
    layout: SheetLayout | None = None,
    storage_config: StorageConfig | None = None,
    read: Callable[[str], bytes] | None = None,
) -> Image.Image:
    """The sheet of ``items`` in order, left to right, top to bottom.

    ``read`` fetches a tile's bytes (default: the whole object). Items taken from an index pass
    ``IndexReads.read`` (``bitray.search.scope``), so a rewritten index cannot make a sheet read any path.
    """
    layout = layout or SheetLayout()
    read = read or (lambda uri: storage.read_bytes(uri, storage_config))
    if not items:
        raise BitrayError("a contact sheet needs at least one image")
    sheet = Image.new("RGB", layout.size(len(items)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, item in enumerate(items):
        left, top = layout.tile_origin(i)
        try:
            thumb = thumbnail(read(item.uri), layout.thumb)
        except BitrayError as exc:  # deleted since it was embedded, or no longer decodable
            draw.rectangle((left, top, left + layout.thumb - 1, top + layout.thumb - 1), fill=MISSING)
            draw.text(
                (left + 4, top + 4), _fit(draw, f"unreadable: {exc}", font, layout.thumb - 8), TEXT, font
            )
        else:
            sheet.paste(thumb, layout.image_box(i, thumb.size)[:2])
        if item.highlight:
            draw.rectangle(
                (left - 3, top - 3, left + layout.thumb + 2, top + layout.thumb + 2),
                outline=HIGHLIGHT,
                width=2,
            )
        lines = [item.caption, item.detail or _name(item.uri)]
        for n, line in enumerate(lines):
            y = top + layout.thumb + 2 + n * 13
            draw.text((left, y), _fit(draw, line, font, layout.thumb), TEXT, font)
    return sheet


def write_png(image: Image.Image, uri: str, storage_config: StorageConfig | None = None) -> None:
    """Write ``image`` as a PNG to a local path or object-store URI (atomically)."""
    if not uri.lower().endswith(".png"):
        raise BitrayError(f"contact sheet {uri!r}: give a .png file name")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    storage.write_bytes(uri, buffer.getvalue(), storage_config)


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
