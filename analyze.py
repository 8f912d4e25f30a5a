"""
analyze: why on-policy distillation (OPD) updates lock into a low-rank subspace from the first
steps, shown on a quadratic toy; and the same geometry measured on the checkpoints of effopd.py
runs and on any two checkpoints (a base model and its tuned release), after the EffOPD paper
("Learning to Foresee", arXiv 2605.11739) and paper 2 ("On the Geometry of On-Policy
Distillation", arXiv 2606.07082).

The toy. Linearize the student around the base model: one weight matrix dW (m x n, here
m = n = --dim) maps an input x to a change of output dW x, and OPD asks that change to match the
teacher-base residual r(x) = R x, with R of rank k (--rank):

    L(dW) = 1/2 E ||dW x - r(x)||^2 = 1/2 tr((dW - R) Sigma (dW - R)^T),   x ~ N(0, Sigma)
    grad L = dW Sigma - C,   with Sigma = E[x x^T] and C = E[r(x) x^T] = R Sigma

Gradient descent from dW_0 = 0 with step eta has the closed form

    dW_t = C Sigma^-1 (I - (I - eta Sigma)^t)

so for t >= 1 the column space of dW_t is exactly that of C: rank(dW_t) <= rank(C) = k at every t,
and the top-k left singular subspace of the final update is already in place at step 1; later
steps only change how much of it is filled (the singular values and the right singular vectors).
The RL-like run solves the same problem from a reward that only says better or worse: for each
input the student samples two answers, mean +- noise, and moves its mean toward the one closer to
the teacher (GRPO with groups of two and a 0/1 reward). Its mean step is proportional to

    -(dW - R) E[x x^T / ||(dW - R) x||]

and so lies in the column space of the current error, like the OPD step (from 0: in that of C);
but every sample also pushes dW along its own random noise, in all m output directions. The
update is high-rank, and the final subspace emerges only as the signal outgrows the noise.

What is printed: the loss (L(0) = 1 by construction, optimum 0), the update_metrics of dW_t and its
subspace_alignment with dW_T (top-k, k = --rank) at 1%, 10%, 50% and 100% of training, both computed
with the functions of effopd.py; the largest deviation of the simulated OPD trajectory from the
closed form; and the steps EffOPD (effopd_extrapolate, scored on held-out inputs) needs to reach
plain gradient descent's final loss. Simplifications: the exact population gradient for OPD (no
sampling noise at all), float64 throughout, a Gaussian input distribution.

The geometry, one pipeline for both reports: dW = W_tuned - W_base of every 2-D attention and MLP
matrix, read one tensor of each checkpoint at a time (safetensors.safe_open: memory grows with the
largest matrix, not the model; --device cuda runs the SVDs on a GPU): update_metrics (the EffOPD
paper's Table 1), ||dW||_F, and paper 2's share of bf16 weights left unchanged, principal overlap
(the share of ||dW||_F^2 inside the base weight's top-k singular subspaces, k = ceil(f min(m, n)),
f = --principal-frac; a random dW: k^2 / (m n)) and principal rotation; ||dW||_F of the others.

Run folders (python analyze.py RUN_DIR [RUN_DIR ...]), side by side, dW_t = W_t - W_0 from their
checkpoints: the means over matrices of the final dW_T, the top-k subspace_alignment and the
effective rank (rank dynamics) of every dW_t, and ||dW_T||_F by module type and layer. With
--interventions, each scored by the run's greedy validation accuracy: scaling (W_0 + alpha dW_T),
norm scaling (the checkpoint nearest 10% of training, each parameter's update rescaled to the
final update's norm), sliding windows (dW_T on one block of layers) and the EffOPD paper's Fig. 4
(each matrix's top-k or bottom-k singular part of dW_T, rescaled to ||dW_T||_F, on W_0).

Any two checkpoints (python analyze.py --base BASE TUNED [TUNED ...] [--json PATH]): public models
(hub names, folders or .safetensors files, sharded or not), each TUNED a column: means, by module
type and by layer, and the embeddings' ||dW||_F (a differently padded vocabulary cut to the
common rows). Tables to the terminal, figures to PNG.

Run:
    python analyze.py                    # the toy: a table and runs/toy.png, seconds on a CPU
    python analyze.py RUN_DIR [RUN_DIR]  # checkpoint-geometry report of effopd.py runs
    python analyze.py --base BASE TUNED --json geometry.json   # any two checkpoints
    python analyze.py --curves RUN_DIR [RUN_DIR]  # training curves, also of a run still going
"""
import argparse
import fcntl
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from effopd import (ATTENTION, PROJECT, OneLineErrors, UserError, accuracy, check_device,
                    checkpoint_files, effopd_extrapolate, eos_ids, is_attention_or_mlp,
                    is_power_of_two, kept_multiple, load_jsonl, open_safetensors, read_json,
                    principal_overlap, principal_rotation, singular_part, subspace_alignment,
                    top_singular_subspaces, unchanged_fraction, update_metrics, write_atomically)

# ------------------------------------------------------------------------------------------------
# The quadratic toy: problem, OPD by gradient descent, its closed form, and an RL-like run


