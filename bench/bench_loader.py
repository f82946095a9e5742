"""Does the loader keep up with the model? Images/s of view making vs one training step, on this machine.

Rows (medians of --repeats timed batches after a warm-up):
  loader  batched   data.augment.ViewMaker on in-memory uint8 batches (what training uses)
  loader  per-image torchvision.transforms.v2 per image in a DataLoader (the baseline), 0 and N workers
  model   step      forward + loss + backward + AdamW step of the fmnist-cpu network, fp32 / bf16 autocast,
                    channels_last on and off
"images/s" counts source images (each gives 2 views). The loader keeps up when its images/s is well above
the model's: then the model step is the bottleneck, as it should be.

    .venv/bin/python bench/bench_loader.py [--threads 2] [--batch 256] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import common
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from data.augment import ViewMaker, resolve_recipe
from data.config import AugmentConfig
from data.sources import load_fashion_mnist
from pretrain.config import load_config


class PerImageViews(Dataset):
    """The textbook pipeline: two independent torchvision v2 transforms per image."""

    def __init__(self, images: np.ndarray, aug: AugmentConfig, size: int, mean: list[float], std: list[float]):
        self.images = torch.from_numpy(np.array(images, copy=True)).unsqueeze(1)
        jitter = v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)
        self.t = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=tuple(aug.crop_scale), antialias=True),
                v2.RandomHorizontalFlip(aug.flip_p),
                v2.RandomApply([jitter], p=aug.jitter_p),
                v2.RandomSolarize(128, p=aug.solarize_p),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        return self.t(img), self.t(img)


def _median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def bench_batched(images: torch.Tensor, aug: AugmentConfig, batch: int, repeats: int) -> float:
    maker = ViewMaker(aug, 28, 1, [0.286], [0.353])
    gen = torch.Generator().manual_seed(0)
    state = {"i": 0}

    def once():
        i = state["i"] = (state["i"] + batch) % (len(images) - batch)
        maker(images[i : i + batch], gen)

    return _median_rate(once, batch, repeats)


def bench_per_image(array: np.ndarray, aug: AugmentConfig, batch: int, repeats: int, workers: int) -> float:
    """Throughput of a fresh DataLoader drained for 4 x repeats batches, worker start-up included: with workers,
    timing single `next()` calls would only measure taking an already-prefetched batch."""
    n_batches = 4 * repeats
    ds = PerImageViews(array[: batch * n_batches], aug, 28, [0.286], [0.353])
    rates = []
    for _ in range(2 if workers else 1):
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True, drop_last=True)
        t = time.perf_counter()
        count = sum(1 for _ in loader)
        rates.append(count * batch / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_model(batch: int, repeats: int, bf16: bool, channels_last: bool) -> float:
    from models.encoder import build_model
    from pretrain.methods import Objective
    from pretrain.trainer import TrainNet, model_config

    cfg = load_config("fmnist-cpu", ["model.in_channels=1", "model.mean=[0.286]", "model.std=[0.353]"])
    mcfg = model_config(cfg)
    torch.manual_seed(0)
    net = TrainNet(build_model(mcfg), num_classes=10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    obj = Objective(cfg, mcfg.target_sigma, mcfg.embed_dim, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    views = [torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt) for _ in range(2)]

    def once():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hs, _, _, _ = net(views)
        loss, _, _ = obj([h.float() for h in hs], 2)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _median_rate(once, batch, repeats)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    ap.add_argument("--markdown", default=None, help="also write the table as a markdown section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = load_fashion_mnist("train")
    images = torch.from_numpy(np.array(src.array[:20000], copy=True)).unsqueeze(1)
    aug = resolve_recipe(load_config("fmnist-cpu").augment, 1)
    rows = [
        ("loader", "batched ViewMaker (in-process)", bench_batched(images, aug, args.batch, args.repeats)),
        ("loader", "per-image v2, DataLoader 0 workers", bench_per_image(src.array, aug, args.batch, args.repeats, 0)),
        (
            "loader",
            f"per-image v2, DataLoader {args.workers} workers",
            bench_per_image(src.array, aug, args.batch, args.repeats, args.workers),
        ),
    ]
    for bf16 in (False, True):
        for cl in (True, False):
            name = f"train step {'bf16' if bf16 else 'fp32'}, {'channels_last' if cl else 'NCHW'}"
            rows.append(("model", name, bench_model(args.batch, args.repeats, bf16, cl)))
    base = rows[1][2]
    print(f"threads={args.threads} batch={args.batch} repeats={args.repeats} (median images/s; 2 views each)")
    print(f"{'kind':7} {'what':42} {'images/s':>10} {'vs per-image':>13}")
    for kind, what, rate in rows:
        print(f"{kind:7} {what:42} {rate:10.0f} {rate / base:12.1f}x")
    if args.markdown:
        load = os.getloadavg()[0]
        md = [
            "## Loader vs model step (bench/bench_loader.py)",
            "",
            f"`.venv/bin/python bench/bench_loader.py --threads {args.threads} --batch {args.batch} "
            f"--repeats {args.repeats} --workers {args.workers}`; median images/s (each image -> 2 views of 28 px), "
            f"Fashion-MNIST, fmnist-cpu recipe and network; 1-minute load average at the end: {load:.1f} on "
            f"{os.cpu_count()} cores (compare rows of this one run; absolute numbers move with the machine's load).",
            "",
            "| kind | what | images/s | vs per-image v2 |",
            "|---|---|---|---|",
            *[f"| {k} | {w} | {r:.0f} | {r / base:.1f}x |" for k, w, r in rows],
            "",
        ]
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(md), encoding="utf-8")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([{"kind": k, "what": w, "images_per_s": r} for k, w, r in rows], fh, indent=2)


if __name__ == "__main__":
    main()
