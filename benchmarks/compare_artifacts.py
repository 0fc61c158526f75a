"""Which stored blobs two containers share, by their sha256 in the manifests (no tensor is read).

Used to show that a dial artifact rebuilt after a change to its pruned planes kept every other blob
byte for byte, so settings that read none of those planes measure exactly as on the earlier artifact.

    .venv/bin/python benchmarks/compare_artifacts.py OLD.clm NEW.clm [--out benchmarks/results/NAME.md]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from results_store import atomic_write

from compresslm.formats.container import read_header


def compare(old: Path, new: Path) -> dict:
    a, b = read_header(old)[0]["blobs"], read_header(new)[0]["blobs"]
    fields = ("nbytes", "dtype", "shape", "sha256")  # the offset may move; the bytes may not
    same, changed = [], []
    for name in sorted(set(a) | set(b)):
        ea, eb = a.get(name), b.get(name)
        equal = ea is not None and eb is not None and all(ea.get(f) == eb.get(f) for f in fields)
        (same if equal else changed).append(name)
    kinds = collections.Counter(".".join(n.rsplit(".", 2)[-2:]) for n in changed)
    return {"same": len(same), "changed": len(changed), "changed_kinds": dict(kinds.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = compare(args.old, args.new)
    lines = [f"# Blobs shared by `{args.old.name}` and `{args.new.name}`", "",
             f"Command: `.venv/bin/python benchmarks/compare_artifacts.py {args.old} {args.new}`", "",
             f"- identical (size, dtype, shape, sha256): {result['same']}",
             f"- changed or present in one only: {result['changed']}", "",
             "| changed blob kind (name suffix) | count |", "|---|---:|"]  # fmt: skip
    lines += [f"| `{kind}` | {count} |" for kind, count in result["changed_kinds"].items()]
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