def population_loss(delta: torch.Tensor, sigma: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """L(dW) = 1/2 E ||dW x - R x||^2 = 1/2 tr((dW - R) Sigma (dW - R)^T), exactly (0-dim)."""
    error = delta - r  # (m, n)
    return 0.5 * (error @ sigma * error).sum()


def make_problem(dim: int, rank: int, cond: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input covariance Sigma (dim, dim) with eigenvalues 1 ... 1/cond, log-spaced, in a random
    orthonormal basis; residual map R (dim, dim) of the given rank, scaled so that L(0) = 1."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -math.log10(cond), dim, dtype=torch.float64)  # 1 ... 1/cond
    sigma = basis @ torch.diag(eigenvalues) @ basis.T
    sigma = (sigma + sigma.T) / 2  # exactly symmetric, for the Cholesky factor of the RL inputs
    r = (torch.randn(dim, rank, generator=g, dtype=torch.float64)
         @ torch.randn(rank, dim, generator=g, dtype=torch.float64))  # rank k
    return sigma, r / population_loss(torch.zeros_like(r), sigma, r).sqrt()


def train_opd(sigma: torch.Tensor, r: torch.Tensor, steps: int, lr: float, score_fn=None,
              max_candidates: int = 5) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Gradient descent on the population OPD loss from dW_0 = 0: dW <- dW - lr (dW Sigma - C).

    With score_fn (model -> float, higher is better) this is EffOPD: after the step at t = 1, 2,
    4, 8, ... effopd_extrapolate moves dW along dW - anchor, as effopd.train does. Returns
    [dW_0, ..., dW_T] and the ladder effopd_extrapolate returned at each trigger.
    """
    c = r @ sigma  # (m, n): E[r(x) x^T]
    student = torch.nn.Linear(r.shape[1], r.shape[0], bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(student.weight)  # weight (m, n) is dW: the student starts at the base
    anchor = {"weight": student.weight.detach().clone()}  # EffOPD's B: the initial student
    deltas, ladders = [student.weight.detach().clone()], []
    for step in range(1, steps + 1):
        with torch.no_grad():
            student.weight -= lr * (student.weight @ sigma - c)
        if score_fn is not None and is_power_of_two(step):
            ladders.append(effopd_extrapolate(student, anchor, score_fn, max_candidates))
        deltas.append(student.weight.detach().clone())
    return deltas, ladders


def opd_closed_form(sigma: torch.Tensor, r: torch.Tensor, lr: float, step: int) -> torch.Tensor:
    """dW_t = C Sigma^-1 (I - (I - lr Sigma)^t), through Sigma = Q diag(lam) Q^T: (m, n)."""
    lam, q = torch.linalg.eigh(sigma)
    return (r @ sigma) @ q @ torch.diag((1 - (1 - lr * lam) ** step) / lam) @ q.T


def train_rl(sigma: torch.Tensor, r: torch.Tensor, steps: int, lr: float, samples: int,
             seed: int) -> list[torch.Tensor]:
    """The same problem from a better-or-worse reward; returns [dW_0, ..., dW_T].

    Per step, `samples` inputs x; per input two answers mean +- noise, mean = dW x. The one closer
    to r(x) wins (advantage +1, the other -1) and dW moves by the Gaussian policy gradient, toward
    the winner: lr * sign * noise x^T. Given x, E[sign * noise] = -sqrt(2/pi) e / ||e||, with
    e = dW x - r(x): on average the per-input OPD gradient e x^T, normalized. The noise scale
    cancels in the comparison and would only rescale lr, so it is 1.
    """
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(sigma)  # x = chol z has covariance Sigma
    delta = torch.zeros_like(r)  # (m, n)
    deltas = [delta]
    for _ in range(steps):
        x = torch.randn(samples, r.shape[1], generator=g, dtype=torch.float64) @ chol.T  # (S, n)
        target = x @ r.T  # (S, m): the teacher's residual r(x)
        mean = x @ delta.T  # (S, m): the student's answer before exploration
        noise = torch.randn(samples, r.shape[0], generator=g, dtype=torch.float64)  # (S, m)
        plus_wins = ((mean - noise - target).square().sum(1)
                     > (mean + noise - target).square().sum(1))  # (S,): the only feedback
        sign = plus_wins.double() * 2 - 1  # (S,): +1 if mean + noise was the better answer
        delta = delta + lr * (sign[:, None] * noise).T @ x / samples  # (m, n)
        deltas.append(delta)
    return deltas


def first_step_at_or_below(losses: list[float], target: float) -> int | None:
    """The first step t with losses[t] <= target, None if none."""
    return next((t for t, loss in enumerate(losses) if loss <= target), None)


def geometry(deltas: list[torch.Tensor], sigma: torch.Tensor, r: torch.Tensor,
             k: int) -> dict[str, list[float]]:
    """Per step t = 1..T: loss, update_metrics of dW_t and its top-k alignment with dW_T."""
    rows = {"loss": [], "effective_rank": [], "spectral_ratio": [], "top1_ratio": [],
            "alignment": []}
    for delta in deltas[1:]:
        metrics = update_metrics(delta)
        metrics["loss"] = population_loss(delta, sigma, r).item()
        metrics["alignment"] = subspace_alignment(delta, deltas[-1], k)
        for key, values in rows.items():
            values.append(metrics[key])
    return rows


# ------------------------------------------------------------------------------------------------
# Output: table and figure


def print_table(runs: dict[str, dict[str, list[float]]], fractions=(0.01, 0.1, 0.5, 1.0)) -> None:
    """One row per run and fraction of training: loss and the update geometry of dW_t."""
    print(f"{'run':<8} {'step':>11} | {'loss':>7} | {'eff. rank':>9} | {'s1/|dW|F':>8} | "
          f"{'top-1%':>7} | {'align dW_T':>10}")
    for name, rows in runs.items():
        steps = len(rows["loss"])
        for f in fractions:
            t = max(1, round(f * steps))
            i = t - 1  # rows start at step 1
            print(f"{name:<8} {t:>4} ({f:>4.0%}) | {rows['loss'][i]:7.4f} | "
                  f"{rows['effective_rank'][i]:9.1f} | {rows['spectral_ratio'][i]:8.3f} | "
                  f"{rows['top1_ratio'][i]:7.3f} | {rows['alignment'][i]:10.3f}")


def plot(runs: dict[str, dict[str, list[float]]], effopd_losses: list[float], rank: int, dim: int,
         path: str) -> None:
    """Three panels over steps: alignment with dW_T, effective rank, loss (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("alignment", f"alignment of top-{rank} subspace with dW_T"),
              ("effective_rank", "effective rank of dW_t"), ("loss", "loss L(dW_t)"))
    for ax, (key, title) in zip(axes, panels):
        for name, rows in runs.items():
            ax.plot(range(1, len(rows[key]) + 1), rows[key], label=name)
        ax.set(title=title, xlabel="step", xscale="log")
    axes[0].axhline(rank / dim, color="gray", ls=":", label=f"random pair (k/m = {rank / dim:.2f})")
    axes[1].axhline(rank, color="gray", ls=":", label=f"rank(C) = {rank}")
    axes[2].plot(range(1, len(effopd_losses)), effopd_losses[1:], "--", label="OPD + EffOPD")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The toy, end to end


def run_toy(args: argparse.Namespace) -> dict:
    """Train OPD, RL-like and EffOPD on one problem; print the checks and the table; save the
    figure. Returns the numbers it printed."""
    t0 = time.time()
    sigma, r = make_problem(args.dim, args.rank, args.cond, args.seed)
    print(f"toy: dW {args.dim}x{args.dim}, rank(C) = {args.rank}, cond(Sigma) = {args.cond:g}, "
          f"{args.steps} steps | OPD: gradient descent, lr {args.lr:g} | RL-like: "
          f"{args.rl_samples} better-or-worse comparisons per step, lr {args.rl_lr:g}")

    # 1. OPD: exact gradient descent, checked against its closed form at every step.
    opd = train_opd(sigma, r, args.steps, args.lr)[0]
    deviation = max((d - opd_closed_form(sigma, r, args.lr, t)).abs().max().item()
                    for t, d in enumerate(opd))
    max_rank = max(torch.linalg.matrix_rank(d).item() for d in opd)
    print(f"closed form dW_t = C Sigma^-1 (I - (I - lr Sigma)^t): largest deviation "
          f"{deviation:.1e} over all t and entries (largest entry of dW_T: "
          f"{opd[-1].abs().max().item():.3f}); max over t of rank(dW_t): {max_rank}")

    # 2. RL-like on the same problem, and the geometry of both.
    rl = train_rl(sigma, r, args.steps, args.rl_lr, args.rl_samples, args.seed + 1)
    runs = {"OPD": geometry(opd, sigma, r, args.rank), "RL-like": geometry(rl, sigma, r, args.rank)}
    print_table(runs)

    # 3. EffOPD: the same gradient descent, extrapolated at t = 1, 2, 4, ..., accepted when the loss
    # on a fixed held-out sample of inputs improves (like the paper's 50 validation prompts); the
    # reported loss is the exact population loss.
    g = torch.Generator().manual_seed(args.seed + 2)
    x_val = (torch.randn(args.val_size, args.dim, generator=g, dtype=torch.float64)
             @ torch.linalg.cholesky(sigma).T)  # (V, n)
    r_val = x_val @ r.T  # (V, m)

    @torch.no_grad()
    def score(model) -> float:  # minus the held-out loss
        return -0.5 * (model(x_val) - r_val).square().sum(1).mean().item()

    effopd, ladders = train_opd(sigma, r, args.steps, args.lr, score_fn=score)
    effopd_losses = [population_loss(d, sigma, r).item() for d in effopd]
    opd_losses = [population_loss(d, sigma, r).item() for d in opd]  # index = step
    target = opd_losses[-1]
    steps_opd = first_step_at_or_below(opd_losses, target)
    steps_effopd = first_step_at_or_below(effopd_losses, target)
    kept = " ".join(str(kept_multiple(ladder)) for ladder in ladders)
    print(f"final loss: OPD {target:.4f} | RL-like {runs['RL-like']['loss'][-1]:.4f} | "
          f"OPD + EffOPD {effopd_losses[-1]:.4f}")
    print(f"EffOPD kept W_t + m (W_t - B) with m = {kept} at t = 1, 2, 4, ... "
          f"({sum(map(len, ladders))} held-out evaluations of {args.val_size} inputs)")
    print(f"steps to reach OPD's final loss {target:.4f}: OPD {steps_opd} | OPD + EffOPD "
          f"{steps_effopd}")

    plot(runs, effopd_losses, args.rank, args.dim, args.png)
    print(f"figure: {args.png} | {time.time() - t0:.1f} s")
    return {"deviation": deviation, "max_rank": max_rank, "runs": runs, "steps_opd": steps_opd,
            "steps_effopd": steps_effopd, "effopd_losses": effopd_losses}


# ------------------------------------------------------------------------------------------------
# Update geometry: dW = W_tuned - W_base, streamed one tensor of each checkpoint at a time


def module_type(name: str) -> str:
    """attention, mlp (effopd.is_attention_or_mlp), norm, or embedding (token embedding, head)."""
    if is_attention_or_mlp(name):
        return "attention" if any(s in name for s in ATTENTION) else "mlp"
    return "norm" if any("norm" in p or p.startswith("ln") for p in name.split(".")) \
        else "embedding"


def is_geometry_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D attention or MLP weight (effopd.is_attention_or_mlp): the matrices whose dW the
    geometry measures; every other tensor gets its ||dW||_F only."""
    return len(shape) == 2 and is_attention_or_mlp(name)


def layer_of(name: str) -> int | None:
    """The decoder layer of a parameter: model.layers.N. (Qwen, Llama, GPT-NeoX) or h.N. (GPT-2,
    Falcon); None outside the layers."""
    match = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def tensor_shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor, from the safetensors headers alone (nothing is read)."""
    shapes = {}
    for file in sorted(set(files.values())):
        if not os.path.isfile(file):
            raise UserError(f"{file}: not found (listed in the checkpoint's index)")
        with open_safetensors(file) as f:
            shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()
                           if files.get(n) == file})
    return shapes


