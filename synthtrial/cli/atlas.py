"""`synthtrial atlas`: the lesion atlas (every type at every stage on light, medium and dark skin)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from synthtrial.cli.common import Seed, app, handles_errors, out


@app.command("atlas")
@handles_errors
def atlas_command(
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Picture to write: .png, .jpg or .jpeg.")] = Path(
        "atlas.png"),
    seed: Seed = 0,
    mm_per_px: Annotated[float, typer.Option("--mm-per-px", help="Magnification: millimetres of skin per pixel "
                                             "(0.08: each 12.8 mm tile is 160 px, about 5x a 512-px face).")] = 0.08,
) -> None:
    """Draw every lesion type at each stage of its life (onset, active, resolving, residual mark or scar) on light, medium and dark skin, magnified, with a millimetre scale bar.

    The lesions are drawn by the same renderer and settings as [bold]generate[/], at a typical diameter of each type from the lesion model's ranges (comedones 1-3 mm, papules and pustules 2-5 mm, nodules 5-10 mm). The skin is a synthetic swatch per skin type, so the atlas shows lesions, not patients.
    """
    from synthtrial.render.atlas import write_atlas

    atlas = write_atlas(out_file, seed=seed, mm_per_px=mm_per_px)
    h, w = atlas.image.shape[:2]
    out.print(f"wrote {out_file} ({w}x{h} px, {len(atlas.cells)} tiles: "
              f"{atlas.cells['type'].nunique()} types x {atlas.cells['stage'].nunique()} stages x "
              f"{atlas.cells['skin'].nunique()} skins)")
