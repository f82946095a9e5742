"""Offline probes on frozen features: a multinomial logistic-regression probe and a weighted kNN classifier.

Both are written in torch rather than scikit-learn: the project does not depend on sklearn, and a full-batch
L-BFGS on 60k x 512 standardized features takes seconds on a CPU (and runs on a GPU unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KNN_K = 20
# solo-learn's WeightedKNNClassifier and DINO's eval_knn both weight a neighbour's vote by exp(cos / 0.07); the
# published kNN numbers we compare with use it, so we do too.
KNN_TEMPERATURE = 0.07


def _check_xy(name: str, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: features must be 2-D (samples x dims), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    if y is not None and (y.dim() != 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"{name}: labels must be 1-D with one label per sample, got shape {tuple(y.shape)}")
    if y is not None and int(y.min()) < 0:
        raise ValueError(f"{name}: labels must be non-negative class indices")


def standardize(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Z-score every set with the TRAIN mean/std; constant columns keep std 1 so they stay finite (zero)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple((x - mean) / std for x in (train, *others))


@dataclass
class LinearProbeResult:
    accuracy: float
    train_accuracy: float
    loss: float  # final regularised training objective
    iterations: int
    converged: bool


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
) -> LinearProbeResult:
    """Multinomial logistic regression on standardized features, fitted by full-batch L-BFGS.

    The objective is mean cross-entropy + weight_decay/2 * ||W||^2 (bias not decayed): strictly convex, so the
    result does not depend on the start point, and the small decay keeps the weights finite on separable data.
    It runs in float64: float32 rounding noise in the loss stalls the strong-Wolfe line search near the optimum.
    torch.optim.LBFGS rather than scipy's L-BFGS-B: scipy's per-iteration work goes through multi-threaded
    OpenBLAS calls on 650-element vectors, which were 4x slower than the whole torch step on a busy 2-core box.
    """
    _check_xy("linear probe (train)", train_x, train_y)
    _check_xy("linear probe (test)", test_x, test_y)
    if test_x.shape[1] != train_x.shape[1]:
        raise ValueError("linear probe: train and test features differ in dimension")
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    xtr, xte = standardize(train_x.double(), test_x.double().to(train_x.device))
    ytr, yte = train_y.long().to(xtr.device), test_y.long().to(xtr.device)
    weight = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, device=xtr.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=xtr.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return F.cross_entropy(xtr @ weight + bias, ytr) + 0.5 * weight_decay * weight.square().sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))
    with torch.no_grad():
        loss = objective().item()
        train_acc = ((xtr @ weight + bias).argmax(1) == ytr).double().mean().item()
        test_acc = ((xte @ weight + bias).argmax(1) == yte).double().mean().item()
    return LinearProbeResult(
        accuracy=test_acc, train_accuracy=train_acc, loss=loss, iterations=iterations, converged=iterations < max_iter
    )


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Predicted class of each test row by cosine kNN with votes weighted by exp(similarity / temperature).

    Features are L2-normalised, so a dot product is the cosine similarity (an all-zero row, possible with
    rectified codes, stays zero and is similar to nothing). Test rows are processed in chunks so the
    similarity matrix never holds more than chunk_size x n_train entries (default: about 16M, 64 MB);
    torch.topk picks the neighbours.
    Class scores are sum over the k neighbours of exp(s / T) for the neighbour's class; ties go to the lower
    class index.
    """
    _check_xy("kNN (train)", train_x, train_y)
    _check_xy("kNN (test)", test_x)
    if k < 1:
        raise ValueError(f"kNN: k must be positive, got {k}")
    if temperature <= 0:
        raise ValueError(f"kNN: temperature must be positive, got {temperature}")
    if num_classes is None:
        num_classes = int(train_y.max()) + 1
    k = min(k, train_x.shape[0])
    if chunk_size is None:
        chunk_size = max(1, min(4096, (1 << 24) // train_x.shape[0]))
    train_n = F.normalize(train_x.float(), dim=1)
    test_n = F.normalize(test_x.float(), dim=1).to(train_n.device)
    labels = train_y.long().to(train_n.device)
    preds = []
    for start in range(0, test_n.shape[0], chunk_size):
        sims = test_n[start : start + chunk_size] @ train_n.T
        top_sim, top_idx = sims.topk(k, dim=1, largest=True, sorted=True)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=torch.float64)
        votes.scatter_add_(1, labels[top_idx], (top_sim.double() / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).cpu()


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
) -> float:
    _check_xy("kNN (test)", test_x, test_y)
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)
    return (pred == test_y.long().cpu()).double().mean().item()