def read_tensor(files: dict[str, str], name: str, device: str, rows: slice | None = None
                ) -> torch.Tensor:
    """One tensor (or a block of its rows) in its stored dtype, refused unless it is floating
    point and finite; the file is closed after it."""
    with open_safetensors(files[name]) as f:
        tensor = f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
    tensor = tensor.to(device)
    if not tensor.is_floating_point():
        raise UserError(f"{files[name]}: {name} is stored as {tensor.dtype}; expected "
                        f"floating-point weights")
    if not torch.isfinite(tensor).all():
        raise UserError(f"{files[name]}: {name} holds NaN or inf")
    return tensor


def pair_tensors(base: str, tuned: str, base_shapes: dict, tuned_shapes: dict) -> dict[str, int]:
    """Tensor name -> rows to compare. The 2-D attention, MLP and embedding tensors must have the
    same names and shapes in both checkpoints, else a one-line refusal, except that an embedding
    or output head with a different padding of the vocabulary is cut to the common rows, as in
    training. Every other tensor that both hold, in one shape, is compared too."""
    def matrices(shapes: dict) -> set[str]:
        return {n for n, s in shapes.items()
                if len(s) == 2 and module_type(n) in ("attention", "mlp", "embedding")}
    names, other = matrices(base_shapes), matrices(tuned_shapes)
    for a, b, missing in ((base, tuned, sorted(names - other)),
                          (tuned, base, sorted(other - names))):
        if missing:
            raise UserError(f"{b} lacks {len(missing)} matrices of {a}, e.g. {missing[0]}")
    rows = {}
    for n in sorted(names):
        (m1, n1), (m2, n2) = base_shapes[n], tuned_shapes[n]
        vocab_padding = module_type(n) == "embedding" and n1 == n2
        if (m1, n1) != (m2, n2) and not vocab_padding:
            raise UserError(f"{n}: shape {(m1, n1)} in {base}, {(m2, n2)} in {tuned}")
        rows[n] = min(m1, m2)
    return {**rows, **{n: s[0] for n, s in base_shapes.items()
                       if n not in rows and s and tuned_shapes.get(n) == s}}


def difference_norm(base_files: dict, tuned_files: dict, name: str, rows: int, device: str,
                    block: int = 4096) -> float:
    """||W_tuned - W_base||_F over the first `rows` rows, a block of rows at a time."""
    total = 0.0
    for i in range(0, rows, block):
        block_rows = slice(i, min(rows, i + block))
        delta = read_tensor(tuned_files, name, device, block_rows).float()  # (block, ...)
        delta -= read_tensor(base_files, name, device, block_rows).float()
        total += torch.linalg.vector_norm(delta).item() ** 2
    if not math.isfinite(total):
        raise overflowed(tuned_files[name], name)
    return math.sqrt(total)


def overflowed(file: str, name: str) -> UserError:
    """The refusal of an update whose norm overflows fp32: every metric of it would be noise."""
    return UserError(f"{file}: {name}: ||W_tuned - W_base||_F overflows float32 (a diverged "
                     f"checkpoint?)")


