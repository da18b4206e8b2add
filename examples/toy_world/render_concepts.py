"""Render the personal concepts' training photos to ``examples/toy_world/concepts/<name>/`` (PNGs + metadata.jsonl).

python examples/toy_world/render_concepts.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_infusion.toy.concepts import CONCEPTS, CONCEPTS_DIR, write_concept_photos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=CONCEPTS_DIR)
    parser.add_argument("--names", nargs="*", default=list(CONCEPTS), choices=list(CONCEPTS))
    args = parser.parse_args(argv)
    for folder in write_concept_photos(args.output, args.names):
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
