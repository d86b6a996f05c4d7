"""
A fresh ext4 file system for each server's turn: the same disk state for every peer.

Why: on a file system that has lived (created and removed many files), ext4's block allocator
costs very different CPU depending on which block group a new directory lands in. Measured on
the bench machine, ten threads writing, fsyncing and linking the same files into six new
directories under /var/tmp ran at 182, 227, 819, 856, 878 and 918 msg/s (CPU 8.6 to 1.4 ms
per message); on a freshly made ext4 at 365-391 msg/s, CPU 1.1-1.3 ms. A server whose
directory landed in a slow group lost to one that did not, whatever its code: the ratios of
one run to the next flipped.

So each turn gets a sparse image file, ``mkfs.ext4`` (inode tables and journal written at
once: no background initialisation during the measure), loop-mounted at the turn's working
directory, and unmounted and removed after. The loop device passes fsync through to the disk
(a flush of the image file), so the servers still pay for durability. Needs root and
mkfs.ext4; without them the bench says so and uses plain directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["available", "mount", "unmount", "unmount_all", "SIZE"]

#: The image's size: room for the largest turn (the 100,000-message queue, about 1 GB with
#: its inodes), written sparsely.
SIZE = "8G"

_MOUNTED: dict[Path, Path] = {}  # mount point -> its image


def available() -> str | None:
    """None when fresh file systems can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root (mount needs it)"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def mount(directory: Path, size: str = SIZE) -> None:
    """Make *directory* (new or empty) the root of a fresh ext4; its image sits beside it.

    Raises CalledProcessError (with the tool's message) when the file system cannot be made
    or mounted (no loop device in a container, say); nothing is left behind then."""
    directory.mkdir(parents=True, exist_ok=True)
    image = directory.with_name(directory.name + ".img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E",
                        "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(image)],
                       check=True, capture_output=True, text=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(directory)], check=True,
                       capture_output=True, text=True)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    directory.chmod(0o755)  # Postfix's daemons (users postfix, nobody) reach their files
    _MOUNTED[directory] = image


def unmount(directory: Path) -> bool:
    """Unmount and remove a file system ``mount`` made; False when *directory* is not one."""
    image = _MOUNTED.pop(directory, None)
    if image is None:
        return False
    if subprocess.run(["umount", str(directory)], capture_output=True).returncode:
        # Still busy (a process of the turn lingers): detached now, freed when it exits.
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
    image.unlink(missing_ok=True)
    return True


def unmount_all() -> None:
    """Every file system still mounted (a turn that failed before its cleanup)."""
    for directory in list(_MOUNTED):
        unmount(directory)