def principal_k(shape: tuple[int, int], fraction: float) -> int:
    """The k of the principal subspaces: ceil(fraction * min(m, n)), at least 1."""
    return max(1, math.ceil(fraction * min(shape)))


def matrix_geometry(w_base: torch.Tensor, w_tuned: torch.Tensor, k: int,
                    base_subspaces: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> dict[str, float]:
    """Every metric of one matrix pair: update_metrics of dW = W_tuned - W_base (fp32), its
    Frobenius norm, the share of bf16 entries unchanged, the top-k principal overlap with its
    random-matrix value k^2 / (m n), and the principal rotation."""
    base, tuned = w_base.float(), w_tuned.float()
    delta = tuned - base  # (m, n), in fp32 even for bf16 checkpoints
    m, n = delta.shape
    return {**update_metrics(delta), "frobenius_norm": delta.norm().item(),
            "unchanged_bf16": unchanged_fraction(w_base, w_tuned),
            "principal_overlap": principal_overlap(base, delta, k, base_subspaces),
            "overlap_random": k * k / (m * n),
            "principal_rotation": principal_rotation(base, tuned, k, base_subspaces)}


# the rows of the geometry tables, in order
METRICS = ("spectral_norm", "spectral_ratio", "effective_rank", "top1_ratio", "unchanged_bf16",
           "principal_overlap", "overlap_random", "principal_rotation", "frobenius_norm")


def checkpoint_geometry(base: str, tuned: dict, fraction: float, device: str, threads: int = 1,
                        align_k: int | None = None) -> dict:
    """For each tuned checkpoint (label -> path), dW = W_tuned - W_base: "matrices", the
    matrix_geometry of every 2-D attention and MLP matrix, with k = principal_k(fraction);
    "norms", {"frobenius_norm": ||dW||_F, "rows"} of every other tensor. With align_k, each
    matrix also gets "alignment": subspace_alignment(dW, dW_last, min(align_k, m, n)), dW_last
    the update of the last tuned checkpoint.

    Every pair is checked before any work; then each worker holds one base matrix and one tuned
    matrix at a time (and dW_last), and the base matrix's top-k singular subspaces are computed
    once for all tuned checkpoints. On a CPU, `threads` is split between two workers: two
    one-thread workers beat one two-thread worker by ~15% on 2 cores (LAPACK's eigh and SVD
    scale poorly across threads, and torch releases the GIL inside them)."""
    base_files = checkpoint_files(base)
    files = {label: checkpoint_files(path) for label, path in tuned.items()}
    base_shapes = tensor_shapes(base_files)
    rows = {label: pair_tensors(base, tuned[label], base_shapes, tensor_shapes(f))
            for label, f in files.items()}
    order = lambda n: (layer_of(n) is not None, layer_of(n) or 0, n)  # noqa: E731
    last = list(tuned)[-1]  # its matrices are the base's, like every tuned checkpoint's
    matrices = sorted((n for n in rows[last] if is_geometry_matrix(n, base_shapes[n])), key=order)
    out = {label: {"matrices": {}, "norms": {}} for label in tuned}
    for label in tuned:
        for name in sorted(set(rows[label]) - set(matrices), key=order):
            out[label]["norms"][name] = {"rows": rows[label][name], "frobenius_norm":
                                         difference_norm(base_files, files[label], name,
                                                         rows[label][name], device)}

    def one_matrix(name: str) -> dict[str, dict[str, float]]:  # label -> matrix_geometry
        w_base = read_tensor(base_files, name, device).float()  # (m, n); bf16 -> fp32 is exact
        k = principal_k(w_base.shape, fraction)
        subspaces = top_singular_subspaces(w_base, k)
        d_last = read_tensor(files[last], name, device).float() - w_base if align_k else None
        result = {}
        for label in tuned:
            w_tuned = read_tensor(files[label], name, device).float()
            if not torch.isfinite((w_tuned - w_base).norm()):
                raise overflowed(files[label][name], name)
            result[label] = matrix_geometry(w_base, w_tuned, k, subspaces)
            if align_k:
                result[label]["alignment"] = subspace_alignment(
                    w_tuned - w_base, d_last, min(align_k, *w_base.shape))
        return result

    workers = min(2, threads) if device == "cpu" else 1  # one GPU: one matrix at a time
    previous, t0 = torch.get_num_threads(), time.time()
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers) as pool:
            for i, (name, result) in enumerate(zip(matrices, pool.map(one_matrix, matrices))):
                for label, row in result.items():
                    out[label]["matrices"][name] = row
                if sys.stderr.isatty():  # progress, on a terminal only
                    print(f"\r{i + 1}/{len(matrices)} matrices | {time.time() - t0:.0f} s",
                          end="", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(previous)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return out


def nanmean(values) -> float:
    """Mean of the numbers that are not NaN (a zero update has NaN ratios); NaN if none."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def means(matrices: dict[str, dict], keep=lambda name: True) -> dict[str, float]:
    """nanmean of every metric over the matrices whose name passes keep."""
    return {key: nanmean(r[key] for n, r in matrices.items() if keep(n)) for key in METRICS}


def norms_by_module(norms: dict[str, float]) -> dict[tuple[str, int | None], float]:
    """||dW||_F per (module type, layer) from name -> ||dW||_F: the norms in it added in
    quadrature, sqrt(sum ||dW_i||_F^2)."""
    out = {}
    for name, norm in norms.items():
        key = (module_type(name), layer_of(name))
        out[key] = math.hypot(out.get(key, 0.0), norm)
    return out


def print_rows(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  " + " | ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def print_means(title: str, columns: dict[str, dict[str, float]]) -> None:
    """One row per metric of METRICS, one column per label (its means over matrices)."""
    print_rows(title, ["metric", *columns],
               [[key, *(f"{c[key]:.4g}" for c in columns.values())] for key in METRICS])


# ------------------------------------------------------------------------------------------------
# The run report: dW_t = W_t - W_0 in a run folder written by effopd.py


def load_run(run_dir: str) -> tuple[dict, dict[int, str]]:
    """The run's config.json and its checkpoint folders by step; step 0 (W_0) must be there."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{config_path}: not found (is {run_dir} a run folder written by "
                        f"effopd.py?)")
    checkpoints = {int(d[5:]): os.path.join(run_dir, d) for d in os.listdir(run_dir)
                   if re.fullmatch(r"step_\d{6}", d)}
    if 0 not in checkpoints or len(checkpoints) < 2:
        raise UserError(f"{run_dir}: needs step_000000 and a later checkpoint, "
                        f"found {sorted(checkpoints)}")
    if is_held(run_dir):
        print(f"warning: {run_dir} is still being written by a running effopd.py; the report "
              f"covers its checkpoints saved so far, up to step {max(checkpoints)}",
              file=sys.stderr)
    return read_json(config_path), checkpoints


