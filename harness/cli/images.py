"""`images build`: container images for `launch: docker` nodes."""

from __future__ import annotations

import click

from harness.console import console, out
from harness.errors import (
    ConfigError,
)


@click.group()
def images() -> None:
    """Container images for `launch: docker` nodes, built without a registry."""


@images.command("build")
@click.argument("names", nargs=-1, required=True)
@click.option("--tag", default=None, help="image tag (default: pacs-harness/NAME:<recipe digest>)")
@click.option("--force", is_flag=True, help="rebuild even when a cached image matches")
def images_build(names: tuple[str, ...], tag: str | None, force: bool) -> None:
    """Build orthanc, dcmqrscp or embedded images from Debian packages (debootstrap + apt).

    The mirror is the one this machine's apt uses; a build whose recipe did not change is
    reused. Prints the image name it made.
    """
    from harness.launch.images import build_image, recipes

    for name in names:
        if name not in recipes():
            raise ConfigError(
                f"images build {name!r}: unknown image (allowed: {', '.join(recipes())})"
            )
    if tag and len(names) > 1:
        raise ConfigError("--tag names one image: build one image at a time with --tag")
    for name in names:
        with console.status(f"building {name}..."):
            image, built = build_image(
                name, tag, force=force, say=lambda msg: console.print(f"  {msg}")
            )
        out.print(image)
