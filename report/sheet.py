"""`mnistq report`'s tiles: a thumbnail of each file where it is now, and a name to tell it by.

Thumbnails are data: URIs (the page stays self-contained); a file that is gone, not a plain
file, too large or unreadable gets a tile that says so.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from mnistq.csvcell import unescaped
from mnistq.settings import Settings
from report.tally import TILES, Tile

THUMB = 64  # px, the longer side of a thumbnail
_FOLDERS = ("done", "review", "failed")  # beside the CSV, where files are put once their row is written
_MAX_PIXELS = Settings.max_pixels  # bigger images get a tile that says so rather than a slow decode
_LONGEST = 80  # characters of a tile's name; the whole path is in its tooltip

CSS = """.sheet{display:flex;flex-wrap:wrap;gap:10px 8px}
.tile{margin:0;width:104px;text-align:center;font-size:11px;overflow-wrap:anywhere}
.tile img,.hole{width:64px;height:64px;border:1px solid #888;display:block;margin:0 auto 2px}
.tile img{object-fit:contain;background:#000;image-rendering:pixelated}
.hole{display:flex;align-items:center;justify-content:center;font:bold 10px sans-serif;color:#a00;
background:repeating-linear-gradient(45deg,#fdd 0 6px,#fff 6px 12px)}"""


def _locate(csv_dir: Path, tile: Tile) -> Path | None:
    """Where the file is now: ``moved_to``, else its tail under done/, review/ or failed/ beside
    the CSV (the tree was moved). With no ``moved_to`` (an older CSV, --keep): the path's tail
    there, its own kind's folder first, else the path itself."""
    moved, path = unescaped(tile.moved) if tile.moved else [], unescaped(tile.path) if tile.path else []
    places = [Path(m) if os.path.isabs(m) else csv_dir / m for m in moved]
    folders = (tile.folder, *(f for f in _FOLDERS if f != tile.folder))
    for name in moved or path:  # a recorded place is exact: never a namesake found by the path
        parts = Path(name).parts[1:] if os.path.isabs(name) else Path(name).parts
        # the longest tail first: the inbox's subfolders are kept under done/ and failed/
        places += [csv_dir / d / Path(*parts[-k:]) for d in folders for k in range(min(4, len(parts)), 0, -1)]
    places += [] if moved else [Path(p) for p in path]
    return next((p for p in places if os.path.lexists(p)), None)


def thumbnail(path: Path | None) -> tuple[str | None, str]:
    """(a data: URI, "") or (None, why there is no picture)."""
    from PIL import Image

    from mnistq.images import FORMATS

    if path is None:
        return None, "missing"
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):  # a link or a FIFO is not opened: it could block or point anywhere
            return None, "not a file"
        with Image.open(path, formats=FORMATS) as im:  # never Ghostscript for an "eps.png"
            if im.width * im.height > _MAX_PIXELS:
                return None, "too large"
            im.draft("L", (THUMB, THUMB))  # JPEG: decode at a reduced scale
            small = im.convert("L")
            small.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            small.save(buf, format="PNG")
    except Image.DecompressionBombError:  # its header claims far more pixels than _MAX_PIXELS
        return None, "too large"
    except Exception:  # any decoder's failure on any file: the tile says so, the report goes on
        return None, "unreadable"
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), ""


def share(groups: dict[str, list[Tile]]) -> dict[str, list[Tile]]:
    """TILES split fairly: each group gets a turn until it or the sheet runs out."""
    take = dict.fromkeys(groups, 0)
    while sum(take.values()) < TILES and any(take[g] < len(groups[g]) for g in groups):
        for g in groups:
            if take[g] < len(groups[g]) and sum(take.values()) < TILES:
                take[g] += 1
    return {g: groups[g][: take[g]] for g in groups if take[g]}


def names(paths: Iterable[str]) -> dict[str, str]:
    """Each path's name on its tile: the file's name, or where another path on the page has the
    same name, the shortest tail of folders that tells them apart (north/a.png, south/a.png)."""
    namesakes: dict[str, set[str]] = {}
    for p in paths:
        namesakes.setdefault(p.rsplit("/", 1)[-1] or p, set()).add(p)
    out = {}
    for name, group in namesakes.items():
        for p in group:
            parts, k = p.split("/"), 1
            tail = name
            while any(q != p and q.split("/")[-k:] == parts[-k:] for q in group) and k < len(parts):
                k += 1
                tail = "/".join(parts[-k:])
            out[p] = tail
    return out


def _breakable(name: str) -> str:
    """``name`` as HTML that wraps after a '/', '_' or '-' (and mid-word only when a part is
    wider than the tile: the CSS's overflow-wrap)."""
    if len(name) > _LONGEST:  # the head holds the folder that tells namesakes apart
        name = name[: _LONGEST // 3] + "…" + name[-(_LONGEST * 2 // 3) :]
    return re.sub(r"([/_-])", r"\1<wbr>", html.escape(name))


def tile(csv_dir: Path, t: Tile, name: str) -> str:
    uri, why = thumbnail(_locate(csv_dir, t))
    alt = html.escape(name, quote=True)
    pic = f'<img src="{uri}" alt="{alt}">' if uri else f'<div class="hole">{why}</div>'
    title = html.escape(f"{t.path}\n{t.detail}".strip())
    return (
        f'<figure class="tile{"" if uri else " missing" if why == "missing" else " nopic"}"'
        f' title="{title}">{pic}'
        f"<figcaption>{html.escape(t.caption[:40])}<br><small>{_breakable(name)}</small></figcaption></figure>"
    )


def sheet(csv_dir: Path, tiles: list[Tile], names: dict[str, str]) -> str:
    return "<div class=sheet>" + "".join(tile(csv_dir, t, names[t.path]) for t in tiles) + "</div>"