def is_held(run_dir: str) -> bool:
    """Whether a running effopd.py holds the run folder's lock (run_dir/.lock, never followed
    through a link); asked without waiting, and let go at once."""
    try:
        fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file: no run has held it
        return False
    with open(fd) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def validation_set(run_dir: str, config: dict) -> list[dict]:
    """The records --interventions scores a run with: the first --val-size of its --val file
    (runs of older versions saved it relative to the project). Refused in one line if bad."""
    need = ("val", "val_size", "max_new_tokens", "eval_batch_size")
    if not all(key in config for key in need):
        raise UserError(f"{os.path.join(run_dir, 'config.json')}: --interventions needs its "
                        f"{', '.join(need)}")
    path = config["val"] if os.path.isabs(config["val"]) else os.path.join(PROJECT, config["val"])
    try:
        return load_jsonl(path)[:config["val_size"]]
    except UserError as e:
        raise UserError(f"{e} (the validation file of {run_dir}, for --interventions)") from None


def run_geometry(run_dir: str, fraction: float, k: int, device: str, threads: int = 1) -> dict:
    """checkpoint_geometry of W_0 and every later checkpoint W_t of one run: the matrices and
    their means ("geometry") for the final dW_T, ||dW_T||_F by (module type, layer), and per step
    t the means over matrices of subspace_alignment(dW_t, dW_T, k) and of the effective rank."""
    config, checkpoints = load_run(run_dir)
    final = max(checkpoints)
    later = {step: path for step, path in sorted(checkpoints.items()) if step > 0}  # final last
    out = checkpoint_geometry(checkpoints[0], later, fraction, device, threads, align_k=k)
    matrices = out[final]["matrices"]
    norms = {n: r["frobenius_norm"] for part in out[final].values() for n, r in part.items()}
    return dict(dir=run_dir, config=config, checkpoints=checkpoints, final=final,
                matrices=matrices, geometry=means(matrices), norms=norms_by_module(norms),
                alignment={s: nanmean(r["alignment"] for r in out[s]["matrices"].values())
                           for s in later},
                rank={s: nanmean(r["effective_rank"] for r in out[s]["matrices"].values())
                      for s in later})


def report(run_dirs: list[str], args) -> dict[str, dict]:
    """Print (and plot) the geometry of each run; return run_geometry by run name, for bench.py.
    Every run folder's config.json, the validation files of --interventions and every output
    file are checked before any work."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    loaded = [load_run(d) for d in run_dirs]  # every run folder, before the first's work
    val_sets = [validation_set(d, c) for d, (c, _) in zip(run_dirs, loaded) if args.interventions]
    for name, (_, checkpoints) in zip(names, loaded):  # the model's own config.json
        model = os.path.join(checkpoints[0], "config.json")
        layers = read_json(model).get("num_hidden_layers") if os.path.isfile(model) else None
        if args.interventions and layers and args.window > layers:
            raise UserError(f"--window {args.window}: {name} has only {layers} layers")
    figure = args.png or os.path.join(run_dirs[0], "report.png")
    figures = [os.path.join(os.path.dirname(args.png) if args.png else d, f"interventions-{n}.png")
               for n, d in zip(names, run_dirs) if args.interventions]
    check_outputs(args, [figure, *figures])
    runs = {n: run_geometry(d, args.principal_frac, args.k, args.device,
                            args.threads or os.cpu_count() or 1) for n, d in zip(names, run_dirs)}
    print_means("Update geometry of W_T - W_0, mean over attention and MLP matrices "
                f"(paper, Table 1; paper 2: unchanged, principal top-{args.principal_frac:.0%})",
                {n: runs[n]["geometry"] for n in names})
    steps = sorted(set().union(*(runs[n]["alignment"] for n in names)))
    for key, fmt, title in (
            ("alignment", ".3f", f"Alignment of dW_t with the final dW_T (top-{args.k} left "
                                 "singular subspaces)"),
            ("rank", ".2f", "Rank dynamics: effective rank of dW_t, mean over attention and MLP "
                            "matrices")):
        print_rows(title, ["step", *names],
                   [[s, *(format(runs[n][key][s], fmt) if s in runs[n][key] else "-"
                          for n in names)] for s in steps])
    for n in names:
        norms = runs[n]["norms"]
        layers = sorted({layer for _, layer in norms if layer is not None})
        embedding = norms.get(("embedding", None), 0.0)
        print_rows(f"{n}: ||dW_T||_F by module (embedding: {embedding:.4g})",
                   ["layer", "attention", "mlp"],
                   [[layer, f"{norms.get(('attention', layer), 0):.4g}",
                     f"{norms.get(('mlp', layer), 0):.4g}"] for layer in layers])
    plot_report(runs, figure)
    for n, val, png in zip(names, val_sets, figures):  # none without --interventions
        runs[n]["interventions"] = interventions(n, runs[n], val, png, args)
    if args.json:  # every run's numbers; norms by "attention.3", "mlp.3", "embedding", ...
        write_json(args.json, {n: {**run, "norms": {
            kind if layer is None else f"{kind}.{layer}": v for (kind, layer), v in
            run["norms"].items()}} for n, run in runs.items()})
    return runs


def interventions(name: str, run: dict, val: list[dict], png: str, args) -> dict:
    """The paper's interventions on W_0 + (a transformed dW), each scored by the run's validation
    accuracy (greedy) on val: scaling, norm scaling of an early checkpoint, sliding layer windows;
    the figure to png."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config, checkpoints = run["config"], run["checkpoints"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float32).to(device)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()  # as effopd.train decides
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[0])
    eos = eos_ids(tokenizer, model)
    params = dict(model.named_parameters())
    n_layers = 1 + max(layer_of(n) for n in params if layer_of(n) is not None)

    def weights(step: int) -> dict[str, torch.Tensor]:  # the parameters of W_step, fp32
        files = checkpoint_files(checkpoints[step])
        return {n: read_tensor(files, n, device).float() for n in params}

    w0, wT = weights(0), weights(run["final"])

    @torch.no_grad()
    def score(delta: dict[str, torch.Tensor]) -> float:  # validation accuracy of W_0 + delta
        for n, p in params.items():
            p.copy_(w0[n] + delta[n] if n in delta else w0[n])
        with autocast:
            return accuracy(model, tokenizer, val, config["max_new_tokens"], eos,
                            config["eval_batch_size"])

    d_final = {n: wT[n] - w0[n] for n in params}
    acc0, accT = score({}), score(d_final)
    scaling = [(a, score({n: a * d for n, d in d_final.items()})) for a in args.alphas]
    print_rows(f"{name}: scaling, W_0 + alpha dW_T (validation accuracy)", ["alpha", "val acc"],
               [[f"{a:g}", f"{acc:.3f}"] for a, acc in scaling])
    # norm scaling: an early update, each module's rescaled to the final update's norm
    early = min((s for s in checkpoints if s > 0), key=lambda s: abs(s - 0.1 * run["final"]))
    d_early = {n: w - w0[n] for n, w in weights(early).items()}
    rescaled = {n: d * (d_final[n].norm() / d.norm() if d.norm() > 0 else 0.0)
                for n, d in d_early.items()}
    acc_early, acc_rescaled = score(d_early), score(rescaled)
    gain = accT - acc0
    share = lambda acc: f"{(acc - acc0) / gain:.0%}" if gain else "-"  # noqa: E731
    print_rows(f"{name}: norm scaling of step {early} ({early / run['final']:.0%} of training)",
               ["weights", "val acc", "share of final gain"],
               [["W_0", f"{acc0:.3f}", "0%"], [f"W_{early}", f"{acc_early:.3f}", share(acc_early)],
                [f"W_0 + dW_{early} rescaled", f"{acc_rescaled:.3f}", share(acc_rescaled)],
                [f"W_{run['final']}", f"{accT:.3f}", share(accT)]])
    # sliding window: the final update applied to one block of consecutive layers only
    window = [(i, score({n: d for n, d in d_final.items()
                         if layer_of(n) is not None and i <= layer_of(n) < i + args.window}))
              for i in range(n_layers - args.window + 1)]
    print_rows(f"{name}: dW_T applied to layers [i, i+{args.window}) only",
               ["first layer", "val acc"], [[i, f"{acc:.3f}"] for i, acc in window])
    # EffOPD paper Fig. 4: each matrix's top-k or bottom-k singular part of dW_T, rescaled to
    # ||dW_T||_F, on W_0; everything else (norms, embedding, biases) stays at W_0
    matrices = [n for n, p in params.items() if is_geometry_matrix(n, p.shape)]
    svds = {n: torch.linalg.svd(d_final[n].float(), full_matrices=False)  # one SVD per matrix,
            for n in matrices}                                             # reused for every k
    acc_matrices = score({n: d_final[n] for n in matrices})
    parts = [(f, *(score({n: singular_part(d_final[n], principal_k(d_final[n].shape, f), bottom,
                                           svd=svds[n]) for n in matrices})
                   for bottom in (False, True))) for f in args.singular_fracs]
    print_rows(f"{name}: top-k vs bottom-k singular part of each matrix's dW_T, rescaled to "
               f"||dW_T||_F (EffOPD paper Fig. 4); all of dW_T on these matrices: "
               f"{acc_matrices:.3f} ({share(acc_matrices)} of the final gain)",
               ["k / min(m, n)", "top-k val acc", "share", "bottom-k val acc", "share"],
               [[f"{f:g}", f"{top:.3f}", share(top), f"{bottom:.3f}", share(bottom)]
                for f, top, bottom in parts])
    plot_interventions(name, scaling, window, args.window, parts, (acc0, accT), png)
    return dict(acc0=acc0, accT=accT, scaling=scaling, early=early, acc_early=acc_early,
                acc_rescaled=acc_rescaled, window=window, acc_matrices=acc_matrices, parts=parts)


