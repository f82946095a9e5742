"""The pretraining loop, one process on CPU/GPU or one rank of a torchrun/DDP job: the network with its online
probes and the `Trainer` that builds the training objects once and runs the loop.

Checkpoints are written every `checkpoint_every` steps and at the end; SIGINT/SIGTERM finish the current step,
write a checkpoint and stop (exit 130 from the CLI), so an interrupted run resumes and follows the uninterrupted
one exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.loader import Batch, build_batches, default_stats, detect_channels
from data.sources import open_source
from models.config import ModelConfig
from models.encoder import Encoder, build_model
from pretrain.bn_recalibration import recalibrate_batchnorm
from pretrain.config import TrainConfig
from pretrain.methods import Objective, rectifies
from pretrain.metrics_log import MetricsLog
from pretrain.optim import WarmupCosine, build_optimizer
from pretrain.rate_calibration import calibrate_rates
from pretrain.rundir import RunDir, TrainError, TrainState, capture_rng, restore_rng
from pretrain.runtime import Runtime, StopFlag, launch

INTERRUPTED = "interrupted"
COMPLETED = "completed"


class TrainNet(nn.Module):
    """Encoder plus online linear probes, run as ONE forward per step (what DDP requires).

    The probes read detached backbone features and detached codes, so their loss trains only themselves while
    DDP still averages their gradients across ranks.
    """

    def __init__(self, encoder: Encoder, num_classes: int, detach_axis: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.detach_axis = detach_axis
        self.rectified_projector = encoder.config.rectify
        self.num_classes = num_classes
        if num_classes > 0:
            self.probe_feat = nn.Linear(encoder.feature_dim, num_classes)
            self.probe_code = nn.Linear(encoder.embed_dim, num_classes)

    def pre_activation(self, feats: torch.Tensor) -> torch.Tensor:
        """Projector output before its final ReLU (the objective applies the rectification itself)."""
        projector = self.encoder.projector  # an nn.Sequential (models.projector): a slice runs the same layers
        return (projector[:-1] if self.rectified_projector else projector)(feats)

    def forward(
        self, views: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
        """(pre-activations per view, the same from detached backbone features or None, the two probes' logits)."""
        hs: list[torch.Tensor | None] = [None] * len(views)
        hs_axis: list[torch.Tensor | None] = [None] * len(views)
        first_feats: torch.Tensor | None = None
        # Same-size views go through the network as one batch (fewer, larger kernels; BN sees both views).
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            by_size.setdefault(tuple(v.shape[1:]), []).append(i)
        for idx in by_size.values():
            x = torch.cat([views[i] for i in idx]) if len(idx) > 1 else views[idx[0]]
            feats = self.encoder.backbone(x)
            h = self.pre_activation(feats)
            h_axis = self.pre_activation(feats.detach()) if self.detach_axis else None
            n = views[idx[0]].shape[0]
            for k, i in enumerate(idx):
                hs[i] = h[k * n : (k + 1) * n]
                if h_axis is not None:
                    hs_axis[i] = h_axis[k * n : (k + 1) * n]
                if i == 0:
                    first_feats = feats[k * n : (k + 1) * n]
        assert first_feats is not None
        logits_f = logits_c = None
        if self.num_classes > 0:
            logits_f = self.probe_feat(first_feats.detach().float())
            code = F.relu(hs[0]) if self.rectified_projector else hs[0]
            logits_c = self.probe_code(code.detach().float())
        axis = [h for h in hs_axis if h is not None] if self.detach_axis else None
        return [h for h in hs if h is not None], axis, logits_f, logits_c


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
    """The model section's keys that are ModelConfig fields (the rest say how to train), with the method's."""
    m, target = cfg.method, cfg.target
    return ModelConfig(
        **cfg.model.model_dump(include=set(ModelConfig.model_fields)),
        rectify=rectifies(m.name),
        method=m.name,
        target_p=target.p,
        target_mu=target.mu,
        target_sigma=target.sigma,
        target_kind=target.kind,
    )


class Trainer:
    """One run's training objects, built once in the order that fixes the random streams, and its loop."""

    def __init__(self, cfg: TrainConfig, source: Any, rt: Runtime, run: RunDir, seed: int) -> None:
        self.cfg, self.rt, self.run, self.source = cfg, rt, run, source
        try:
            self.mcfg = model_config(cfg)
            encoder = build_model(self.mcfg).to(rt.device)
        except (TypeError, ValueError) as err:  # e.g. an unknown backbone_kwargs key, a ViT patch that does not fit
            raise TrainError(
                f"cannot build the model ({cfg.model.backbone}, {cfg.model.backbone_kwargs}): {err}"
            ) from err
        num_classes = source.num_classes if (cfg.probe.enabled and source.labels is not None) else 0
        self.net = TrainNet(encoder, num_classes, detach_axis=cfg.method.marginal_detach).to(rt.device)
        if cfg.model.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if rt.distributed and cfg.model.sync_bn:
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        self.model: nn.Module = self.net  # the DDP wrapper once `fit` starts
        self.loss_gen = torch.Generator(device=rt.device).manual_seed(seed * 7919 + 17)
        self.objective = Objective(cfg, self.mcfg.target_sigma, self.mcfg.embed_dim, self.loss_gen)
        self.objective.init_projector(self.net.encoder.projector)
        self.optimizer = build_optimizer(cfg.optim, self.net.encoder)
        probe_params = [p for n, p in self.net.named_parameters() if n.startswith("probe_")]
        probe = cfg.probe
        self.probe_opt = (
            torch.optim.AdamW(probe_params, lr=probe.lr, weight_decay=probe.weight_decay) if probe_params else None
        )
        self.optimizers = [self.optimizer] + ([self.probe_opt] if self.probe_opt is not None else [])
        self.scaler = rt.grad_scaler()
        m = self.mcfg
        self.batches = build_batches(cfg, source, m.in_channels, m.mean, m.std, rt.rank, rt.world, rt.device)
        self.total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * self.batches.steps_per_epoch))
        self.schedule = WarmupCosine.from_config(cfg.optim, self.total)
        self.target_l0 = m.expected_l0
        self.start, self.elapsed_before, self.t0 = 0, 0.0, time.perf_counter()
        self.log: MetricsLog | None = None
        self.recalibrated = 0
        self.rate_calibrated: dict = {"images": 0}

    def restore(self, state: TrainState) -> None:
        """Continue from a checkpoint: weights, optimiser moments, the loss's generator and the global RNG."""
        if state.total_steps != self.total:
            raise TrainError(f"cannot resume: the run was planned for {state.total_steps} steps, now {self.total}")
        self.net.load_state_dict({**state.model, **(state.probe or {})}, strict=True)
        self.optimizer.load_state_dict(state.optimizer)
        if self.probe_opt is not None and state.probe_optimizer is not None:
            self.probe_opt.load_state_dict(state.probe_optimizer)
        if state.loss_generator is not None:
            self.loss_gen.set_state(state.loss_generator)
        restore_rng(state.rng)
        self.start, self.elapsed_before = state.step, state.elapsed_s

    def elapsed(self) -> float:
        """Training seconds of the whole run, the time before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def step(self, step: int, batch: Batch) -> float:
        """One optimisation step of the encoder and the probes, counted in the log window; returns its lr."""
        lr = self.schedule.apply(self.optimizer, step)
        views = batch.views
        if self.cfg.model.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with self.rt.autocast():
            hs, hs_axis, logits_f, logits_c = self.model(views)
        self.objective.set_progress(step, self.total)
        axis = [h.float() for h in hs_axis] if hs_axis is not None else None
        loss, parts, zs = self.objective([h.float() for h in hs], self.cfg.augment.global_views, axis)
        labels = batch.labels
        probes = (logits_f, logits_c, labels) if logits_f is not None and labels is not None else None
        if probes is not None:
            loss = loss + (F.cross_entropy(logits_f.float(), labels) + F.cross_entropy(logits_c.float(), labels))
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(f"loss became {parts['loss']} at step {step}; lower optim.lr or use fp32")
        assert self.log is not None
        self.log.add(zs[0], parts, self.cfg.train.batch_size, probes)
        return lr

    def checkpoint(self, step: int) -> None:
        """train_state.pt (everything --resume needs) and model.safetensors (what export reads), on rank 0."""
        if not self.run.writer:
            return
        weights = self.net.state_dict()
        state = TrainState(
            step=step,
            total_steps=self.total,
            model={k: v for k, v in weights.items() if not k.startswith("probe_")},
            optimizer=self.optimizer.state_dict(),
            probe={k: v for k, v in weights.items() if k.startswith("probe_")},
            probe_optimizer=self.probe_opt.state_dict() if self.probe_opt else None,
            loss_generator=self.loss_gen.get_state(),
            rng=capture_rng(),
            config=self.cfg.to_dict(),
            elapsed_s=self.elapsed(),
        )
        extra = {
            "step": step,
            "total_steps": self.total,
            "epoch": step / self.batches.steps_per_epoch,
            "train_config": self.cfg.to_dict(),
            "metrics": self.log.last if self.log else {},
        }
        self.run.save(state, self.net.encoder, extra)

    def fit(self, show: bool) -> RunResult:
        """Step, log and checkpoint up to the planned step, or until a stop signal reaches any rank."""
        train, total = self.cfg.train, self.total
        self.model = self.rt.wrap(self.net)
        self.log = MetricsLog(
            self.run, name=self.cfg.name, start=self.start, total=total, target_l0=self.target_l0, show=show
        )
        self.t0 = time.perf_counter()
        step, status = self.start, COMPLETED
        self.net.train()
        batches = self.batches.iterate(self.start, total)
        with StopFlag() as stop:
            while step < total:
                lr = self.step(step, next(batches))
                step += 1
                stop_now = self.rt.any_rank(stop.requested)
                if step % train.log_every == 0 or step == total or stop_now:
                    self.log.flush(step, step / self.batches.steps_per_epoch, lr, self.elapsed())
                self.log.tick()
                if step == total:
                    self.recalibrate()
                if stop_now or step == total or (train.checkpoint_every and step % train.checkpoint_every == 0):
                    self.checkpoint(step)
                if stop_now and step < total:
                    status = INTERRUPTED
                    break
        self.log.close()
        return self.finish(status, step)

    def recalibrate(self) -> None:
        """Before the last checkpoint (every rank alike): BatchNorm statistics re-estimated on clean train images,
        then the code's per-dimension rates calibrated on clean train images (pretrain/rate_calibration.py)."""
        train = self.cfg.train
        self.recalibrated = recalibrate_batchnorm(
            self.net.encoder,
            self.source,
            self.mcfg,
            images=train.bn_recalibration,
            seed=train.seed,
            batch_size=train.batch_size,
            device=self.rt.device,
        )
        self.rate_calibrated = calibrate_rates(
            self.net.encoder,
            self.source,
            self.mcfg,
            rate=self.target_l0,
            images=train.rate_calibration,
            seed=train.seed,
            batch_size=train.batch_size,
            device=self.rt.device,
        )

    def finish(self, status: str, step: int) -> RunResult:
        """summary.json: how the run ended, where it ran, and every rank's weight digest (equal under DDP)."""
        summary = {
            "status": status,
            "step": step,
            "total_steps": self.total,
            "elapsed_s": round(self.elapsed(), 2),
            **self.rt.describe(),
            "target_l0": self.target_l0,
            "bn_recalibration_images": self.recalibrated,
            "rate_calibration": self.rate_calibrated,
            "last": self.log.last if self.log else {},
            "weight_digests": self.rt.digests(self.net.encoder),
            "model": self.mcfg.to_dict(),
        }
        self.run.write_summary(summary)
        return RunResult(status, step, self.total, self.run.path, summary)


def train(
    cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False, progress: bool | None = None
) -> RunResult:
    """Train (or resume) a run in `run_dir`; returns how it ended. Raises TrainError/DataSpecError/ValueError."""
    with launch(cfg) as rt:
        run = RunDir(run_dir, writer=rt.rank == 0)
        source = open_source(cfg.data.spec)
        cfg = resolve_config(cfg, source)
        replace = run.check(resume, force)
        if resume:
            run.check_resumable(cfg)
        seed = rt.seed(cfg.train.seed)  # before anything draws from torch's global RNG (the initial weights)
        trainer = Trainer(cfg, source, rt, run, seed)
        # Everything that bad input can break has been built: only now touch the run folder (after every rank has
        # checked it, so rank 0 cannot clear files another rank is still looking at).
        rt.barrier()
        run.claim(cfg, None if resume else replace)
        if resume:
            trainer.restore(run.load_state())
            finished = run.finished_summary() if trainer.start >= trainer.total else None
            if finished is not None:  # nothing left to do: keep the finished run's summary
                return RunResult(COMPLETED, trainer.start, trainer.total, run.path, finished)
            run.rewind_logs(trainer.start)
        return trainer.fit(cfg.train.progress if progress is None else progress)
