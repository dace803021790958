"""`migchain certs --out DIR`: the renewal of extender/certs.py on folders laid out as kubelet mounts a Secret.

Each folder DIR/<secret>/ holds its files behind a `..data` symlink, as a
Secret volume does: a renewal writes a new timestamped folder and swaps the
symlink, so a reader (the extender, kube-scheduler) sees the old pair or the
new pair, never half of each. Point --tls-cert-file etc. at these paths.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from extender.certs import LeafSpec, Stored, renew

# The CA folder's record of when its bundle last changed (the Secret's annotation).
BUNDLE_CHANGED = "bundle-changed"
KEYS = ("tls.crt", "tls.key", "next.crt", "next.key", "ca.crt")
PRIVATE = ("tls.key", "next.key")


def read_folder(folder: Path) -> dict[str, bytes]:
    """The files of a folder by name; {} when it does not exist."""
    return {name: (folder / name).read_bytes() for name in KEYS if (folder / name).is_file()}


def project(folder: Path, files: Mapping[str, bytes], now: datetime.datetime) -> None:
    """Replace the files of `folder` at once, as kubelet's atomic writer updates a mounted Secret."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "..data"
    previous = os.readlink(data) if data.is_symlink() else None
    stamp = folder / f"..{now:%Y_%m_%d_%H_%M_%S.%f}"
    stamp = stamp if not stamp.exists() else stamp.with_name(f"{stamp.name}.{os.getpid()}")
    stamp.mkdir(mode=0o700)
    for name, content in files.items():
        target = stamp / name
        target.write_bytes(content)
        target.chmod(0o600 if name in PRIVATE else 0o644)
    stamp.chmod(0o755)
    swap = folder / "..data_tmp"
    swap.unlink(missing_ok=True)
    swap.symlink_to(stamp.name)
    os.replace(swap, data)  # the moment every file changes
    for name in KEYS:
        visible = folder / name
        if name in files and not (visible.is_symlink() and os.readlink(visible) == f"..data/{name}"):
            link = folder / f"..{name}_tmp"
            link.unlink(missing_ok=True)
            link.symlink_to(f"..data/{name}")
            os.replace(link, visible)  # a plain file of an older `--out` becomes a link, at once too
        elif name not in files and (visible.is_symlink() or visible.exists()):
            visible.unlink()
    if previous and previous != stamp.name:
        shutil.rmtree(folder / previous, ignore_errors=True)


def renew_folders(out: Path, ca_folder: str, specs: Sequence[LeafSpec], now: datetime.datetime) -> int:
    """Renew the certificates under `out`; prints what changed and why. Exit code 0."""
    authority = read_folder(out / ca_folder)
    changed_file = out / ca_folder / BUNDLE_CHANGED
    changed = datetime.datetime.fromisoformat(changed_file.read_text().strip()) if changed_file.is_file() else None
    stored = Stored(authority, {spec.secret: read_folder(out / spec.secret) for spec in specs}, changed)
    plan, after = renew(stored, specs, now)
    for reason in plan.reasons:
        print(reason)
    if after.authority != stored.authority:
        project(out / ca_folder, after.authority, now)
        print(f"wrote {out / ca_folder}/{{{','.join(sorted(after.authority))}}}")
    if after.bundle_changed and after.bundle_changed != changed:
        changed_file.write_text(after.bundle_changed.isoformat() + "\n")
    for spec in specs:
        if after.leaves.get(spec.secret) and after.leaves[spec.secret] != stored.leaves.get(spec.secret):
            project(out / spec.secret, after.leaves[spec.secret], now)
            print(f"wrote {out / spec.secret}/{{ca.crt,tls.crt,tls.key}}")
    if not plan.changes and after == stored:
        print(f"nothing is due under {out}")
    return 0