def plot_report(runs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ((ax1, ax3), (ax2, ax4)) = plt.subplots(2, 2, figsize=(10, 7.6))
    for column, (name, run) in enumerate(runs.items()):
        steps = sorted(run["alignment"])
        ax1.plot(steps, [run["alignment"][s] for s in steps], marker="o", label=name)
        ax3.plot(steps, [run["rank"][s] for s in steps], marker="o", label=name)
        layers = sorted({layer for _, layer in run["norms"] if layer is not None})
        ax2.plot(layers, [math.hypot(run["norms"].get(("attention", i), 0),
                                     run["norms"].get(("mlp", i), 0)) for i in layers],
                 marker="o", label=name)
        plot_paper2_bars(ax4, run["geometry"], column, len(runs), name)
    ax1.set(xscale="log", xlabel="step", ylabel="alignment with final update",
            title="subspace alignment of dW_t with dW_T")
    ax3.set(xscale="log", xlabel="step", ylabel="effective rank (mean)",
            title="rank dynamics: effective rank of dW_t")
    ax2.set(xlabel="layer", ylabel="||dW_T||_F (attention + MLP)", title="update norm by layer")
    ax1.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nwrote {path}")


PAPER2 = ("unchanged_bf16", "principal_overlap", "overlap_random", "principal_rotation")


def plot_paper2_bars(ax, geometry: dict[str, float], i: int, count: int, label: str) -> None:
    """Paper 2's diagnostics (means over matrices) as bars, column i of count side by side."""
    width = 0.8 / count
    ax.bar([j + (i - (count - 1) / 2) * width for j in range(len(PAPER2))],
           [geometry[key] for key in PAPER2], width, label=label)
    ax.set_xticks(range(len(PAPER2)), ["unchanged\n(bf16)", "principal\noverlap",
                                       "overlap of a\nrandom dW", "principal\nrotation"])
    ax.set_yscale("symlog", linthresh=1e-6)  # overlaps of 1e-4 beside unchanged shares of 0.5
    ax.set(ylabel="share (mean over matrices)", title="paper 2's diagnostics of dW")
    ax.legend(fontsize=8)


def plot_interventions(name, scaling, window, width, parts, accs, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.5))
    fracs, top, bottom = zip(*parts)
    ax3.bar([i - 0.2 for i in range(len(fracs))], top, 0.4, label="top-k")
    ax3.bar([i + 0.2 for i in range(len(fracs))], bottom, 0.4, label="bottom-k")
    for acc, label, style in ((accs[0], "W_0", ":"), (accs[1], "W_T", "--")):
        ax3.axhline(acc, color="gray", ls=style, label=label)
    ax3.set_xticks(range(len(fracs)), [f"{f:g}" for f in fracs])
    ax3.set(xlabel="k / min(m, n)", ylabel="validation accuracy",
            title=f"{name}: singular parts of dW_T, norm kept")
    ax3.legend(fontsize=8)
    ax1.plot(*zip(*scaling), marker="o")
    ax1.set(xlabel="alpha", ylabel="validation accuracy", title=f"{name}: W_0 + alpha dW_T")
    ax2.bar(*zip(*window))
    ax2.set(xlabel="first layer", ylabel="validation accuracy",
            title=f"{name}: dW_T on {width} layer(s) only")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# Any two checkpoints: dW = W_tuned - W_base of public models, each TUNED a column


def by_layer(matrices: dict[str, dict]) -> dict[int, dict[str, float]]:
    """Per layer: the mean of every metric, and ||dW||_F of its attention and of its MLP
    matrices (their norms added in quadrature) as "norm_attention", "norm_mlp"."""
    norms = norms_by_module({n: r["frobenius_norm"] for n, r in matrices.items()})
    layers = sorted({layer_of(n) for n in matrices if layer_of(n) is not None})
    return {layer: {**means(matrices, lambda n: layer_of(n) == layer),
                    **{f"norm_{m}": norms.get((m, layer), 0.0) for m in ("attention", "mlp")}}
            for layer in layers}


