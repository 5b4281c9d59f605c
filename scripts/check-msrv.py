#!/usr/bin/env python3
"""Checks the crate's declared minimum supported Rust version (MSRV) against its dependencies.

    python3 scripts/check-msrv.py

Reads `cargo metadata` (the dependency graph as resolved by the committed Cargo.lock, for the
host platform, normal + build + dev dependencies) and fails if any package declares a
`rust-version` newer than pgrpo's own.

What this proves, and what it does not:
- It proves that no dependency, as locked, *declares* that it needs a newer Rust than we say we
  support; so our `rust-version` is not contradicted by the lock file.
- Together with clippy's `incompatible_msrv` lint (on by default, run by CI with -D warnings),
  which flags calls to standard-library APIs stabilised after our `rust-version`, it also
  covers most accidental use of new std APIs in our own code.
- It does not compile anything with the old toolchain: language features newer than our MSRV,
  and dependencies that declare no `rust-version` (listed with --verbose) are not checked.
  Only the 1.95 toolchain is available where this project is built, so that stronger check
  (`cargo +1.89 check`) is left to machines that have it.
"""

import json
import subprocess
import sys


def version(v):
    parts = [int(p) for p in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    verbose = "--verbose" in sys.argv
    host = None
    for line in subprocess.run(
        ["rustc", "-vV"], check=True, capture_output=True, text=True
    ).stdout.splitlines():
        if line.startswith("host: "):
            host = line.split(": ", 1)[1]
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    root_id = meta["resolve"]["root"]
    packages = {p["id"]: p for p in meta["packages"]}
    root = packages[root_id]
    ours = root.get("rust_version")
    if not ours:
        print("error: Cargo.toml declares no rust-version")
        return 1
    # Everything reachable from the root in the resolved graph.
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    seen, stack = set(), [root_id]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(d["pkg"] for d in nodes[pid]["deps"])
    seen.discard(root_id)
    too_new, undeclared = [], []
    highest = ("0", None)
    for pid in sorted(seen, key=lambda i: packages[i]["name"]):
        p = packages[pid]
        rv = p.get("rust_version")
        if rv is None:
            undeclared.append(f"{p['name']} {p['version']}")
            continue
        if version(rv) > version(highest[0]):
            highest = (rv, f"{p['name']} {p['version']}")
        if version(rv) > version(ours):
            too_new.append(f"{p['name']} {p['version']} needs {rv}")
    print(
        f"pgrpo rust-version {ours}: {len(seen)} locked dependencies on {host}, "
        f"{len(seen) - len(undeclared)} declare a rust-version (highest {highest[0]}, "
        f"{highest[1]}), {len(undeclared)} declare none"
    )
    if verbose and undeclared:
        print("declare none: " + ", ".join(undeclared))
    if too_new:
        print("error: dependencies need a newer Rust than pgrpo's rust-version:")
        for t in too_new:
            print("  " + t)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
