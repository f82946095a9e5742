"""Assemble docs/RESULTS.md from the per-stage sections that each bench script writes under docs/results/.

Each bench owns one section file, so stages can be re-measured independently; this script only concatenates
them in the order of the data flow, so RESULTS.md never holds a number that no script printed.

    .venv/bin/python bench/collect_results.py
"""

from __future__ import annotations

from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
ORDER = (
    "models-target",
    "pretrain",
    "pretrain-loader",
    "pretrain-evaluate",
    "export",
    "index",
    "serve",
    "ood",
    "gpu-check",
)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sections", default=str(REPO / "docs" / "results"))
    ap.add_argument("--out", default=str(REPO / "docs" / "RESULTS.md"))
    args = ap.parse_args()
    sections = Path(args.sections)
    files = [sections / f"{name}.md" for name in ORDER if (sections / f"{name}.md").is_file()]
    files += sorted(p for p in sections.glob("*.md") if p not in files)
    parts = [
        "# Results\n",
        "Every number below was printed by a script in `bench/`; each section names its command and the machine it",
        "ran on (2 shared x86-64 cores unless stated). Sections live in `docs/results/`; images are linked from",
        "there.\n",
    ]
    parts += [f"- [{p.stem}](results/{p.name})" for p in files]
    for path in files:
        text = path.read_text(encoding="utf-8").strip()
        # Images referenced relative to the section file must resolve from docs/ too.
        text = text.replace("](./", "](results/")
        for img in sections.glob("*.png"):
            text = text.replace(f"]({img.name})", f"](results/{img.name})")
        parts += ["", "---", "", text]
    Path(args.out).write_text("\n".join(parts) + "\n", encoding="utf-8")
    print(f"wrote {args.out} from {len(files)} sections")


if __name__ == "__main__":
    main()
