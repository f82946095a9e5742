"""The pretraining loop: one process on CPU/GPU or one rank of a torchrun/DDP job.

Run folder (rank 0 writes it): config.json (the resolved TrainConfig), model.safetensors (weights + ModelConfig,
what export and eval read), train_state.pt (for --resume), metrics.jsonl (one JSON line per log step) and
summary.json at the end. Checkpoints are atomic, every `checkpoint_every` steps and at the end; SIGINT/SIGTERM
finish the current step, write a checkpoint and stop (exit 130 from the CLI), so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.atomic_io import atomic_write_text
from core.errors import InvalidError
from data.loader import build_batches, default_stats, detect_channels
from data.sources import open_source
from models.checkpoint import MODEL_FILENAME, save_checkpoint
from models.config import ModelConfig
from models.encoder import Encoder, build_model
from models.rgg import expected_l0, resolve_sigma
from pretrain.config import TrainConfig
from pretrain.distributed import broadcast_seed, get_rank, get_world_size, is_distributed, shutdown
from pretrain.evaluate.sparsity import NEAR_DEAD_FRACTION
from pretrain.methods import Objective, rectifies
from pretrain.optim import WarmupCosine, build_optimizer
from pretrain.state import STATE_FILENAME, TrainState, capture_rng, load_state, restore_rng, save_state

CONFIG_FILENAME = "config.json"
METRICS_FILENAME = "metrics.jsonl"
# One line per log step: the per-dimension activation rate of the projector output over that log window (train
# mode, local batch), so the histogram of rates can be followed through training (bench/diagnose_sparsity.py).
RATES_FILENAME = "dim_rates.jsonl"
SUMMARY_FILENAME = "summary.json"
RUN_FILES = (CONFIG_FILENAME, MODEL_FILENAME, STATE_FILENAME, METRICS_FILENAME, RATES_FILENAME, SUMMARY_FILENAME)
# Keys that may differ between the original run and its --resume: they change speed or logging, not the result.
RUNTIME_KEYS = frozenset(
    {
        "train.progress",
        "train.log_every",
        "train.checkpoint_every",
        "train.threads",
        "train.device",
        "data.num_workers",
        "description",
    }
)
INTERRUPTED = "interrupted"
COMPLETED = "completed"


class TrainError(InvalidError):
    """A training request that cannot start (run folder conflicts, resume mismatch); the CLI exits 2 on it."""


# ----------------------------------------------------------------------------------------------- run folder
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "backbone_kwargs":
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Keys whose values differ, ignoring RUNTIME_KEYS."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if k not in RUNTIME_KEYS and fa.get(k) != fb.get(k))


def read_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise TrainError(f"{run_dir} is not a run folder (no {CONFIG_FILENAME}); nothing to resume")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, json.JSONDecodeError) as err:
        raise TrainError(f"{path} is not a valid training config: {err}") from err


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> list[str]:
    """Refuse a run folder we must not touch; no side effects. Returns the run files that --force will replace."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / STATE_FILENAME).is_file():
            raise TrainError(f"cannot resume: {run_dir / STATE_FILENAME} does not exist")
        return []
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"{run_dir} exists and is not a directory")
    if existing and not force:
        raise TrainError(
            f"{run_dir} already holds a run ({', '.join(existing)}); use --resume to continue it "
            "or --force to overwrite it"
        )
    return existing


