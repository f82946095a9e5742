"""Draw docs/img/architecture.png: the stages of the product, what each owns, and the files between them.

The picture beside the ASCII diagram of docs/ARCHITECTURE.md; rerun it when a stage is added or changes what it
owns (the boxes are written out below, not read from the code).

    .venv/bin/python scripts/architecture_diagram.py [--out docs/img/architecture.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLUE, GREEN, ORANGE, GREY = "#dbe9f6", "#e8f3e0", "#fbe6d4", "#eeeeee"
# name: (x, y, width, height, colour, what it owns)
STAGES = {
    "data/": (0.2, 3.2, 2.0, 1.3, BLUE, "data specs, sources,\nsplits, batched views"),
    "pretrain/": (3.0, 3.2, 2.6, 1.3, BLUE, "methods, losses, trainer,\nrun dir, evaluation"),
    "export/": (7.6, 3.2, 2.4, 1.3, BLUE, "ONNX export, parity,\nmetadata, runtime"),
    "index/": (12.0, 3.2, 2.4, 1.3, BLUE, "csr / faiss / Milvus,\nkernels, store"),
    "models/": (3.0, 1.0, 7.0, 1.2, GREEN, "networks, ModelConfig, checkpoints, method registry, target law"),
    "ood/": (7.6, 5.6, 2.4, 1.3, ORANGE, "scores, calibration,\ndrift monitor"),
    "serve/": (12.0, 5.6, 2.4, 1.3, ORANGE, "HTTP API (routers),\nbatching, durability"),
    "cli/": (0.2, 7.6, 14.2, 0.8, GREY, "`lpjepa`: one parser, each stage's <stage>/cli.py, errors -> exit codes"),
    "core/": (0.2, -0.6, 14.2, 0.8, GREY, "errors (LpjepaError: InvalidError, UnavailableError), atomic writes"),
}
# (from, to, label): the files that pass between stages
FLOWS = [
    ("data/", "pretrain/", "images"),
    ("pretrain/", "export/", "model.safetensors"),
    ("export/", "index/", "model.onnx"),
    ("export/", "ood/", "model.onnx"),
    ("ood/", "serve/", "calibration\nin the model"),
    ("index/", "serve/", "INDEX_DIR /\nMilvus"),
]


def centre(name: str, side: str) -> tuple[float, float]:
    x, y, w, h = STAGES[name][:4]
    return {"r": (x + w, y + h / 2), "l": (x, y + h / 2), "t": (x + w / 2, y + h), "b": (x + w / 2, y)}[side]


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(13, 7.2))
    for name, (x, y, w, h, colour, owns) in STAGES.items():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#555555"))
        ax.text(x + w / 2, y + h - 0.3, name, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + w / 2, y + (h - 0.3) / 2, owns, ha="center", va="center", fontsize=8)
    for src, dst, label in FLOWS:
        same_row = STAGES[src][1] == STAGES[dst][1]
        a, b = (centre(src, "r"), centre(dst, "l")) if same_row else (centre(src, "t"), centre(dst, "b"))
        ax.annotate("", b, a, arrowprops={"arrowstyle": "-|>", "color": "#333333", "lw": 1.4})
        mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        if same_row:
            ax.text(mx, my + 0.12, label, ha="center", va="bottom", fontsize=8, color="#333333")
        else:
            ax.text(mx + 0.1, my, label, ha="left", va="center", fontsize=8, color="#333333")
    dashed = {"arrowstyle": "-|>", "color": "#888888", "ls": "--"}
    for name in ("pretrain/", "export/"):  # both build the networks from models/ (an import, not a file)
        x, y, w, _ = STAGES[name][:4]
        ax.annotate("", (x + w / 2, 2.25), (x + w / 2, y), arrowprops=dashed)
    ax.text(7.2, 8.75, "Rectified LpJEPA: the stages and what each owns", ha="center", fontsize=12)
    note = "solid arrows: files passed between stages; dashed: imports. Every stage may import core/ and models/."
    ax.text(7.2, 0.45, note, ha="center", fontsize=8, color="#555555")
    ax.set_xlim(-0.2, 14.8)
    ax.set_ylim(-1.0, 9.1)
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "architecture.png")
    draw(parser.parse_args().out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
