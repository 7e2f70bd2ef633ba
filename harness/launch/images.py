"""Build the harness's container images from Debian packages, with no image registry.

Air-gapped imaging networks have a Debian mirror but no Docker Hub. An image is built by
debootstrapping a minimal Debian, installing the server's packages with the chroot's apt
(from the same mirror this machine's apt uses), and `docker import`ing the tree. A build is
cached: its tag carries a digest of the recipe, so nothing is rebuilt unless it changed.

Each kind that has an image declares its recipe (`Capabilities.image_recipe`). The embedded
PACS image carries Debian's python3 plus the pure-Python pydicom and pynetdicom copied from
this installation, so it needs no package index either, and the harness files its recipe
names (the embedded_pacs package and the SQLite helper, ``harness_files_of``), run as
``python3 -m harness.embedded_pacs``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.docker import docker_client, image_present
from harness.nodes import catalog
from harness.nodes.capabilities import ImageRecipe

BUILDER_VERSION = "3"
SUITE = "bookworm"
REPOSITORY = "pacs-harness"


HARNESS_DIR = Path(__file__).parents[1]


def recipes() -> dict[str, ImageRecipe]:
    """The kinds the harness builds images of, with their recipes."""
    return {
        kind: cls.capabilities.image_recipe
        for kind, cls in catalog.kinds().items()
        if cls.capabilities.image_recipe is not None
    }


def _python_package_dir(name: str) -> Path:
    module = __import__(name)
    return Path(module.__file__).parent


def recipe_digest(recipe: ImageRecipe) -> str:
    """What decides the image content: builder, suite, packages, copied Python code."""
    digest = hashlib.sha256()
    digest.update(f"{BUILDER_VERSION}|{SUITE}|{','.join(recipe.packages)}".encode())
    for name in recipe.python_packages:
        module = __import__(name)
        digest.update(f"{name}=={getattr(module, '__version__', '?')}".encode())
    for relative, content in harness_files_of(recipe).items():
        digest.update(f"{relative}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:12]


def harness_files_of(recipe: ImageRecipe) -> dict[str, bytes]:
    """What an image carries of the harness, by path under /opt/pacs-harness: the files and
    packages (their .py files) its recipe names under harness/, and an empty
    harness/__init__.py, so `python3 -m harness.<package>` runs with nothing else of the
    harness present (such a package imports none of it)."""
    if not recipe.harness_files:
        return {}
    files = {"harness/__init__.py": b""}
    for relative in recipe.harness_files:
        source = HARNESS_DIR / relative
        paths = (sorted(p for p in source.rglob("*.py") if "__pycache__" not in p.parts)
                 if source.is_dir() else [source])
        for path in paths:
            files[f"harness/{path.relative_to(HARNESS_DIR)}"] = path.read_bytes()
    return files


def _recipe(name: str) -> ImageRecipe:
    known = recipes()
    if name not in known:
        raise ConfigError(f"images build {name!r}: unknown image (allowed: {', '.join(known)})")
    return known[name]


def default_tag(name: str) -> str:
    return f"{REPOSITORY}/{name}:{recipe_digest(_recipe(name))}"


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)\s+\S+", text, re.M
        )
        if match:
            return match.group(1)
    raise EnvironmentProblem("no Debian mirror found in /etc/apt/sources.list(.d)")


def _run(argv: list[str], log: Path, what: str) -> None:
    with open(log, "ab") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise EnvironmentProblem(f"image build: {what} failed (exit {code}); log {log}:\n{tail}")


@contextlib.contextmanager
def _proc_mounted(root: Path, log: Path) -> Iterator[None]:
    """/proc mounted in the chroot for the block, unmounted after (lazily if busy), so the
    tree is never archived or removed with it mounted."""
    _run(["mount", "-t", "proc", "proc", str(root / "proc")], log, "mount /proc")
    try:
        yield
    finally:
        if subprocess.call(["umount", str(root / "proc")]) != 0:
            subprocess.call(["umount", "-l", str(root / "proc")])


def build_image(
    name: str,
    tag: str | None = None,
    *,
    force: bool = False,
    say: Callable[[str], None] = lambda _msg: None,
) -> tuple[str, bool]:
    """Build (or reuse) the image for `name`; returns (image tag, built now?)."""
    recipe = _recipe(name)
    tag = tag or default_tag(name)
    client = docker_client()
    if not force and image_present(client, tag):
        say(f"{tag} is up to date (cached)")
        return tag, False
    if os.geteuid() != 0:
        raise EnvironmentProblem("building an image needs root (debootstrap and chroot)")
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(debootstrap):
        raise EnvironmentProblem("debootstrap not found (install: apt-get install debootstrap)")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix=f"pacs-harness-image-{name}-") as tmp:
        root = Path(tmp) / "root"
        log = Path(tmp) / "build.log"
        say(f"debootstrap {SUITE} (minbase)")
        _run([debootstrap, "--variant=minbase", SUITE, str(root), mirror], log, "debootstrap")
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")  # no service starts inside the chroot
        policy.chmod(0o755)
        say(f"apt-get install {' '.join(recipe.packages)}")
        env_prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
        _run(["chroot", str(root), *env_prefix, "apt-get", "update", "-qq"], log, "apt-get update")
        with _proc_mounted(root, log):  # OpenJDK's postinst runs java, which needs /proc
            _run(
                [
                    "chroot",
                    str(root),
                    *env_prefix,
                    "apt-get",
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    *recipe.packages,
                ],
                log,
                "apt-get install",
            )
        _run(["chroot", str(root), "apt-get", "clean"], log, "apt-get clean")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        if recipe.python_packages:
            target = root / "opt/pacs-harness"
            for package in recipe.python_packages:
                source = _python_package_dir(package)
                shutil.copytree(
                    source,
                    target / package,
                    ignore=shutil.ignore_patterns("__pycache__", "tests"),
                )
                # the metadata too: pydicom reads its own version through importlib.metadata
                for dist_info in source.parent.glob(f"{package}-*.dist-info"):
                    shutil.copytree(dist_info, target / dist_info.name)
        for relative, content in harness_files_of(recipe).items():
            destination = root / "opt/pacs-harness" / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(content)
        say(f"docker import {tag}")
        archive = Path(tmp) / "root.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        shutil.rmtree(root, ignore_errors=True)
        # the docker CLI streams large archives reliably (the SDK's chunked upload fails on
        # Debian's engine 20.10 with "invalid byte in chunk length")
        docker_cli = shutil.which("docker")
        if not docker_cli:
            raise EnvironmentProblem("image build: the docker command is missing (docker.io)")
        _run([docker_cli, "import", str(archive), tag], log, "docker import")
    if not image_present(client, tag):
        raise EnvironmentProblem(f"image build: docker import did not produce {tag}")
    return tag, True