def checkpoint_report(base: str, tuned_paths: list[str], args) -> dict:
    """Print (and with --json write, with a figure beside it) the geometry of W_tuned - W_base for
    each tuned checkpoint. Returns {label: {"matrices", "norms", "mean", "layers"}}."""
    labels = [os.path.basename(os.path.normpath(p)) for p in tuned_paths]
    if len(set(labels)) < len(labels):
        labels = tuned_paths
    check_outputs(args, [args.png] if args.png else [])
    t0 = time.time()
    out = checkpoint_geometry(base, dict(zip(labels, tuned_paths)), args.principal_frac,
                              args.device, args.threads or os.cpu_count() or 1)
    for t in labels:
        out[t]["mean"] = means(out[t]["matrices"])
        out[t]["layers"] = by_layer(out[t]["matrices"])
    count = len(out[labels[0]]["matrices"])
    print_means(f"Geometry of W_tuned - W_base ({base}), mean over {count} attention and MLP "
                f"matrices (EffOPD paper, Table 1; paper 2: unchanged, principal "
                f"top-{args.principal_frac:.0%})", {t: out[t]["mean"] for t in labels})
    print_means("By module type, mean over its matrices",
                {f"{t}: {m}": means(out[t]["matrices"], lambda n: module_type(n) == m)
                 for t in labels for m in ("attention", "mlp")})
    columns = {"|dW| attention": ("norm_attention", ".4g"), "|dW| mlp": ("norm_mlp", ".4g"),
               "erank": ("effective_rank", ".4g"), "unchanged": ("unchanged_bf16", ".3f"),
               "overlap": ("principal_overlap", ".3g"), "rotation": ("principal_rotation", ".3g")}
    for t in labels:
        embeddings = ", ".join(f"{name} {e['frobenius_norm']:.4g} ({e['rows']} rows)"
                               for name, e in out[t]["norms"].items()
                               if module_type(name) == "embedding")
        print_rows(f"{t} by layer: ||dW||_F of the attention and of the MLP matrices (in "
                   f"quadrature), then means (||dW||_F of the embeddings: {embeddings or '-'})",
                   ["layer", *columns],
                   [[layer, *(format(row[key], fmt) for key, fmt in columns.values())]
                    for layer, row in out[t]["layers"].items()])
    if args.json:
        write_json(args.json, {"base": base, "tuned": dict(zip(labels, tuned_paths)),
                               "principal_frac": args.principal_frac, "checkpoints": out})
    if args.png:
        plot_checkpoints(out, args.png)
        print(f"wrote {args.png}")
    print(f"{time.time() - t0:.1f} s")
    return out


def plot_checkpoints(out: dict, path: str) -> None:
    """Six panels over layers, one line per tuned checkpoint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.6))
    panels = (("norm", "||dW||_F (attention + MLP)"), ("effective_rank", "effective rank"),
              ("top1_ratio", "top-1% subspace norm ratio"), ("unchanged_bf16", "unchanged (bf16)"),
              ("principal_overlap", "principal overlap"),
              ("principal_rotation", "principal rotation"))
    for label, result in out.items():
        layers = result["layers"]
        for ax, (key, title) in zip(axes.flat, panels):
            values = [math.hypot(v["norm_attention"], v["norm_mlp"]) if key == "norm" else v[key]
                      for v in layers.values()]
            ax.plot(list(layers), values, marker="o", label=label)
            ax.set(xlabel="layer", title=f"{title}, by layer")
        axes[1, 1].plot(list(layers), [v["overlap_random"] for v in layers.values()], ":",
                        color="gray", label=f"random dW ({label})")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Output files: checked before any work, JSON written whole or not at all


def check_outputs(args, figures: list[str]) -> None:
    """Refuse in one line, before any work, a figure or --json file that could not be written
    at the end: its folder is made, and a file written and removed beside it."""
    outputs = [(args.json, "--json")] if args.json else []
    for path, flag in outputs + [(f, "--png" if f == args.png else "figure") for f in figures]:
        if os.path.isdir(path):
            raise UserError(f"{flag} {path}: is a folder, not a file name")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path + ".tmp", "w").close()  # the name write_atomically writes first
            os.remove(path + ".tmp")
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot write there ({e.strerror}: "
                            f"{e.filename})") from None


def without_nonfinite(x):
    """NaN and +-inf -> None, all the way down, so that the file is strict JSON (null). Tuples
    become lists, as json writes them."""
    if isinstance(x, dict):
        return {k: without_nonfinite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [without_nonfinite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_json(path: str, numbers: dict) -> None:
    """numbers as strict JSON, atomically: a crash or a full disk leaves no half file at path."""
    text = json.dumps(without_nonfinite(numbers), indent=1, allow_nan=False)
    try:
        write_atomically(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as e:
        raise UserError(str(e)) from None
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (bench.py's too)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0].strip(),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="*",
                        help="effopd.py run folders to report on; with --base, the tuned "
                             "checkpoints; none: run the toy model")
    toy = parser.add_argument_group("toy model")
    toy.add_argument("--dim", type=int, default=128, help="dW is dim x dim")
    toy.add_argument("--rank", type=int, default=4,
                     help="rank of the teacher-base residual (= rank(C)), also the k of alignment")
    toy.add_argument("--cond", type=float, default=100.0,
                     help="condition number of the input covariance Sigma (eigenvalues 1..1/cond)")
    toy.add_argument("--steps", type=int, default=200, help="training steps of every run")
    toy.add_argument("--lr", type=float, default=0.03,
                     help="OPD gradient-descent step (stable below 2 = 2 / largest eigenvalue)")
    toy.add_argument("--rl-lr", type=float, default=0.05, help="RL-like step size")
    toy.add_argument("--rl-samples", type=int, default=512,
                     help="RL-like inputs per step, each with one better-or-worse comparison")
    toy.add_argument("--val-size", type=int, default=50,
                     help="held-out inputs that score EffOPD's candidates")
    toy.add_argument("--seed", type=int, default=0, help="seed of the problem and of all sampling")
    parser.add_argument("--png", help="where the figure is written (default: beside --json; "
                        "else runs/toy.png for the toy, none with --base, and for a report "
                        "report.png in the first run folder and each run's interventions in its "
                        "own folder)")
    parser.add_argument("--json", default=None,
                        help="also write the numbers to this file, strict JSON (with --base "
                             "every matrix's, for run folders every run's, or the toy's), and "
                             "the figure beside it (same name, .png)")
    runs = parser.add_argument_group("checkpoint report")
    runs.add_argument("--k", type=positive_int, default=4,
                      help="top-k singular subspace for the alignment with the final update")
    runs.add_argument("--interventions", action="store_true",
                      help="also score scaling, norm scaling and sliding windows on validation")
    runs.add_argument("--alphas", type=float, nargs="+",
                      default=[0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2], help="scaling factors")
    runs.add_argument("--window", type=positive_int, default=1,
                      help="layers per sliding window")
    runs.add_argument("--singular-fracs", type=float, nargs="+", default=[0.01, 0.1, 0.5],
                      help="k of the top-k / bottom-k singular parts (Fig. 4), x min(m, n)")
    runs.add_argument("--principal-frac", type=float, default=0.01,
                      help="principal overlap and rotation: top ceil(frac x min(m, n)) singular "
                           "vectors of the base weights (also in --base mode)")
    runs.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="where the SVDs run (also in --base mode)")
    runs.add_argument("--threads", type=int, default=0,
                      help="CPU threads, split between two matrices worked on at once; "
                           "0: one per core (also in --base mode)")
    parser.add_argument("--curves", action="store_true",
                        help="draw the training curves of the run folders given (their "
                             "metrics.jsonl, as far as written) to --png (default: "
                             "curves.png in the first run folder)")
    pair = parser.add_argument_group("any two checkpoints: dW = W_tuned - W_base")
    pair.add_argument("--base", default=None,
                      help="base checkpoint (hub name, folder or .safetensors file): report dW "
                           "of every TUNED checkpoint given in place of run folders")
    args = parser.parse_args(argv)
    if args.curves and (args.base or not args.run_dirs):
        parser.error("--curves takes run folders: --curves RUN [RUN ...]")
    if args.base and not args.run_dirs:
        parser.error("--base needs at least one TUNED checkpoint: --base BASE TUNED [TUNED ...]")
    if not 0 < args.principal_frac <= 1 or not all(0 < f <= 1 for f in args.singular_fracs):
        parser.error("--principal-frac and --singular-fracs must be in (0, 1]")
    if not all(map(math.isfinite, args.alphas)):
        parser.error(f"--alphas must be finite numbers, got {' '.join(map(str, args.alphas))}")
    if args.threads < 0:
        parser.error(f"--threads must be at least 0 (0: one per core), got {args.threads}")
    try:
        check_device("--device", args.device)
    except UserError as e:
        parser.error(str(e))
    args.png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if not args.run_dirs:
        if not 1 <= args.rank <= args.dim:
            parser.error(f"--rank must be in [1, --dim = {args.dim}], got {args.rank}")
        if not 0 < args.lr < 2:
            parser.error(f"--lr must be in (0, 2), where gradient descent converges; got {args.lr}")
        if args.cond < 1 or args.steps < 1 or args.rl_samples < 1 or args.val_size < 1:
            parser.error("--cond must be >= 1; --steps, --rl-samples and --val-size >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run_command(args)
    except UserError as e:  # bad input: one line, exit 1
        sys.exit(f"analyze: error: {e}")


# ------------------------------------------------------------------------------------------------
# Training curves: metrics.jsonl of one or several runs, also while they are written


def read_metrics(run_dir: str) -> list[dict]:
    """The records of run_dir/metrics.jsonl, its whole lines only: a run still being written may
    end in half a line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (is {run_dir} a run folder written by effopd.py?)")
    records = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):  # the line being written
                break
            try:
                record = json.loads(line)
                assert isinstance(record, dict) and isinstance(record["step"], int)
            except (ValueError, AssertionError, KeyError):
                raise UserError(f"{path}:{lineno}: not a record of effopd.py (a JSON object "
                                f"with a step)") from None
            records.append(record)
    return records


