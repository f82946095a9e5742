"""Two-process gloo DDP check: every loss on the gathered batch gives the single-process value and gradient.

The test launches this file twice as a script (ranks 0 and 1); each rank trains nothing, it runs one forward and
backward of a small DDP-wrapped linear model per loss and saves what it saw. The parent computes the same
quantities in one process on the concatenated global batch and compares:
  - loss value on every rank == single-process loss on the global batch;
  - parameter gradients after DDP's averaging == single-process gradients;
  - gradient w.r.t. a rank's local embeddings == world_size * single-process gradient of that slice (the sum
    that gather_with_grad's backward performs; see pretrain/distributed.py for why DDP's average then fixes it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
LOCAL_BATCH = 16
D_IN, D_OUT = 6, 8
LOSS_SEED = 1234
TIMEOUT_S = 120
REPO = Path(__file__).resolve().parents[1]


def make_loss(name: str, seed: int | None = LOSS_SEED) -> torch.nn.Module:
    from pretrain.losses import LeJEPALoss, NTXentLoss, RDMReg, RectifiedLpJEPALoss, VICRegLoss

    if name == "rectified_lpjepa":
        return RectifiedLpJEPALoss(num_projections=64, p=1.0, mu=-0.3, sigma=0.7, seed=seed)
    if name == "rectified_lpjepa_eigen":
        return RectifiedLpJEPALoss(num_projections=64, projection="eigen", seed=seed)
    if name == "rectified_lpjepa_gn_target":
        return RectifiedLpJEPALoss(num_projections=64, rectified_target=False, seed=seed)
    if name == "rdmreg_single_view":
        rdm = RDMReg(64, seed=seed)
        return _SingleView(rdm)
    if name == "lejepa":
        return LeJEPALoss(num_projections=64, seed=seed)
    if name == "vicreg":
        return VICRegLoss()
    if name == "ntxent":
        return NTXentLoss(temperature=0.2)
    raise KeyError(name)


class _SingleView(torch.nn.Module):
    """Exercises RDMReg's own gather (forward(z) without gathered=True)."""

    def __init__(self, rdm: torch.nn.Module) -> None:
        super().__init__()
        self.rdm = rdm

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        value = self.rdm(z1)
        return value, {"loss": float(value.detach())}


LOSSES = (
    "rectified_lpjepa",
    "rectified_lpjepa_eigen",
    "rectified_lpjepa_gn_target",
    "rdmreg_single_view",
    "lejepa",
    "vicreg",
    "ntxent",
)
RECTIFIED = {"rectified_lpjepa", "rectified_lpjepa_eigen", "rdmreg_single_view"}


def global_data() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Both views of the global batch and the model's initial weights, identical in every process."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(WORLD * LOCAL_BATCH, D_IN, generator=g)
    x2 = x1 + 0.3 * torch.randn(WORLD * LOCAL_BATCH, D_IN, generator=g)
    model = torch.nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(D_OUT, D_IN, generator=g))
        model.bias.copy_(0.1 * torch.randn(D_OUT, generator=g))
    return x1, x2, model.state_dict()


def run_step(name: str, model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor, loss: torch.nn.Module):
    """One forward/backward; both views go through ONE model call, as a DDP trainer must do."""
    z = model(torch.cat([x1, x2]))
    if name in RECTIFIED:
        z = torch.relu(z)
    z1, z2 = z.split(x1.shape[0])
    z1.retain_grad()
    z2.retain_grad()
    total, _ = loss(z1, z2)
    total.backward()
    grads = [torch.zeros_like(v) if v.grad is None else v.grad.detach() for v in (z1, z2)]
    return total.detach(), grads[0], grads[1]


def step_record(model: torch.nn.Linear, step: tuple) -> dict[str, torch.Tensor]:
    """What a rank and the single-process reference must agree on after one step: the loss and all gradients."""
    value, g1, g2 = step
    return {
        "loss": value,
        "z1_grad": g1,
        "z2_grad": g2,
        "weight_grad": model.weight.grad.detach().clone(),
        "bias_grad": model.bias.grad.detach().clone(),
    }


def worker(rank: int, port: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pretrain.distributed import shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    clean = False
    try:
        x1, x2, state = global_data()
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for name in LOSSES:
            model = torch.nn.Linear(D_IN, D_OUT)
            model.load_state_dict(state)
            ddp = DDP(model)
            results[name] = step_record(model, run_step(name, ddp, x1[sl], x2[sl], make_loss(name)))
        # Without an explicit seed the ranks' global RNGs differ; the seed broadcast must still align them.
        torch.manual_seed(100 + rank)
        z = torch.relu(torch.randn(LOCAL_BATCH, D_OUT, generator=torch.Generator().manual_seed(rank)))
        unseeded = make_loss("rectified_lpjepa", seed=None)
        results["unseeded"] = [unseeded(z, z)[0].item() for _ in range(2)]
        torch.save(results, out / f"rank{rank}.pt")
        clean = True
    finally:
        shutdown(clean)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_reference() -> dict[str, dict[str, torch.Tensor]]:
    x1, x2, state = global_data()
    ref = {}
    for name in LOSSES:
        model = torch.nn.Linear(D_IN, D_OUT)
        model.load_state_dict(state)
        ref[name] = step_record(model, run_step(name, model, x1, x2, make_loss(name)))
    return ref


@pytest.mark.ddp
def test_losses_under_two_process_ddp_match_single_process(tmp_path):
    port = free_port()
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    if any(name == "lo" for _, name in socket.if_nameindex()):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        torch.set_num_threads(1)
        ref = single_process_reference()  # overlaps with the workers' start-up
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:  # never leave a hung rank behind
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in LOSSES:
        want = ref[name]
        for r, got in enumerate(ranks):
            got = got[name]
            sl = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-5, msg=f"{name} loss")
            for key in ("weight_grad", "bias_grad"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
            for key in ("z1_grad", "z2_grad"):
                torch.testing.assert_close(got[key], WORLD * want[key][sl], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        assert want["weight_grad"].abs().sum() > 0, name  # a zero gradient would make the check vacuous
    assert ranks[0]["unseeded"] == ranks[1]["unseeded"]
    assert ranks[0]["unseeded"][0] != ranks[0]["unseeded"][1]


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