def claim_run_dir(run_dir: Path, replace: list[str]) -> None:
    """Rank 0, once everything that could fail on bad input has been built: clear a --force'd run, create."""
    for name in replace:
        (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------- the network
class TrainNet(nn.Module):
    """Encoder plus online linear probes, run as ONE forward per step (what DDP requires).

    The probes read detached backbone features and detached codes, so their loss trains only themselves while
    DDP still averages their gradients across ranks.
    """

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.rectified_projector = encoder.config.rectify
        self.num_classes = num_classes
        if num_classes > 0:
            self.probe_feat = nn.Linear(encoder.feature_dim, num_classes)
            self.probe_code = nn.Linear(encoder.embed_dim, num_classes)

    def pre_activation(self, feats: torch.Tensor) -> torch.Tensor:
        """Projector output before its final ReLU (the objective applies the rectification itself)."""
        layers = list(self.encoder.projector)
        if self.rectified_projector:
            layers = layers[:-1]
        x = feats
        for layer in layers:
            x = layer(x)
        return x

    def forward(
        self, views: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hs: list[torch.Tensor | None] = [None] * len(views)
        first_feats: torch.Tensor | None = None
        # Same-size views go through the network as one batch (fewer, larger kernels; BN sees both views).
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            by_size.setdefault(tuple(v.shape[1:]), []).append(i)
        for idx in by_size.values():
            x = torch.cat([views[i] for i in idx]) if len(idx) > 1 else views[idx[0]]
            feats = self.encoder.backbone(x)
            h = self.pre_activation(feats)
            n = views[idx[0]].shape[0]
            for k, i in enumerate(idx):
                hs[i] = h[k * n : (k + 1) * n]
                if i == 0:
                    first_feats = feats[k * n : (k + 1) * n]
        assert first_feats is not None
        logits_f = logits_c = None
        if self.num_classes > 0:
            logits_f = self.probe_feat(first_feats.detach().float())
            code = F.relu(hs[0]) if self.rectified_projector else hs[0]
            logits_c = self.probe_code(code.detach().float())
        return [h for h in hs if h is not None], first_feats, logits_f, logits_c


# ------------------------------------------------------------------------------------------------- helpers
def _launched_by_torchrun() -> bool:
    """torchrun sets TORCHELASTIC_RUN_ID in every worker; a plain process with WORLD_SIZE > 1 is also a rank."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _init_distributed(want_device: str = "auto") -> tuple[bool, int]:
    """Join the torchrun process group when launched under torchrun; returns (distributed, local_rank).

    A one-process torchrun joins a group too, so `torchrun --nproc_per_node 1` runs the real DDP path (process
    group, DistributedDataParallel wrapper, collectives) rather than silently the single-process one; that is
    how scripts/gpu_check.sh proves the NCCL path on a one-GPU machine. NCCL only when training on CUDA:
    train.device=cpu on a GPU machine uses gloo.
    """
    if not _launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return is_distributed(), int(os.environ.get("LOCAL_RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = want_device.startswith("cuda") or (want_device == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return True, local_rank


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        return torch.device("cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"train.device={want} but CUDA is not available")
        return torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if want == "mps" and not torch.backends.mps.is_available():
        raise TrainError("train.device=mps but MPS is not available")
    return torch.device(want)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 autocast pays off:
    measured 1.75x per step for the quarter-width ResNet-18 (bench/bench_loader.py); without them it is slower."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """autocast dtype or None. 'auto' = bf16 on GPUs that support it and on CPUs with native bf16, else fp32.
    The losses always compute in fp32 (pretrain/losses/precision.py)."""
    want = cfg.train.precision
    if want == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return None
    if want == "fp32":
        return None
    if want == "fp16" and device.type != "cuda":
        raise TrainError("train.precision=fp16 needs a CUDA device; use bf16 or fp32")
    return torch.bfloat16 if want == "bf16" else torch.float16


def weights_digest(model: nn.Module) -> str:
    """sha256 of all parameters (bytes): equal digests on all ranks prove the DDP replicas stayed identical."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _StopFlag:
    """SIGINT/SIGTERM -> finish the step, checkpoint, stop. A second SIGINT aborts immediately."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class Window:
    """Running sums over one log interval."""

    steps: int = 0
    images: int = 0
    start: float = 0.0
    l0: float = 0.0
    probe_hits: float = 0.0
    probe_code_hits: float = 0.0
    probe_n: int = 0
    parts: dict[str, float] | None = None
    active: torch.Tensor | None = None
    fired: torch.Tensor | None = None  # per dimension: how many samples were non-zero
    samples: int = 0

    def reset(self) -> None:
        self.steps = self.images = self.probe_n = self.samples = 0
        self.l0 = self.probe_hits = self.probe_code_hits = 0.0
        self.parts, self.active, self.fired, self.start = {}, None, None, time.perf_counter()

    def rate_record(self, target_l0: float | None) -> tuple[dict[str, Any], list[float]]:
        """Percentiles of the per-dimension rates of this window, near-dead count, and the rates themselves."""
        if self.fired is None or not self.samples:
            return {}, []
        rates = (self.fired.double() / self.samples).cpu()
        q = torch.quantile(rates, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
        rec: dict[str, Any] = {"rate_p05": round(q[0], 6), "rate_p50": round(q[1], 6), "rate_p95": round(q[2], 6)}
        if target_l0:
            rec["near_dead_dims"] = int((rates < NEAR_DEAD_FRACTION * target_l0).sum())
        return rec, [round(float(r), 5) for r in rates]


def _write_metrics_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    status: str
    step: int
    total_steps: int
    run_dir: Path
    summary: dict[str, Any]


def resolve_config(cfg: TrainConfig, source: Any) -> TrainConfig:
    """Fill the 'auto' fields (channels, normalisation) from the data, so config.json is self-contained."""
    out = TrainConfig.from_dict(cfg.to_dict())
    if out.model.in_channels == 0:
        out.model.in_channels = detect_channels(source)
    if not out.model.mean:
        out.model.mean, out.model.std = default_stats(source, out.model.in_channels)
    if len(out.model.mean) != out.model.in_channels:
        raise TrainError(f"model.mean has {len(out.model.mean)} entries for {out.model.in_channels} channel(s)")
    out.validate()
    return out


def model_config(cfg: TrainConfig) -> ModelConfig:
    m = cfg.method
    sigma = resolve_sigma(m.p, m.mu, m.sigma)
    return ModelConfig(
        backbone=cfg.model.backbone,
        backbone_kwargs=dict(cfg.model.backbone_kwargs),
        projector_dims=list(cfg.model.projector_dims),
        projector_bn=bool(cfg.model.projector_bn),
        rectify=rectifies(m.name),
        in_channels=cfg.model.in_channels,
        image_size=cfg.model.image_size,
        mean=list(cfg.model.mean),
        std=list(cfg.model.std),
        method=m.name,
        target_p=float(m.p),
        target_mu=float(m.mu),
        target_sigma=float(sigma),
    )


def _mean_parts(window: Window) -> dict[str, float]:
    return {k: v / max(window.steps, 1) for k, v in (window.parts or {}).items()}


def train(
    cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False, progress: bool | None = None
) -> RunResult:
    """Train (or resume) a run in `run_dir`; returns how it ended. Raises TrainError/DataSpecError/ValueError."""
    run_dir = Path(run_dir)
    distributed, local_rank = _init_distributed(cfg.train.device)
    rank, world = get_rank(), get_world_size()
    clean = False
    try:
        result = _train(cfg, run_dir, resume, force, progress, distributed, local_rank, rank, world)
        clean = True
        return result
    finally:
        if distributed:
            shutdown(clean)


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    force: bool,
    progress: bool | None,
    distributed: bool,
    local_rank: int,
    rank: int,
    world: int,
) -> RunResult:
    device = _device(cfg, local_rank)
    threads = cfg.train.threads
    if threads == 0 and distributed and device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if threads > 0:
        torch.set_num_threads(threads)
    source = open_source(cfg.data.spec)
    cfg = resolve_config(cfg, source)
    replace = check_run_dir(run_dir, resume, force)
    if resume:
        stored = read_run_config(run_dir)
        diff = config_diff(stored, cfg)
        if diff:
            raise TrainError(f"cannot resume {run_dir}: the config differs from the run's in {', '.join(diff)}")

    seed = broadcast_seed(cfg.train.seed)
    torch.manual_seed(seed)
    try:
        mcfg = model_config(cfg)
        encoder = build_model(mcfg).to(device)
    except (TypeError, ValueError) as err:  # e.g. an unknown backbone_kwargs key, a ViT patch that does not fit
        raise TrainError(f"cannot build the model ({cfg.model.backbone}, {cfg.model.backbone_kwargs}): {err}") from err
    num_classes = source.num_classes if (cfg.probe.enabled and source.labels is not None) else 0
    net = TrainNet(encoder, num_classes).to(device)
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if distributed and cfg.model.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        encoder = net.encoder
    loss_gen = torch.Generator(device=device).manual_seed(seed * 7919 + 17)
    objective = Objective(cfg, mcfg.target_sigma, mcfg.embed_dim, loss_gen)
    optimizer = build_optimizer(cfg.optim, encoder)
    probe_params = [p for n, p in net.named_parameters() if n.startswith("probe_")]
    probe_opt = (
        torch.optim.AdamW(probe_params, lr=cfg.probe.lr, weight_decay=cfg.probe.weight_decay) if probe_params else None
    )
    batches = build_batches(cfg, source, mcfg.in_channels, mcfg.mean, mcfg.std, rank, world, device)
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * batches.steps_per_epoch))
    schedule = WarmupCosine.from_config(cfg.optim, total)
    # Everything that bad input can break has been built: only now touch the run folder (after every rank has
    # checked it, so rank 0 cannot clear files another rank is still looking at).
    if distributed:
        dist.barrier()
    if rank == 0:
        if not resume:
            claim_run_dir(run_dir, replace)
        atomic_write_text(run_dir / CONFIG_FILENAME, cfg.to_json() + "\n")

    start, elapsed_before = 0, 0.0
    if resume:
        state = load_state(run_dir / STATE_FILENAME)
        if state.total_steps != total:
            raise TrainError(f"cannot resume: the run was planned for {state.total_steps} steps, now {total}")
        net.load_state_dict({**state.model, **(state.probe or {})}, strict=True)
        optimizer.load_state_dict(state.optimizer)
        if probe_opt is not None and state.probe_optimizer is not None:
            probe_opt.load_state_dict(state.probe_optimizer)
        if state.loss_generator is not None:
            loss_gen.set_state(state.loss_generator)
        restore_rng(state.rng)
        start, elapsed_before = state.step, state.elapsed_s
        summary_path = run_dir / SUMMARY_FILENAME
        if start >= total and summary_path.is_file():  # nothing left to do: keep the finished run's summary
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            return RunResult(COMPLETED, start, total, run_dir, summary)
        if rank == 0:
            _truncate_metrics(run_dir / METRICS_FILENAME, start)
            _truncate_metrics(run_dir / RATES_FILENAME, start)

    model: nn.Module = net
    if distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(net, **ddp_kwargs)

    amp_dtype = _precision(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    show = cfg.train.progress if progress is None else progress
    target_l0 = (
        expected_l0(mcfg.target_p, mcfg.target_mu, mcfg.target_sigma)
        if cfg.method.name in ("rectified_lpjepa", "ablation_rgn_raw")
        else None
    )
    n_global = cfg.augment.global_views

    def checkpoint(step: int, elapsed: float, last: dict[str, Any]) -> None:
        if rank != 0:
            return
        model_sd = {k: v for k, v in net.state_dict().items() if not k.startswith("probe_")}
        probe_sd = {k: v for k, v in net.state_dict().items() if k.startswith("probe_")}
        save_state(
            run_dir / STATE_FILENAME,
            TrainState(
                step=step,
                total_steps=total,
                model=model_sd,
                optimizer=optimizer.state_dict(),
                probe=probe_sd,
                probe_optimizer=probe_opt.state_dict() if probe_opt else None,
                loss_generator=loss_gen.get_state(),
                rng=capture_rng(),
                config=cfg.to_dict(),
                elapsed_s=elapsed,
            ),
        )
        save_checkpoint(
            run_dir / MODEL_FILENAME,
            encoder,
            extra={
                "step": step,
                "total_steps": total,
                "epoch": step / batches.steps_per_epoch,
                "train_config": cfg.to_dict(),
                "metrics": last,
            },
        )

    bar = None
    if show and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)

    window = Window()
    window.reset()
    last_record: dict[str, Any] = {}
    t0 = time.perf_counter()
    step = start
    status = COMPLETED
    net.train()
    it: Iterator = batches.iterate(start, total)
    with _StopFlag() as stop:
        while step < total:
            lr = schedule.apply(optimizer, step)
            batch = next(it)
            views = batch.views
            if cfg.model.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                hs, _, logits_f, logits_c = model(views)
            loss, parts, zs = objective([h.float() for h in hs], n_global)
            total_loss = loss
            if logits_f is not None and batch.labels is not None:
                probe_loss = F.cross_entropy(logits_f.float(), batch.labels) + F.cross_entropy(
                    logits_c.float(), batch.labels
                )
                total_loss = total_loss + probe_loss
            optimizer.zero_grad(set_to_none=True)
            if probe_opt is not None:
                probe_opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total_loss).backward()
                scaler.step(optimizer)
                if probe_opt is not None:
                    scaler.step(probe_opt)
                scaler.update()
            else:
                total_loss.backward()
                optimizer.step()
                if probe_opt is not None:
                    probe_opt.step()
            if not math.isfinite(parts["loss"]):
                raise FloatingPointError(f"loss became {parts['loss']} at step {step}; lower optim.lr or use fp32")
            step += 1

            # ---- metrics of this step (local batch; cheap, no extra forward)
            with torch.no_grad():
                z0 = zs[0].detach()
                active = (z0 > 0).any(dim=0)
                window.active = active if window.active is None else window.active | active
                fired = (z0 > 0).sum(dim=0)
                window.fired = fired if window.fired is None else window.fired + fired
                window.samples += int(z0.shape[0])
                window.l0 += float((z0 > 0).float().mean())
                if logits_f is not None and batch.labels is not None:
                    window.probe_hits += float((logits_f.argmax(1) == batch.labels).sum())
                    window.probe_code_hits += float((logits_c.argmax(1) == batch.labels).sum())
                    window.probe_n += int(batch.labels.numel())
            window.steps += 1
            window.images += cfg.train.batch_size
            for k, v in parts.items():
                window.parts[k] = window.parts.get(k, 0.0) + v  # type: ignore[index]

            stop_now = stop.requested
            if distributed:
                flag = torch.tensor([1.0 if stop_now else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item() > 0)

            if step % cfg.train.log_every == 0 or step == total or stop_now:
                dt = max(time.perf_counter() - window.start, 1e-9)
                record = {
                    "step": step,
                    "epoch": round(step / batches.steps_per_epoch, 4),
                    "lr": lr,
                    **{k: round(v, 6) for k, v in _mean_parts(window).items()},
                    "l0": round(window.l0 / window.steps, 6),
                    "dead_dims": int((~window.active).sum()) if window.active is not None else None,
                    "images_per_s": round(window.images / dt, 2),
                }
                if target_l0 is not None:
                    record["target_l0"] = round(target_l0, 6)
                rate_stats, rates = window.rate_record(target_l0)
                record.update(rate_stats)
                if window.probe_n:
                    record["probe_acc"] = round(window.probe_hits / window.probe_n, 4)
                    record["probe_code_acc"] = round(window.probe_code_hits / window.probe_n, 4)
                record["elapsed_s"] = round(elapsed_before + time.perf_counter() - t0, 2)
                last_record = record
                if rank == 0:
                    _write_metrics_line(run_dir / METRICS_FILENAME, record)
                    if rates:
                        _write_metrics_line(run_dir / RATES_FILENAME, {"step": step, "rates": rates})
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{record['loss']:.3g}",
                            l0=f"{record['l0']:.3f}",
                            img_s=f"{record['images_per_s']:.0f}",
                            **({"probe": f"{record['probe_acc']:.3f}"} if "probe_acc" in record else {}),
                        )
                window.reset()
            if bar is not None:
                bar.update(1)
            every = cfg.train.checkpoint_every
            if stop_now or step == total or (every and step % every == 0):
                checkpoint(step, elapsed_before + time.perf_counter() - t0, last_record)
            if stop_now and step < total:
                status = INTERRUPTED
                break
    if bar is not None:
        bar.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    digests = [weights_digest(encoder)]
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, digests[0])
        digests = [str(d) for d in gathered]
    summary = {
        "status": status,
        "step": step,
        "total_steps": total,
        "elapsed_s": round(elapsed, 2),
        "world_size": world,
        "ddp_backend": str(dist.get_backend()) if distributed else None,
        "device": str(device),
        "precision": str(amp_dtype or "fp32"),
        "target_l0": target_l0,
        "last": last_record,
        "weight_digests": digests,
        "model": mcfg.to_dict(),
    }
    if rank == 0:
        atomic_write_text(run_dir / SUMMARY_FILENAME, json.dumps(summary, indent=2) + "\n")
    return RunResult(status, step, total, run_dir, summary)


__all__ = ["RunResult", "TrainError", "config_diff", "read_run_config", "train"]
