"""Build ``dist/app.zip``, the function app's deployment package, honouring ``.funcignore``.

``.funcignore`` uses gitignore syntax, of which this reads the part the project uses:
comments, blank lines, ``!`` negation, a trailing ``/`` for directories only, a ``/``
elsewhere to anchor a pattern at the root, and ``fnmatch`` wildcards. As in git, nothing
under an ignored directory comes back. Stdlib only, so it runs before any install.

Usage: ``python -m devtools.deploy.package [--root DIR] [--output dist/app.zip]``.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Without these the package cannot start or install its dependencies.
REQUIRED_FILES = ("function_app.py", "host.json", "requirements.txt")


@dataclass(frozen=True, slots=True)
class IgnoreRule:
    """One line of ``.funcignore``."""

    pattern: str
    negated: bool
    directories_only: bool
    anchored: bool

    def matches(self, path: str, is_dir: bool) -> bool:
        """Whether this rule's pattern matches ``path`` (relative, ``/``-separated)."""
        if self.directories_only and not is_dir:
            return False
        if self.anchored:
            return fnmatch.fnmatchcase(path, self.pattern)
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], self.pattern)


def parse_ignore(text: str) -> list[IgnoreRule]:
    """The rules of a ``.funcignore`` text, in order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if negated:
            line = line[1:]
        directories_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        rules.append(IgnoreRule(line.lstrip("/"), negated, directories_only, anchored))
    return rules


def is_ignored(path: str, rules: Sequence[IgnoreRule], *, is_dir: bool = False) -> bool:
    """Whether ``path`` (relative to the root, ``/``-separated) stays out of the package.

    A path is out when it, or any directory above it, is matched last by a rule that is
    not negated.
    """
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        prefix_is_dir = depth < len(parts) or is_dir
        ignored = False
        for rule in rules:
            if rule.matches(prefix, prefix_is_dir):
                ignored = not rule.negated
        if ignored:
            return True
    return False


def package_files(root: Path, rules: Sequence[IgnoreRule]) -> Iterator[str]:
    """Relative paths of the files that go into the package, sorted, ignored directories pruned."""
    for directory, dirnames, filenames in os.walk(root):
        base = Path(directory).relative_to(root).as_posix()
        prefix = "" if base == "." else f"{base}/"
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(prefix + d, rules, is_dir=True))
        for name in sorted(filenames):
            relative = prefix + name
            if not is_ignored(relative, rules):
                yield relative


def build(root: Path, output: Path) -> tuple[int, int]:
    """Write the package to ``output``; return the file count and the zip's size in bytes."""
    ignore_file = root / ".funcignore"
    rules = parse_ignore(ignore_file.read_text()) if ignore_file.is_file() else []
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"not a function app root, missing: {', '.join(missing)} (in {root})")
    output_path = output.resolve()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with zipfile.ZipFile(output_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for relative in package_files(root, rules):
            source = root / relative
            if source.resolve() == output_path:
                continue
            archive.write(source, relative)
            count += 1
    return count, output_path.stat().st_size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path("."), help="the function app root (default: .)")
    parser.add_argument("--output", type=Path, default=Path("dist/app.zip"), help="default: dist/app.zip")
    args = parser.parse_args(argv)
    try:
        count, size = build(args.root.resolve(), args.output)
    except OSError as exc:
        print(f"package: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {count} files, {size / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