GEOMETRY_CURVES = (("geometry/effective_rank", "effective rank of dW_t"),
                   ("geometry/spectral_ratio", "sigma_1 / ||dW_t||_F"),
                   ("geometry/alignment", "top-k alignment with the previous dW"))


def plot_curves(run_dirs: list[str], png: str) -> None:
    """Training loss and KL, validation (dashed) and test accuracy, against step and against
    training seconds, one colour per run; each EffOPD trigger that kept a move is marked with
    its multiple; the update geometry logged by --geometry-every, when there, in a last row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {os.path.basename(os.path.normpath(d)): read_metrics(d) for d in run_dirs}
    geometry = any(k in r for records in runs.values() for r in records
                   for k, _ in GEOMETRY_CURVES)
    rows = 4 if geometry else 3
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.6 * rows), squeeze=False)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps = [r for r in records if "train/loss" in r]
        evals = [r for r in records if "eval/test_acc" in r]
        for col, x in enumerate(("step", "time/train_s")):
            for row, key in enumerate(("train/loss", "train/kl")):
                axes[row, col].plot([r[x] for r in steps], [r[key] for r in steps], color=color,
                                    lw=1, label=name if row == col == 0 else None)
            ax = axes[2, col]
            ax.plot([r[x] for r in evals], [r["eval/test_acc"] for r in evals], color=color,
                    marker=".", lw=1)
            ax.plot([r[x] for r in evals], [r["eval/val_acc"] for r in evals], color=color,
                    ls="--", lw=1)
            kept = [r for r in steps if r.get("effopd/kept_multiple")]  # EffOPD's moves
            for j, r in enumerate(kept):
                ax.axvline(r[x], color=color, alpha=0.3, lw=1)
                ax.annotate(f"+{r['effopd/kept_multiple']}D", (r[x], 0.97 - 0.09 * (j % 3)),
                            color=color, fontsize=7, xycoords=("data", "axes fraction"),
                            va="top")
        if geometry:
            logged = [r for r in records if "geometry/effective_rank" in r]
            for col, (key, label) in enumerate([GEOMETRY_CURVES[0], GEOMETRY_CURVES[2]]):
                axes[3, col].plot([r["step"] for r in logged], [r.get(key) for r in logged],
                                  color=color, marker=".", lw=1)
                axes[3, col].set(xlabel="step", ylabel=label)
    for col, xlabel in enumerate(("step", "training seconds (EffOPD's validation counted)")):
        for row, ylabel in enumerate(("training loss", "KL(student || teacher)",
                                      "accuracy: test, val (dashed)")):
            axes[row, col].set(xlabel=xlabel, ylabel=ylabel)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    write_atomically(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    print(f"wrote {png}")


def run_command(args) -> None:
    """The report of --base and its checkpoints, of run folders, or else the toy."""
    if args.curves:
        png = args.png or os.path.join(args.run_dirs[0], "curves.png")
        check_outputs(args, [png])
        plot_curves(args.run_dirs, png)
    elif args.base:
        checkpoint_report(args.base, args.run_dirs, args)
    elif args.run_dirs:
        import transformers
        transformers.utils.logging.disable_progress_bar()
        report(args.run_dirs, args)
    else:
        args.png = args.png or "runs/toy.png"
        check_outputs(args, [args.png])
        numbers = run_toy(args)
        if args.json:
            write_json(args.json, numbers)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the toy's small matrices: one thread is fastest, never spin-waits
    main()
