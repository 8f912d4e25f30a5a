"""
effopd: on-policy distillation (OPD) of a student LLM from a teacher, its EffOPD acceleration, and
the geometry of the weight updates, in one file.

OPD: the student samples responses y ~ pi_student(.|x) and, on its own samples, minimizes the
token-level reverse KL to the teacher, KL(student || teacher), over the full vocabulary, in fp32:
    loss = mean over response tokens t of sum_v p_s(v|x,y<t) (log p_s(v|x,y<t) - log p_t(v|x,y<t))
EffOPD ("Learning to Foresee", arXiv 2605.11739): after the optimizer step at t = 1, 2, 4, 8, ...
try W_t + 2D, W_t + 4D, ... (D = W_t - the weights kept at the previous trigger) and keep a
candidate only while validation accuracy strictly improves. Geometry (that paper, and "On the
Geometry of On-Policy Distillation", arXiv 2606.07082): SVD metrics of dW = W_t - W_0.

Simplifications, all deliberate:
 1. only the immediate per-token KL term is differentiated, none through the sampling;
 2. one device, rollouts from a plain KV-cached sampler (no vLLM), no sequence packing;
 3. one optimizer step per batch of rollouts, at a constant learning rate;
 4. EffOPD scores candidates by greedy decoding and moves no norm (--protocol official: as the
    official code; RESULTS.md); EffOPDCallback does the same inside a Hugging Face Trainer;
 5. the student in fp32 (under bf16 autocast on a GPU), the teacher in bf16 on a GPU (--precision).

The file reads top to bottom: the algorithm (config, losses, sampling and scoring, opd_step: one
training step, EffOPD, train, main); then EXTENSIONS (update geometry, subspace locking, EffOPD in
a Hugging Face Trainer); then PLUMBING (checks of flags, files and the run folder, --resume,
checkpoints, the metrics log), which train() reaches in one call per concern.

Run:  python effopd.py --tiny             # tiny models on the CPU, seconds (README)
      python effopd.py --tiny --effopd    # the same with EffOPD
      python effopd.py --smol             # SmolLM2-135M-Instruct, a real LM, on the CPU (README)
      python effopd.py                    # Qwen2.5-0.5B-Instruct from 1.5B-Instruct, one GPU
"""
import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from transformers import TrainerCallback

# ------------------------------------------------------------------------------------------------
# Configuration: the flags (python effopd.py --help) and the built-in settings

PROJECT = os.path.dirname(os.path.abspath(__file__))  # default data paths resolve here, not in ./


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # models and data
    student: str = arg("Qwen/Qwen2.5-0.5B-Instruct", "student model: hub name or local path")
    teacher: str = arg("Qwen/Qwen2.5-1.5B-Instruct", "teacher model: hub name or local path")
    train: str = arg(os.path.join(PROJECT, "data/arith/train.jsonl"),
                     "training prompts (JSONL with prompt, answer)")
    val: str = arg(os.path.join(PROJECT, "data/arith/val.jsonl"),
                   "validation set: EffOPD acceptance, --eval-every")
    test: str = arg(os.path.join(PROJECT, "data/arith/test.jsonl"),
                    "held-out test set, reported only")
    val_size: int = arg(50, "validation examples used (the first N of --val)")
    test_size: int = arg(500, "test examples used (the first N of --test)")
    # training
    loss: str = arg("opd", "the loss, a row of LOSSES")
    steps: int = arg(64, "optimizer steps")
    batch_size: int = arg(16, "prompts per step")
    group_size: int = arg(4, "responses sampled per prompt")
    max_new_tokens: int = arg(256, "response length limit")
    temperature: float = arg(1.0, "student sampling temperature (1.0 = on-policy)")
    lr: float = arg(1e-6, "AdamW learning rate (constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "global gradient-norm clip (0 = off)")
    micro_batch_size: int = arg(16, "responses per forward/backward pass (gradients accumulate)")
    chunk_size: int = arg(128, "positions per fp32 chunk in the OPD loss")
    # EffOPD
    effopd: bool = arg(False, "extrapolate at steps 1, 2, 4, 8, ... (validation-accepted)")
    max_candidates: int = arg(5, "EffOPD candidates per trigger: W+2D, W+4D, ...")
    anchor_device: str = arg("cpu", "where EffOPD keeps its copies of the weights")
    protocol: str = arg("effopd", "EffOPD's validation and scope, a row of PROTOCOLS: effopd or "
                        "official (the paper's code; with --loss sampled)")
    # subspace locking ("On the Geometry of On-Policy Distillation")
    lock_subspace: str = arg("", "checkpoint whose update dW = W - W_0 fixes, per attention and "
                             "MLP matrix, the subspace every later update is projected onto")
    lock_rank: int = arg(8, "top-r left and right singular vectors of that update kept")
    # evaluation and output
    eval_every: int = arg(8, "validation and test accuracy every N steps (and at 0 and the end)")
    geometry_every: int = arg(0, "log the update's geometry (Table 1 metrics of W_t - W_0, "
                              "alignment with the last logged update) every N steps and at the "
                              "end; 0: off. Keeps an fp32 copy of the attention and MLP "
                              "weights on --anchor-device")
    eval_batch_size: int = arg(64, "prompts per greedy-decoding batch in evaluation")
    out: str = arg("", "run folder (default runs/[<setting>-]<loss>[-effopd]-seed<seed>)")
    save_checkpoints: bool = arg(True, "save the student at steps 0, 1, 2, 4, 8, ... and the end")
    seed: int = arg(0, "seed for data order, sampling and everything else")
    device: str = arg("", "cuda or cpu (default: cuda when available)")
    precision: str = arg("auto", "bf16 (the student in fp32 under bf16 autocast, the teacher held "
                         "in bf16; CPUs too), fp32, or auto: bf16 on a GPU that supports it")
    allow_overlap: bool = arg(False, "go on, with a warning, when train, val and test share "
                              "prompts")
    setting: str = arg("", "a row of SETTINGS (flag --NAME): its models, data and defaults")
    resume: str = arg("", "continue the stopped run in this folder from its last checkpoint")


def setting(name: str, **defaults) -> dict:
    """A built-in CPU setting: the models and data that data/make_data.py writes to data/<name>/."""
    path = lambda file: os.path.join(PROJECT, "data", name, file)  # noqa: E731
    return dict(student=path("student"), teacher=path("teacher"), train=path("train.jsonl"),
                val=path("val.jsonl"), test=path("test.jsonl"), device="cpu", **defaults)


# The built-in settings (python effopd.py --tiny). tiny and small: character-level Qwen2 models;
# tiny: "a+b=", 0.5M parameters, a smoke test; small: "6+9+7=" with the working written out
# ("6+9=15,15+7=22"), 3.9M / 7.7M parameters, wide enough for the papers' comparisons. smol: a
# real pretrained LM, SmolLM2-135M-Instruct, taught "What is 17 + 38?" by a LoRA-tuned copy of
# itself (made by python data/make_data.py --models smol).
SETTINGS = {
    "tiny": setting("tiny", batch_size=64, group_size=2, max_new_tokens=6, lr=1e-5, steps=64,
                    micro_batch_size=128, eval_every=4),
    "small": setting("small", batch_size=16, group_size=4, max_new_tokens=40, lr=1e-4, steps=64,
                     micro_batch_size=64, eval_every=8),
    "smol": setting("smol", batch_size=8, group_size=4, max_new_tokens=16, lr=1e-5, steps=16,
                    micro_batch_size=32, eval_every=4, test_size=200),
}

# ------------------------------------------------------------------------------------------------
# The OPD loss: reverse KL(student || teacher) over the full vocabulary


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """The formula itself: mean over the positions where mask (B, T) is True of
    KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)), logits (B, T, V), in fp32.
    Autograd keeps several (B, T, V) fp32 tensors for backward: opd_loss is the same in less."""
    log_p_student = student_logits.float().log_softmax(-1)  # (B, T, V)
    log_p_teacher = teacher_logits.float().log_softmax(-1)
    kl = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1)  # (B, T)
    return kl[mask].sum() / mask.sum()


# The same loss in bounded memory: the logits' fp32 softmax made chunk by chunk, in forward and
# again in backward (tested equal to reverse_kl).


class _ChunkedReverseKL(torch.autograd.Function):
    """Sum over the given positions of KL(student || teacher), chunk by chunk.

    Autograd would keep every chunk's fp32 softmax alive until backward (several copies of the
    logits); instead forward keeps nothing and backward recomputes each chunk, using
    d kl / d z_student = p * (a - kl), with p = softmax(z_student), a = log p - log p_teacher.
    """

    @staticmethod
    def _chunk(student_logits, teacher_logits, b, t):
        """p, a = log p - log q and kl for the positions (b, t): (C, V), (C, V), (C, 1) fp32."""
        log_p = student_logits[b, t].float().log_softmax(-1)  # (C, V)
        a = log_p - teacher_logits[b, t].float().log_softmax(-1)  # before exp_ overwrites log_p
        p = log_p.exp_()
        kl = torch.where(p > 0, p * a, 0.0).sum(-1, keepdim=True)  # 0 * log 0 = 0
        return p, a, kl

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, b_idx, t_idx, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for i in range(0, b_idx.numel(), chunk_size):
            b, t = b_idx[i:i + chunk_size], t_idx[i:i + chunk_size]
            total += _ChunkedReverseKL._chunk(student_logits, teacher_logits, b, t)[2].sum()
        ctx.save_for_backward(student_logits, teacher_logits, b_idx, t_idx)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        student_logits, teacher_logits, b_idx, t_idx = ctx.saved_tensors
        grad = torch.zeros_like(student_logits)  # (B, T, V), unscored positions stay 0
        for i in range(0, b_idx.numel(), ctx.chunk_size):
            b, t = b_idx[i:i + ctx.chunk_size], t_idx[i:i + ctx.chunk_size]
            p, a, kl = _ChunkedReverseKL._chunk(student_logits, teacher_logits, b, t)
            zero = p == 0  # a -inf student logit: its gradient is 0, not 0 * inf = NaN
            grad[b, t] = p.mul_(a.sub_(kl)).masked_fill_(zero, 0.0).mul_(grad_total).to(grad.dtype)
            del p, a, kl, zero  # free this chunk before the next one is made
        return grad, None, None, None, None


def opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
             chunk_size: int = 128) -> torch.Tensor:
    """Mean over scored positions of KL(student || teacher) = sum_v p_s (log p_s - log p_t).

    student_logits, teacher_logits: (B, T, V), any float dtype; mask: (B, T) bool, True where the
    distribution at position t is scored. Computed in fp32, at most chunk_size positions at a time;
    differentiable in student_logits only. Unscored positions are never read (NaN there is fine).
    """
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must both be (B, T, V), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if mask.shape != student_logits.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(student_logits.shape[:2])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    b_idx, t_idx = mask.nonzero(as_tuple=True)  # (N,), (N,): the scored positions
    total = _ChunkedReverseKL.apply(student_logits, teacher_logits.detach(), b_idx, t_idx,
                                    chunk_size)
    return total / max(b_idx.numel(), 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in fp32: (B, T, V), (B, T) -> (B, T)."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask; 0 when there are none (never 0 * NaN)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def sampled_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reverse KL estimated on the sampled tokens y_t only, as a policy gradient.

    advantage A_t = -(log p_s(y_t) - log p_t(y_t)), detached; loss = -mean_t A_t * log p_s(y_t).
    Its expected gradient over y_t ~ p_s equals the gradient of opd_loss (the full-vocabulary sum).
    """
    student_lp = token_logprobs(student_logits, tokens)  # (B, T)
    advantage = (token_logprobs(teacher_logits, tokens) - student_lp).detach()
    return -masked_mean(advantage * student_lp, mask)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out group after group: (B,) -> (B,)."""
    groups = rewards.float().view(-1, group_size)  # (B / G, G)
    std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)
    return ((groups - groups.mean(-1, keepdim=True)) / (std + eps)).view(-1)


def no_signal_share(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: their advantages are 0, GRPO learns nothing."""
    groups = rewards.view(-1, group_size)  # (B / G, G)
    return (groups.min(1).values == groups.max(1).values).float().mean().item()


def grpo_loss(student_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor) -> torch.Tensor:
    """On-policy GRPO with one update per batch (no ratio to clip): -mean_t A * log p_s(y_t)."""
    return -masked_mean(advantages[:, None] * token_logprobs(student_logits, tokens), mask)


def sft_loss(student_logits: torch.Tensor, tokens: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student on given response tokens, -mean_t log p_s(y_t): SFT, here on
    the teacher's own samples (the off-policy counterpart of OPD). (B, T, V), (B, T), (B, T)."""
    return -masked_mean(token_logprobs(student_logits, tokens), mask)


class Scored(NamedTuple):
    """One micro-batch as both models scored it: what a row of LOSSES may use."""
    student_logits: torch.Tensor  # (b, R, V), differentiable
    teacher_logits: torch.Tensor  # (b, R, V), no gradient
    tokens: torch.Tensor  # (b, R): the response ids
    mask: torch.Tensor  # (b, R) bool: the scored positions
    advantages: torch.Tensor  # (b,): GRPO's, from the 0/1 answer rewards
    chunk_size: int  # positions per fp32 chunk of opd_loss


class Loss(NamedTuple):
    """A row of LOSSES: loss(scored) -> the scalar loss of a micro-batch."""
    loss: Callable[[Scored], torch.Tensor]
    samples_from: str  # whose rollouts it trains on: "student" (on-policy) or "teacher"
    min_group_size: int
    help: str


# The losses of --loss: OPD and the baselines the papers compare it with. A new loss is a function
# above and a row here.
LOSSES = {
    "opd": Loss(lambda mb: opd_loss(mb.student_logits, mb.teacher_logits, mb.mask, mb.chunk_size),
                "student", 1, "full-vocabulary reverse KL to the teacher"),
    "sampled": Loss(lambda mb: sampled_token_loss(mb.student_logits, mb.teacher_logits, mb.tokens,
                                                  mb.mask), "student", 1,
                    "per-token policy gradient, advantage log p_teacher - log p_student"),
    "grpo": Loss(lambda mb: grpo_loss(mb.student_logits, mb.tokens, mb.mask, mb.advantages),
                 "student", 2, "RL, GRPO with a 0/1 reward for the right answer (the teacher is "
                 "not used)"),
    "sft": Loss(lambda mb: sft_loss(mb.student_logits, mb.tokens, mb.mask), "teacher", 1,
                "cross-entropy on the teacher's own samples (off-policy)"),
}

# ------------------------------------------------------------------------------------------------
# Sampling and scoring. Data: JSONL records {"prompt": str, "answer": int} (load_jsonl), graded by
# the last number in the response


def extract_answer(text: str) -> int | None:
    """The last integer in the text ('1,234' counts as 1234; the '-' in '5-3' is not a sign)."""
    numbers = re.findall(r"(?<!\d)-?\d+", re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return int(numbers[-1]) if numbers else None


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return sorted(i for i in ids if i is not None)


def render_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, as a user turn of the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to one length, so that every response starts at the same column: (B, P) x 2."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, width - len(s):] = 1
    return ids.to(device), attention_mask.to(device)


def response_mask(response: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """True up to and including the first EOS of each row: (B, R) -> (B, R) bool.

    Computed from the sampled ids, not from pad ids, so it is right also when pad id == EOS id.
    """
    is_eos = torch.isin(response, torch.tensor(eos, device=response.device)).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before position t
    return eos_before == 0


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], max_new_tokens: int, eos: list[int], pad_id: int,
           vocab_size: int, temperature: float = 1.0):
    """Sample responses from the model with a KV cache; temperature 0 decodes greedily.

    Plain softmax sampling over the real vocabulary, no top-k/top-p/repetition penalty (a
    checkpoint's generation_config often sets them): the responses are exactly on-policy.
    Returns input_ids (B, P+R), attention_mask (B, P+R) and the response mask (B, R).
    """
    ids, attention_mask = left_pad(prompt_ids, pad_id, model.device)  # (B, P)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(eos, device=ids.device)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=ids.device)
    x, cache, response = ids, None, []
    for _ in range(max_new_tokens):
        out = model(x, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1, :vocab_size].float()  # (B, V)
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = (logits / temperature).softmax(-1)  # (B, V)
            check_finite(probs, "the sampling distribution")
            token = torch.multinomial(probs, 1).squeeze(-1)
        token = torch.where(done, pad_id, token)  # (B,)
        response.append(token)
        done |= torch.isin(token, stop)
        if done.all():
            break
        x = token[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(x)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    response = torch.stack(response, dim=1)  # (B, R)
    full_mask = torch.cat([attention_mask[:, :ids.shape[1]], torch.ones_like(response)], dim=1)
    return torch.cat([ids, response], dim=1), full_mask, response_mask(response, eos)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    n_response: int, vocab_size: int) -> torch.Tensor:
    """Logits of the distributions that produced the last n_response tokens: (B, R, V).

    Position P-1+t predicts response token t, so we keep the last R+1 positions and drop the last;
    logits beyond the tokenizer's real vocabulary (e.g. 151,936 vs 152,064 in Qwen2.5) are cut.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=n_response + 1).logits  # (B, R+1, V_model)
    return logits[:, :-1, :vocab_size]


def answer_rewards(tokenizer, tokens: torch.Tensor, mask: torch.Tensor,
                   answers: list[int]) -> torch.Tensor:
    """1.0 where a response (B, R), up to its mask, ends in the right number, else 0.0: (B,)."""
    texts = tokenizer.batch_decode(torch.where(mask, tokens, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return torch.tensor([float(extract_answer(t) == a) for t, a in zip(texts, answers)],
                        device=tokens.device)


# ------------------------------------------------------------------------------------------------
# One training step, and the scoring that evaluation and EffOPD share


def opd_step(student, teacher, tokenizer, optimizer, batch: list[dict], loss: str = "opd", *,
             group_size: int = 4, max_new_tokens: int = 256, temperature: float = 1.0,
             micro_batch_size: int = 16, chunk_size: int = 128, grad_clip: float = 1.0,
             autocast=contextlib.nullcontext()) -> dict[str, float]:
    """One training step on batch ({"prompt", "answer"} records): rollouts, both models' scores,
    the loss (a row of LOSSES), backward, and one optimizer step. Returns the step's metrics.
    Raises FloatingPointError, before the update, when the loss or the gradient is not finite."""
    row, vocab, eos = LOSSES[loss], len(tokenizer), eos_ids(tokenizer, student)
    # 1. Rollouts: group_size samples per prompt, from the student as it is now (from the teacher
    # for an off-policy loss, --loss sft), and their 0/1 answer rewards.
    batch = [r for r in batch for _ in range(group_size)]  # group after group
    with autocast:
        ids, attention_mask, mask = sample(
            teacher if row.samples_from == "teacher" else student,
            render_prompts(tokenizer, [r["prompt"] for r in batch]), max_new_tokens, eos,
            tokenizer.pad_token_id, vocab, temperature)
    n_response = mask.shape[1]
    tokens = ids[:, -n_response:]  # (B, R): the response ids, scored by both models
    rewards = answer_rewards(tokenizer, tokens, mask, [r["answer"] for r in batch])  # (B,)
    advantages = grpo_advantages(rewards, group_size)  # (B,), used by --loss grpo
    # 2. Both models score the same ids, micro-batch by micro-batch; each micro-batch's loss is
    # weighted by its share of the scored tokens, so the gradients add up to the gradient of the
    # mean over the whole batch.
    n_scored, loss_sum, kl_sum = mask.sum().clamp(min=1), 0.0, 0.0
    for i in range(0, len(batch), micro_batch_size):
        mb = slice(i, i + micro_batch_size)
        with autocast:
            student_logits = response_logits(student, ids[mb], attention_mask[mb], n_response,
                                             vocab)  # (b, R, V)
            with torch.no_grad():
                teacher_logits = response_logits(teacher, ids[mb], attention_mask[mb],
                                                 n_response, vocab)
        # 3. The loss; the mean KL to the teacher is logged whatever the loss.
        value = row.loss(Scored(student_logits, teacher_logits, tokens[mb], mask[mb],
                                advantages[mb], chunk_size))
        with torch.no_grad():  # the OPD loss is the KL itself
            kl = value if loss == "opd" else opd_loss(student_logits, teacher_logits, mask[mb],
                                                      chunk_size)
        check_finite(value, "the loss")
        weight = mask[mb].sum() / n_scored  # this micro-batch's share of the scored tokens
        weighted = value * weight
        weighted.backward()
        loss_sum, kl_sum = loss_sum + weighted.item(), kl_sum + (kl * weight).item()
        del student_logits, teacher_logits, value, kl, weighted  # free before the next forward
    # 4. One optimizer step, only with a finite gradient.
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip or math.inf)
    check_finite(grad_norm, "the gradient norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"train/loss": loss_sum, "train/kl": kl_sum, "train/grad_norm": grad_norm.item(),
            "train/response_len": mask.sum(1).float().mean().item(),
            "train/reward": rewards.mean().item(),
            "train/no_signal": no_signal_share(rewards, group_size)}


@torch.no_grad()
def accuracy(model, tokenizer, records: list[dict], max_new_tokens: int, eos: list[int],
             batch_size: int = 64, temperature: float = 0.0) -> float:
    """Share of records whose response ends in the right number: greedy (deterministic) at
    temperature 0, else one answer sampled per record."""
    correct = 0
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        ids, _, mask = sample(model, render_prompts(tokenizer, [r["prompt"] for r in batch]),
                              max_new_tokens, eos, tokenizer.pad_token_id, len(tokenizer),
                              temperature)
        response = ids[:, -mask.shape[1]:]
        for r, row, m in zip(batch, response, mask):
            text = tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
            correct += extract_answer(text) == r["answer"]
    return correct / len(records)


# ------------------------------------------------------------------------------------------------
# EffOPD: extrapolation along the update direction, kept only when validation improves

# Attention and MLP module names in Qwen/Llama, GPT-2, GPT-NeoX, Falcon and other families.
ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj", "dense_h_to_4h",
       "dense_4h_to_h")
SCOPE = ATTENTION + MLP


def is_attention_or_mlp(name: str) -> bool:
    """True for a parameter of an attention or MLP block: what EffOPD moves and what the geometry
    reports measure. Embeddings, lm_head and every norm are not: not Qwen3's q_norm/k_norm inside
    self_attn, nor Falcon's ln_attn/ln_mlp or GPT-2's ln_1."""
    parts = name.split(".")
    if any("norm" in p or p.startswith("ln") for p in parts):
        return False
    return any(s in name for s in SCOPE)


def is_official_scope(name: str) -> bool:
    """The official EffOPD code's filter: every parameter whose name contains attn, attention or
    mlp, so some norms too (Qwen3's q_norm/k_norm, every post_attention_layernorm)."""
    return any(s in name for s in ("attn", "attention", "mlp"))


class Protocol(NamedTuple):
    """A row of PROTOCOLS: how EffOPD scores its candidates and which parameters it moves."""
    moves: Callable[[str], bool]  # parameter name -> extrapolated or not
    val_temperature: float  # validation answers: 0 greedy, 1 one sample per prompt
    loss: str | None  # the --loss it trains with; None: any
    help: str


PROTOCOLS = {
    "effopd": Protocol(is_attention_or_mlp, 0.0, None,
                       "greedy validation accuracy; attention and MLP matrices, no norm"),
    "official": Protocol(is_official_scope, 1.0, "sampled",
                         "as the paper's code: one answer sampled per validation prompt at "
                         "temperature 1; names with attn/attention/mlp; the sampled-token loss"),
}


def is_power_of_two(t: int) -> bool:
    return t > 0 and t & (t - 1) == 0


def effopd_anchor(model: torch.nn.Module, device: str = "cpu",
                  moves: Callable[[str], bool] = is_attention_or_mlp,
                  weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """EffOPD's anchor B at the start: a copy, on device, of every parameter it moves. weights:
    the tensors to copy by name, instead of model's parameters (EffOPDCallback passes this
    process's shards)."""
    weights = dict(model.named_parameters()) if weights is None else weights
    return {n: w.detach().to(device, copy=True) for n, w in weights.items() if moves(n)}


def effopd_extrapolate(model: torch.nn.Module, anchor: dict[str, torch.Tensor], score_fn,
                       max_candidates: int = 5,
                       weights: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Try W_t + 2D, W_t + 4D, ... with D = W_t - anchor; keep the best strictly-improving one.

    The official update W := W + f (W - B), f = 2, then f := f / (1 + f) after each acceptance,
    walks exactly W_t + 2D, W_t + 4D, W_t + 6D, ...; we compute W_t + m D directly, the same point
    without the rounding drift. score_fn(model) -> float, higher is better. At the first candidate
    that does not beat the best so far, the best weights are restored, and anchor (name -> tensor,
    on any device) is set to them. weights: the tensors to move in place, by name (default: the
    model's parameters). Returns the ladder, one rung per candidate scored: {"multiple": m,
    "score": s, "improved": it beat every earlier score}, m = 0 for W_t itself; the model ends at
    the last improved multiple.
    """
    weights = dict(model.named_parameters()) if weights is None else weights
    start = {n: weights[n].detach().to(b.device, copy=True) for n, b in anchor.items()}  # W_t

    @torch.no_grad()
    def move_to(multiple: int):
        for n, w in start.items():
            weights[n].copy_(w + multiple * (w - anchor[n]) if multiple else w)

    best = score_fn(model)
    ladder, kept = [{"multiple": 0, "score": best, "improved": True}], 0
    for multiple in range(2, 2 * max_candidates + 1, 2):
        move_to(multiple)
        score = score_fn(model)
        ladder.append({"multiple": multiple, "score": score, "improved": score > best})
        if score <= best:
            break
        best, kept = score, multiple
    move_to(kept)
    with torch.no_grad():
        for n, b in anchor.items():
            b.copy_(weights[n])
    return ladder


def kept_multiple(ladder: list[dict]) -> int:
    """The multiple m of the W_t + m D that a ladder kept (0: none moved)."""
    return max(rung["multiple"] for rung in ladder if rung["improved"])

# ------------------------------------------------------------------------------------------------
# Training: set-up, then one loop


def evaluate(accuracy_of, student, val_set: list[dict], test_set: list[dict], step: int,
             clock: float) -> dict:
    """The metrics record of an evaluation, printed: accuracy_of(model, records) on both sets."""
    record = {"step": step, "time/train_s": round(clock, 3), "eval/val_acc":
              accuracy_of(student, val_set), "eval/test_acc": accuracy_of(student, test_set)}
    print(f"eval {step:4d} | val {record['eval/val_acc']:.3f} | test {record['eval/test_acc']:.3f}")
    return record


def train(cfg: Config) -> list[dict]:
    """Run OPD (or another loss of LOSSES), optionally with EffOPD, from the start or (cfg.resume)
    from a stopped run's last checkpoint; return this call's metrics records, which are also
    appended to <out>/metrics.jsonl."""
    with open_run(cfg) as run:  # flags and folder checked, the folder held, --resume's state read
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        device = default_device(cfg)
        bf16 = use_bf16(cfg.precision, device)
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
        train_set, val_set, test_set = load_splits(cfg)
        student, teacher, tokenizer = load_student_and_teacher(run.last_checkpoint or cfg.student,
                                                               cfg.teacher, device, bf16)
        check_prompt_lengths(cfg, [train_set, val_set, test_set], tokenizer, [student, teacher])
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        protocol = PROTOCOLS[cfg.protocol]
        anchor = effopd_anchor(student, cfg.anchor_device, protocol.moves) if cfg.effopd \
            else None  # EffOPD's B
        if cfg.effopd:
            print_effopd_scope(anchor, student, cfg.protocol)
        initial = initial_student(cfg, run, student, device) \
            if cfg.lock_subspace or cfg.geometry_every else None  # W_0, for these two
        lock = load_subspace_lock(initial, cfg.lock_subspace, cfg.lock_rank, device) \
            if cfg.lock_subspace else None  # W_0 and the (U_r, V_r) of each locked matrix
        geometry = UpdateGeometry(initial, cfg.anchor_device) if cfg.geometry_every else None
        probe = left_pad(render_prompts(tokenizer, [r["prompt"] for r in val_set[:4]]),
                         tokenizer.pad_token_id, device)  # the finite-logits check's inputs
        run.start(optimizer, anchor, probe)  # config.json; a resumed run's optimizer, anchor, RNG
        sizes = dict(group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size,
                     chunk_size=cfg.chunk_size, grad_clip=cfg.grad_clip, autocast=autocast)

        def accuracy_of(model, records: list[dict], temperature: float = 0.0) -> float:
            with autocast:  # temperature 0: greedy
                return accuracy(model, tokenizer, records, cfg.max_new_tokens,
                                eos_ids(tokenizer, student), cfg.eval_batch_size, temperature)

        if not run.resumed:  # step 0: the student before training, evaluated and saved
            run.log(evaluate(accuracy_of, student, val_set, test_set, 0, run.clock))
            if cfg.save_checkpoints:
                run.checkpoint(0, student, tokenizer, optimizer, anchor)
        for step in run.steps():
            t0 = time.time()
            # 1.-4. Rollouts, both models' scores, the loss, backward, the optimizer step.
            batch = random.sample(train_set, cfg.batch_size)
            record = {"step": step, **opd_step(student, teacher, tokenizer, optimizer, batch,
                                               cfg.loss, **sizes)}
            if lock:  # each locked matrix's update back into its early subspace
                lock_to_subspace(student, *lock)
            run.check_student(student, "the update (diverged: try a lower --lr)")
            step_s = seconds_since(t0, device)
            run.clock += step_s
            record["time/step_s"] = round(step_s, 3)
            if device.startswith("cuda"):
                record["gpu/peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            print(f"step {step:4d}/{cfg.steps} | loss {record['train/loss']:8.4f} | "
                  f"kl {record['train/kl']:.4f} | len {record['train/response_len']:5.1f} | "
                  f"{step_s:.2f} s")
            # 5. EffOPD at t = 1, 2, 4, 8, ...: extrapolate, keep only what validation accepts.
            if cfg.effopd and is_power_of_two(step):
                t1 = time.time()
                ladder = effopd_extrapolate(
                    student, anchor, lambda model: accuracy_of(model, val_set,
                                                               protocol.val_temperature),
                    cfg.max_candidates)
                kept = kept_multiple(ladder)
                if kept:
                    run.check_student(student, f"EffOPD's move to W+{kept}D", logits=True)
                effopd_s = time.time() - t1
                run.clock += effopd_s
                record.update({"effopd/ladder": ladder, "effopd/kept_multiple": kept,
                               "effopd/val_s": round(effopd_s, 3)})
                print(f"effopd {step:4d} | " + " ".join(
                    f"{r['multiple']:+d}D:{r['score']:.3f}{'*' if r['improved'] else ''}"
                    for r in ladder) + f" | kept W+{kept}D | {record['effopd/val_s']:.2f} s")
            record["time/train_s"] = round(run.clock, 3)
            if geometry and (step % cfg.geometry_every == 0 or step == cfg.steps):
                record.update(geometry(student))  # not counted in the clock: a measurement
            run.log(record)
            # 6. Evaluation and checkpoint (the checkpoint last: a resumed run starts after both).
            if step % cfg.eval_every == 0 or step == cfg.steps:
                run.log(evaluate(accuracy_of, student, val_set, test_set, step, run.clock))
            if cfg.save_checkpoints and (is_power_of_two(step) or step == cfg.steps):
                run.checkpoint(step, student, tokenizer, optimizer, anchor)
        if device.startswith("cuda"):
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"done: {run.out}")
        return run.records


def main(argv=None) -> None:
    cfg = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # one line per step is the whole log
    try:
        train(cfg)
    except RefusedConfig as e:  # before anything loaded, as argparse refuses a flag
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (UserError, OSError) as e:
        sys.exit(f"effopd: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: every file on disk is whole (written atomically)
        print(interrupted(run_folder(cfg), cfg.steps), file=sys.stderr)
        sys.exit(130)


# ================================================================================================
# EXTENSIONS: the geometry of the updates, subspace locking, EffOPD in a Hugging Face Trainer
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# Update geometry: metrics of dW = W_t - W_0


def update_metrics(delta: torch.Tensor) -> dict[str, float]:
    """SVD metrics of one 2-D update matrix, with sigma_1 >= sigma_2 >= ... its singular values:

    spectral_norm  sigma_1
    spectral_ratio sigma_1 / ||dW||_F                      (= 1 / sqrt(stable rank))
    effective_rank exp(-sum p_i log p_i), p_i = sigma_i / sum_j sigma_j  (Roy & Vetterli 2007)
    top1_ratio     sqrt(sum_{i<=k} sigma_i^2) / ||dW||_F,   k = ceil(0.01 * min(m, n))
    A zero update has spectral_norm 0, effective_rank 0 and NaN ratios.
    """
    if delta.dim() != 2:
        raise ValueError(f"update_metrics needs a 2-D matrix, got shape {tuple(delta.shape)}")
    d = delta.detach().to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    sigma = torch.linalg.svdvals(d.T if d.shape[1] > d.shape[0] else d).double()  # tall is faster
    fro = sigma.square().sum().sqrt()
    k = math.ceil(0.01 * min(d.shape))
    p = sigma / sigma.sum()
    entropy = -torch.where(p > 0, p * p.log(), 0.0).sum()
    zero = fro == 0
    return {"spectral_norm": sigma[0].item(),
            "spectral_ratio": float("nan") if zero else (sigma[0] / fro).item(),
            "effective_rank": 0.0 if zero else entropy.exp().item(),
            "top1_ratio": float("nan") if zero else (sigma[:k].square().sum().sqrt() / fro).item()}


def subspace_alignment(delta_a: torch.Tensor, delta_b: torch.Tensor, k: int) -> float:
    """phi = ||U_a^T U_b||_F^2 / k for the top-k left singular vectors of two updates, in [0, 1]:
    1 when the subspaces coincide, 0 when orthogonal, about k/m for random m-row matrices.
    Left vectors span the output side of dW x; pass delta_a.T, delta_b.T for the input side.
    NaN when either update is zero (e.g. GRPO before any group had a signal): no subspace."""
    if delta_a.shape != delta_b.shape or delta_a.dim() != 2:
        raise ValueError(f"need two 2-D matrices of one shape, got {tuple(delta_a.shape)} and "
                         f"{tuple(delta_b.shape)}")
    if not 1 <= k <= min(delta_a.shape):
        raise ValueError(f"k must be in [1, {min(delta_a.shape)}], got {k}")
    if not (delta_a.any() and delta_b.any()):
        return float("nan")  # the SVD of a zero matrix returns arbitrary vectors
    return alignment(top_singular_subspaces(delta_a, k)[0], top_singular_subspaces(delta_b, k)[0])


def alignment(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """phi = ||U_a^T U_b||_F^2 / k of two orthonormal bases (m, k), in float64."""
    return ((u_a.double().T @ u_b.double()).square().sum() / u_a.shape[1]).item()


def top_singular_subspaces(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the top-k left and right singular subspaces of w (m, n): (m, k), (n, k).

    From the eigenvectors of the smaller Gram matrix (one min(m, n)-square eigh instead of an
    SVD), made again in float64 where sigma_k / sigma_1 < 0.1 (why: RESULTS.md, implementation
    notes). fp32 out (float64 stays float64); the columns span the subspaces in ascending order of
    sigma; where w has rank < k, the missing columns are arbitrary.
    """
    if w.dim() != 2 or not 1 <= k <= min(w.shape):
        raise ValueError(f"need a 2-D matrix and k in [1, min(m, n)], got {tuple(w.shape)}, k={k}")
    a = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    dtype, wide = a.dtype, a.shape[1] > a.shape[0]
    a = a.T if wide else a  # (M, N), M >= N
    eigenvalues, vectors = torch.linalg.eigh(a.T @ a)  # ascending: the top k are last
    if not eigenvalues[-k] >= 0.1**2 * eigenvalues[-1]:  # sigma_k / sigma_1 < 0.1, or NaN
        a = a.double()
        vectors = torch.linalg.eigh(a.T @ a)[1]
    v = vectors[:, -k:]  # (N, k)
    u = torch.linalg.qr(a @ v)[0]  # (M, k): span(a v_k) = span(u_k), made orthonormal
    return (v.to(dtype), u.to(dtype)) if wide else (u.to(dtype), v.to(dtype))


def unchanged_fraction(w_base: torch.Tensor, w_tuned: torch.Tensor,
                       dtype: torch.dtype = torch.bfloat16) -> float:
    """Share of entries equal after casting both matrices to dtype (paper 2 counts bf16 weights).
    An fp32 update below half a bf16 step rounds away: fp32 checkpoints are cast first."""
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"shapes differ: {tuple(w_base.shape)} and {tuple(w_tuned.shape)}")
    return (w_base.to(dtype) == w_tuned.to(dtype)).float().mean().item()


def principal_overlap(w_base: torch.Tensor, delta: torch.Tensor, k: int,
                      base_subspaces: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """rho_k = ||U_k^T dW V_k||_F^2 / ||dW||_F^2, in [0, 1]: the share of the update's energy inside
    the base weight's top-k left and right singular subspaces (U_k, V_k of W_base). A random dW
    gives about k^2 / (m n); lower = more off-principal (paper 2). base_subspaces: (U_k, V_k) from
    top_singular_subspaces(w_base, k), to reuse them across updates. NaN for a zero update."""
    if w_base.shape != delta.shape:
        raise ValueError(f"shapes differ: {tuple(w_base.shape)} and {tuple(delta.shape)}")
    u, v = base_subspaces if base_subspaces is not None else top_singular_subspaces(w_base, k)
    d = delta.detach().to(u.dtype)  # (m, n)
    total = d.square().sum()
    return float("nan") if total == 0 else ((u.T @ d @ v).square().sum() / total).item()


def principal_rotation(w_base: torch.Tensor, w_tuned: torch.Tensor, k: int,
                       base_subspaces: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """1 - phi(W_base, W_tuned, k): how far the top-k left singular subspace of the weight itself
    turned, phi as in subspace_alignment (0: not at all, 1: orthogonal). base_subspaces as in
    principal_overlap. Computed as ||(I - U_base U_base^T) U_tuned||_F^2 / k, the part of U_tuned
    outside U_base, in float64: 1 - phi itself would floor at fp32's 1.2e-7."""
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"shapes differ: {tuple(w_base.shape)} and {tuple(w_tuned.shape)}")
    u_base = (base_subspaces if base_subspaces is not None
              else top_singular_subspaces(w_base, k))[0].double()  # (m, k)
    u_tuned = top_singular_subspaces(w_tuned, k)[0].double()
    outside = u_tuned - u_base @ (u_base.T @ u_tuned)  # (m, k)
    return (outside.square().sum() / k).item()


def singular_part(delta: torch.Tensor, k: int, bottom: bool = False, rescale: bool = True,
                  svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """dW restricted to its top-k (bottom=True: bottom-k) singular triplets, U_k S_k V_k^T, then
    rescaled to ||dW||_F (EffOPD paper Fig. 4: how much of the gain the top directions carry
    versus the tail). svd: torch.linalg.svd(delta, full_matrices=False), to reuse one SVD across
    several k. Unrescaled, the top-k and bottom-(r - k) parts add up to dW (r = min(m, n)).
    Singular values below matrix_rank's tolerance count as 0: the bottom of a rank-deficient dW
    is 0, not rescaled round-off."""
    u, s, vh = svd if svd is not None else torch.linalg.svd(delta.detach().float(),
                                                            full_matrices=False)
    if not 0 <= k <= len(s):
        raise ValueError(f"k must be in [0, {len(s)}], got {k}")
    keep = slice(len(s) - k, len(s)) if bottom else slice(0, k)
    tol = s.max() * max(u.shape[0], vh.shape[1]) * torch.finfo(s.dtype).eps  # as matrix_rank
    part = (u[:, keep] * torch.where(s[keep] > tol, s[keep], 0.0)) @ vh[keep]  # (m, n)
    if not rescale or part.norm() == 0:
        return part
    return part * (s.square().sum().sqrt() / part.norm())

# ------------------------------------------------------------------------------------------------
# Subspace locking: is the early update's subspace enough? ("On the Geometry of On-Policy
# Distillation")


def project_update(delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U U^T delta V V^T: the part of delta (m, n) inside the column spans of u (m, r) and v (n, r),
    which must be orthonormal. Idempotent; a matrix already inside is returned unchanged. Computed
    in fp32 at least (a bf16 delta too), returned in delta's dtype."""
    dtype = torch.promote_types(torch.promote_types(delta.dtype, u.dtype), torch.float32)
    u, v = u.to(dtype), v.to(dtype)
    return (u @ (u.T @ delta.to(dtype) @ v) @ v.T).to(delta.dtype)


def update_subspaces(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-r left and right singular vectors of an update delta (m, n): (m, r'), (n, r'). Only
    directions with a singular value above matrix_rank's tolerance count, so an update of rank
    r' < r fixes r' directions (a zero update none: the matrix stays at W_0), not r - r' arbitrary
    ones."""
    u, s, vh = torch.linalg.svd(delta.detach().float(), full_matrices=False)
    tol = s.max() * max(delta.shape) * torch.finfo(s.dtype).eps
    kept = int((s[:r] > tol).sum())
    return u[:, :kept], vh[:kept].T


@torch.no_grad()
def lock_to_subspace(model: torch.nn.Module, w0: dict[str, torch.Tensor],
                     subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """W := W_0 + U U^T (W - W_0) V V^T, in place, for every parameter named in subspaces; w0
    holds its W_0 and subspaces its (U, V), on the parameter's device. Computed in fp32 at least,
    written back in the parameter's dtype (bf16 weights too)."""
    for name, p in model.named_parameters():
        if name in subspaces:
            start = w0[name].to(torch.promote_types(p.dtype, torch.float32))
            p.copy_(start + project_update(p.to(start.dtype) - start, *subspaces[name]))


def load_subspace_lock(initial: torch.nn.Module, path: str, rank: int, device: str):
    """--lock-subspace: W_0 (from initial) and the top-rank (U, V) of the update W - W_0 of the
    checkpoint at path, for every attention and MLP matrix: the arguments of lock_to_subspace."""
    early = dict(load_model_and_tokenizer(path, torch.float32, device)[0].named_parameters())
    w0, subspaces = {}, {}
    for n, p in initial.named_parameters():
        if p.dim() == 2 and is_attention_or_mlp(n):
            if n not in early or early[n].shape != p.shape:
                raise UserError(f"--lock-subspace {path}: {n} missing or of another shape than "
                                f"the student's {tuple(p.shape)}")
            w0[n] = p.detach().clone()
            subspaces[n] = update_subspaces(early[n] - w0[n], rank)
    print(f"lock: {len(subspaces)} matrices held to their top-{rank} update subspaces in {path}")
    return w0, subspaces

# ------------------------------------------------------------------------------------------------
# The update's geometry while training (--geometry-every; GeometryCallback in a Trainer)


class UpdateGeometry:
    """Called on the model as it trains: the means over its 2-D attention and MLP matrices of
    update_metrics(dW_t), dW_t = W_t - W_0, and of subspace_alignment(dW_t, dW_s, k), s the
    previous call (NaN at the first, and at the first after a --resume), as
    {"geometry/<metric>": mean}. Holds W_0, one fp32 copy of those matrices on device, and each
    dW_s's top-k left singular vectors: one top_singular_subspaces per matrix and call."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu", k: int = 4):
        self.k, self.previous = k, {}  # name -> U_k of dW_s (None: a zero update)
        self.w0 = {n: p.detach().to(device, torch.float32, copy=True)
                   for n, p in model.named_parameters() if p.dim() == 2 and is_attention_or_mlp(n)}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        weights, rows = dict(model.named_parameters()), []
        for name, w0 in self.w0.items():
            delta = weights[name].detach().to(w0.device, torch.float32) - w0  # (m, n)
            u = top_singular_subspaces(delta, min(self.k, *delta.shape))[0] if delta.any() \
                else None  # as subspace_alignment: a zero update has no subspace
            u_s = self.previous.get(name)
            rows.append({**update_metrics(delta), "alignment": alignment(u, u_s)
                         if u is not None and u_s is not None else math.nan})
            self.previous[name] = u

        def mean(values: list[float]) -> float:  # of the numbers: a zero update has NaN ratios
            numbers = [v for v in values if not math.isnan(v)]
            return sum(numbers) / len(numbers) if numbers else math.nan
        return {f"geometry/{key}": mean([r[key] for r in rows]) for key in rows[0]}


class GeometryCallback(TrainerCallback):
    """UpdateGeometry in a Hugging Face Trainer: trainer.add_callback(GeometryCallback(trainer,
    every=4)). W_0 is the model at train begin (on a resume: the resumed weights); every `every`
    global steps and at the last, the geometry goes through the trainer's log (log_history,
    wandb, tensorboard), on the main process. Sharded (FSDP2) weights are refused."""

    def __init__(self, trainer, every: int, device: str = "cpu", k: int = 4):
        self.trainer, self.every, self.device, self.k = trainer, every, device, k
        self.geometry = None

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
        if is_sharded(model):
            raise NotImplementedError("GeometryCallback needs whole weights, not FSDP2 shards")
        if state.is_world_process_zero:
            self.geometry = UpdateGeometry(model, self.device, self.k)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.geometry and (step % self.every == 0 or step == state.max_steps):
            model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
            from transformers import Trainer
            should_log = control.should_log  # as EffOPDCallback: the step's own log stays due
            Trainer.log(self.trainer, self.geometry(model))
            control.should_log = should_log


# ------------------------------------------------------------------------------------------------
# EffOPD in any Hugging Face Trainer (TRL's DistillationTrainer and GKDTrainer are Trainers), on
# one process, under DDP or under FSDP2: a callback. examples/trl_effopd.py shows it with TRL.


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of model that FSDP2 (fully_shard) has sharded; none: it is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model))


def reshard(model: torch.nn.Module) -> None:
    """FSDP2: drop the gathered copies of the weights (a forward may leave them, the root module's
    always), so that the parameters are the shards again and the next forward gathers the shards
    as they are now. A no-op without FSDP2."""
    for module in fsdp_modules(model):
        module.reshard()


def local_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as this process holds it: its local shard where it is sharded (an FSDP2
    DTensor: the shard of the fp32 master weights that the next forward gathers), else itself."""
    reshard(model)
    with torch.no_grad():  # to_local() is then the shard's own storage: edits of it are kept
        return {n: p.to_local() if hasattr(p, "to_local") else p
                for n, p in model.named_parameters()}


def rank0_score(score_fn, every_rank: bool = False):
    """score_fn made collective: every process receives rank 0's value, so that all take one
    accept/reject decision (or their weights drift apart). Only rank 0 scores, unless every_rank:
    under FSDP2 every forward gathers the shards from all processes, so every rank must run
    score_fn with the same forward calls (greedy decoding of the same prompts does). Without a
    process group this is score_fn itself."""
    import torch.distributed as dist

    def score(model) -> float:
        if not (dist.is_available() and dist.is_initialized()):
            return float(score_fn(model))
        value = [float(score_fn(model)) if every_rank or dist.get_rank() == 0 else None]
        dist.broadcast_object_list(value, src=0)  # gloo on CPUs, NCCL on GPUs; the others wait
        return value[0]
    return score


def check_effopd_trainer(trainer, model: torch.nn.Module) -> None:
    """Refuse, in one line, the trainers the callback would get wrong."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise NotImplementedError(
            "EffOPDCallback does not support DeepSpeed: a move would have to write ZeRO's fp32 "
            "master partition (deepspeed.utils.safe_set_local_fp32_param) and the bf16 partition "
            "the forward reads (param.ds_tensor in ZeRO-3, param.data in ZeRO-1/2); use FSDP2 or "
            "DDP")
    if getattr(trainer, "is_fsdp_enabled", False) and not is_sharded(model):
        raise NotImplementedError("EffOPDCallback supports FSDP version 2 (DTensor parameters), "
                                  "not FSDP 1's flattened parameters: set fsdp_version: 2")
    if hasattr(model, "peft_config") or any(".lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("EffOPDCallback cannot extrapolate a PEFT/LoRA student: moving lora_A and "
                         "lora_B apart is not W + m(W - B) (it adds m^2 dB dA); train full weights "
                         "or merge the adapter first")


def anchor_file(checkpoint: str, sharded: bool) -> str:
    """Where the anchor is saved in a Trainer checkpoint folder: one file per rank if sharded."""
    import torch.distributed as dist
    rank = dist.get_rank() if sharded and dist.is_initialized() else 0
    return os.path.join(checkpoint, f"effopd_anchor_rank{rank}.pt" if sharded else
                        "effopd_anchor.pt")


def load_anchor(path: str, like: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The anchor saved at path, onto device (weights_only: no code runs from it); refused in one
    line naming path unless it is there, readable, and fits like."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EffOPDCallback: {path} is missing: the anchor B of the resumed "
                                f"run cannot be restored (it is saved beside the checkpoint)")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # torch's own errors on a cut or foreign file
        raise ValueError(f"EffOPDCallback: {path}: cannot be read (truncated, corrupt, or not "
                         f"the tensors EffOPDCallback saves)") from None
    if not isinstance(saved, dict) or [(n, getattr(b, "shape", None)) for n, b in saved.items()] \
            != [(n, b.shape) for n, b in like.items()]:
        raise ValueError(f"EffOPDCallback: {path} does not fit this model's parameters (another "
                         f"model, or another number of processes?)")
    return saved


class EffOPDCallback(TrainerCallback):
    """EffOPD inside a transformers Trainer:
    trainer.add_callback(EffOPDCallback(trainer, score_fn)).

    After the optimizer step at global steps 1, 2, 4, 8, ... it runs effopd_extrapolate on the
    model the trainer trains (unwrapped from DDP), in eval mode, scored by score_fn(model) ->
    float (higher is better). The anchor B is taken at train begin, kept on anchor_device, saved in
    every Trainer checkpoint (checkpoint-N/effopd_anchor*.pt) and restored from there on a resume.
    The ladder goes through the trainer's own log (log_history, wandb, tensorboard):
    effopd/kept_multiple, effopd/score_+<m>D per candidate, effopd/val_s. Optimizer state and
    schedule are left alone. DDP: rank 0 scores, the score is broadcast (rank0_score), every rank
    makes the same move. FSDP2: each rank moves its own shards, every rank scores, rank 0's score
    decides. vLLM holds its own weights: TRL re-syncs them after this callback; elsewhere push them
    after a trigger. DeepSpeed, FSDP 1 and PEFT are refused at train begin (check_effopd_trainer).
    """

    def __init__(self, trainer, score_fn, max_candidates: int = 5, anchor_device: str = "cpu"):
        self.trainer, self.score_fn = trainer, score_fn
        self.max_candidates, self.anchor_device = max_candidates, anchor_device
        self.anchor, self.sharded = None, False  # parameter name -> B, from on_train_begin
        self.resumed_from = None  # the checkpoint trainer.train resumes: its anchor is beside it
        train = getattr(trainer, "train", None)

        def train_noting_the_checkpoint(resume_from_checkpoint=None, *args, **kwargs):
            if resume_from_checkpoint is True:  # the Trainer's "the last one in output_dir"
                from transformers.trainer_utils import get_last_checkpoint
                self.resumed_from = get_last_checkpoint(trainer.args.output_dir)
            else:
                self.resumed_from = resume_from_checkpoint or None
            return train(resume_from_checkpoint, *args, **kwargs)
        if callable(train):  # a loop of one's own that calls the hooks has none
            trainer.train = train_noting_the_checkpoint

    def model(self) -> torch.nn.Module:
        """The module the trainer trains now (it may have wrapped or replaced the one it got)."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.model()
        check_effopd_trainer(self.trainer, model)
        self.sharded = is_sharded(model)
        self.anchor = effopd_anchor(model, self.anchor_device, weights=local_parameters(model))
        if state.global_step > 0:  # resumed: the Trainer loaded W_t; B is the one saved with it
            checkpoint = self.resumed_from or os.path.join(args.output_dir,
                                                           f"checkpoint-{state.global_step}")
            self.anchor = load_anchor(anchor_file(checkpoint, self.sharded), self.anchor,
                                      self.anchor_device)

    def on_save(self, args, state, control, **kwargs):
        if self.sharded or state.is_world_process_zero:  # sharded: each rank its own shards
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(checkpoint, exist_ok=True)  # a rank may get here before rank 0 made it

            def save(tmp: str) -> None:  # into an open file: a full disk is an OSError
                with open(tmp, "wb") as f:
                    torch.save(self.anchor, f)
            write_atomically(anchor_file(checkpoint, self.sharded), save)

    def on_step_end(self, args, state, control, **kwargs):
        if not is_power_of_two(state.global_step):
            return
        model, t0 = self.model(), time.time()
        was_training = model.training
        model.eval()  # no dropout while scoring
        score = rank0_score(self.score_fn, self.sharded)
        ladder = effopd_extrapolate(  # FSDP2: each forward must gather the shards as moved
            model, self.anchor, lambda m: (reshard(m), score(m))[1], self.max_candidates,
            weights=local_parameters(model))
        reshard(model)
        model.train(was_training)
        record = {"effopd/kept_multiple": kept_multiple(ladder),
                  **{f"effopd/score_{r['multiple']:+d}D": r["score"] for r in ladder},
                  "effopd/val_s": round(time.time() - t0, 3)}
        from transformers import Trainer
        should_log = control.should_log  # the trainer's log resets it: the step's own log stays due
        Trainer.log(self.trainer, record)  # the base log: TRL's would flush its running averages
        control.should_log = should_log


# ================================================================================================
# PLUMBING. Nothing below is OPD or EffOPD: flag, data, model-file and run-folder checks, the run
# folder's lock, --resume, checkpoints, the metrics log, atomic writes. Read it when a run refuses
# to start or stops.
# ================================================================================================


class UserError(Exception):
    """Bad input (flags, files, models) or a diverged run: one line, a non-zero exit."""


class RefusedConfig(UserError):
    """A flag, the run folder or --resume's state refused before anything loads: exit 2, as
    argparse's own errors."""


AT_LEAST_ONE = ("steps", "batch_size", "group_size", "max_new_tokens", "micro_batch_size",
                "chunk_size", "max_candidates", "eval_every", "eval_batch_size", "val_size",
                "test_size", "lock_rank")
# What --resume may change besides --steps (to train further): in what pieces the work runs (the
# results agree up to floating-point summation order). Everything else is the run's (--device too:
# CPU and CUDA draw different random streams).
RESUMABLE = ("anchor_device", "micro_batch_size", "chunk_size", "eval_batch_size")


class OneLineErrors(argparse.ArgumentParser):
    """argparse's parser with one-line errors: the message without the usage (--help has it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> Config:
    """Config from the command line: the defaults (or a setting's, or the resumed run's
    config.json) with the given flags on top. train() checks it (check_config)."""
    parser = OneLineErrors(description=__doc__.split("\n\n")[0].strip(),
                           argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} ({f.default!r})"
        if f.name in ("loss", "protocol"):  # the rows of the table
            table = LOSSES if f.name == "loss" else PROTOCOLS
            help = " | ".join(f"{name}: {row.help}" for name, row in table.items()) + \
                f" ({f.default})"
        if f.name == "setting":  # one flag per row: --tiny, --small, ...
            for name in SETTINGS:
                parser.add_argument("--" + name, dest="setting", action="append_const",
                                    const=name, help=f"the {name} setting: models, data and "
                                    f"defaults of SETTINGS[{name!r}]")
        elif f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), help=help)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    try:
        if len(given.get("setting", [])) > 1:
            raise UserError(" and ".join(f"--{name}" for name in given["setting"]) +
                            " are two settings: give one")
        if "setting" in given:
            given["setting"] = given["setting"][0]
        if "resume" in given:
            if not given["resume"].strip():  # an unset shell variable: not "no resume"
                raise UserError("--resume takes the folder of the run to continue, got "
                                f"{given['resume']!r}")
            return resumed_config(given)
    except UserError as e:
        parser.error(str(e))
    return Config(**{**SETTINGS.get(given.get("setting"), {}), **given})


def resumed_config(given: dict) -> Config:
    """The config.json of the run in given["resume"] with the given flags on top; a flag outside
    RESUMABLE that differs from the run's own value is refused."""
    path = os.path.join(given["resume"], "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; --resume takes a run folder written by effopd.py")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"got {type(saved).__name__}")
    except ValueError as e:  # not UTF-8, not JSON, or not an object
        raise UserError(f"{path}: not the JSON object of flags that effopd.py writes ({e})") \
            from None
    saved = {k: v for k, v in saved.items() if k in Config.__dataclass_fields__}
    for k, v in saved.items():  # an edited value fails here, not in a comparison later
        want = type(Config.__dataclass_fields__[k].default)
        if type(v) is not want and not (want is float and type(v) is int):
            raise UserError(f"{path}: field \"{k}\" is {json.dumps(v)}, expected a value "
                            f"of type {want.__name__}, as effopd.py writes it")
    flags = lambda names: ", ".join("--" + n.replace("_", "-") for n in names)  # noqa: E731
    for k, v in given.items():
        if k not in ("resume", "steps", *RESUMABLE) and v != saved.get(k):
            raise UserError(f"{flags([k])} {v} differs from the run's {saved.get(k)}: a resumed "
                            f"run keeps its config (only {flags(['steps', *RESUMABLE])} may "
                            f"change)")
    return Config(**{**saved, **given, "out": given["resume"]})


def default_device(cfg: Config) -> str:
    """--device, by default cuda when a GPU is available, else cpu."""
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_folder(cfg: Config) -> str:
    prefix = f"{cfg.setting}-" if cfg.setting else ""
    return cfg.out or f"runs/{prefix}{cfg.loss}{'-effopd' if cfg.effopd else ''}-seed{cfg.seed}"


def check_config(cfg: Config) -> None:
    """The flags, before anything loads: sizes, rates, names of table rows, paths, devices."""
    for name in AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got "
                            f"{getattr(cfg, name)}")
    for name, need in [("lr", "> 0"), ("temperature", ">= 0"), ("weight_decay", ">= 0"),
                       ("grad_clip", ">= 0 (0 = off)")]:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and (value > 0 if need == "> 0" else value >= 0)):
            raise UserError(f"--{name.replace('_', '-')} must be finite and {need}, got {value}")
    if cfg.geometry_every < 0:
        raise UserError(f"--geometry-every must be 0 (off) or at least 1, got {cfg.geometry_every}")
    if 0 < cfg.temperature < 1e-3:  # logits / temperature would leave fp32's range
        raise UserError(f"--temperature must be 0 (greedy) or at least 0.001, got "
                        f"{cfg.temperature}")
    if not 0 <= cfg.seed < 2**64:  # random.seed drops a sign; torch.manual_seed takes < 2**64
        raise UserError(f"--seed must be 0 to 2**64 - 1, got {cfg.seed}")
    if cfg.setting and cfg.setting not in SETTINGS:
        raise UserError(f"setting {cfg.setting!r} is not one of {', '.join(SETTINGS)}")
    if cfg.loss not in LOSSES:
        *others, last = LOSSES
        raise UserError(f"--loss must be {', '.join(others)} or {last}, not {cfg.loss!r}")
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {cfg.protocol!r}")
    if PROTOCOLS[cfg.protocol].loss not in (None, cfg.loss):
        raise UserError(f"--protocol {cfg.protocol} trains with --loss "
                        f"{PROTOCOLS[cfg.protocol].loss}, not {cfg.loss}: add --loss "
                        f"{PROTOCOLS[cfg.protocol].loss}")
    if cfg.group_size < LOSSES[cfg.loss].min_group_size:
        raise UserError(f"--loss {cfg.loss} needs --group-size >= "
                        f"{LOSSES[cfg.loss].min_group_size}: its advantage compares the "
                        f"responses to one prompt, so a group of one learns nothing")
    for name in ("student", "teacher"):  # a hub name is "model" or "org/model"
        path = getattr(cfg, name)
        if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            make = f" (make it: python data/make_data.py --models {cfg.setting})" \
                if cfg.setting and path == SETTINGS[cfg.setting].get(name) else ""
            raise UserError(f"--{name} {path}: no such folder{make}")
    if cfg.lock_subspace and not os.path.isdir(cfg.lock_subspace):
        raise UserError(f"--lock-subspace {cfg.lock_subspace}: no such checkpoint folder")
    for flag, device in [("--device", default_device(cfg)), ("--anchor-device", cfg.anchor_device)]:
        check_device(flag, device)
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32, not {cfg.precision!r}")
    on_gpu = default_device(cfg).startswith("cuda")
    if cfg.precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bf16; use fp32")


def check_device(flag: str, device: str) -> None:
    """A device flag names cpu, or cuda or cuda:N of a GPU this machine has."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"{flag} must be cpu, cuda or cuda:N, not {device!r}")
    gpus = torch.cuda.device_count()
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= gpus:
        raise UserError(f"{flag} {device}: no such CUDA GPU on this machine ({gpus} found)")


def check_run_folder(out: str, resume: bool) -> None:
    """A new run needs a new or empty folder, a resumed one its resume.pt; both a writable one that
    no other run holds. Leftover *.tmp files of a crashed write do not count (the next write
    replaces them), nor does the lock file .lock."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")
    files = sorted(f for f in os.listdir(out) if not f.endswith(".tmp") and f != ".lock") \
        if os.path.isdir(out) else []
    if resume and "resume.pt" not in files:
        raise UserError(f"{out}: no resume.pt, so nothing to resume (it is written with every "
                        f"checkpoint; runs with --no-save-checkpoints have none)")
    # Taking the lock once proves the folder writable and free. Not in a folder of other files,
    # which is refused below without a .lock left in it; in one of a run, a running one is named.
    if resume or not files or os.path.exists(os.path.join(out, ".lock")):
        try:
            with hold_run_folder(out):
                pass
        except OSError as e:
            raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
    if not resume and files:
        hint = f"continue it with --resume {out}" if "resume.pt" in files else "delete it"
        raise UserError(f"--out {out} holds files of an earlier run ({', '.join(files[:3])}"
                        f"{', ...' if len(files) > 3 else ''}); {hint}, or pass another --out")


@contextlib.contextmanager
def hold_run_folder(out: str):
    """Hold the run folder out while the block runs: a lock (flock) on out/.lock, which the OS lets
    go of when the file closes or its process dies, so a killed run leaves no stale lock. While
    another process (or block) holds it, this one is refused in one line naming its pid."""
    os.makedirs(out, exist_ok=True)
    try:  # O_NOFOLLOW: a .lock that is a link is refused, never truncated through
        fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UserError(f"{out}/.lock: a symbolic link, not the run's own lock file; delete "
                        f"it") from None
    with open(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{out}: another effopd run (pid {f.read().strip()}) is writing to "
                            f"this folder; wait for it to end") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


# ------------------------------------------------------------------------------------------------
# Data, models and finite checks


def load_jsonl(path: str) -> list[dict]:
    """Read prompt/answer records; a bad line is reported by file and line number."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    records = []
    with open(path, "rb") as f:  # bytes, decoded line by line: a line that is not UTF-8 is named
        for lineno, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1}: "
                                f"{e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answer = record.get("answer") if isinstance(record, dict) else None
                if isinstance(answer, str) and re.fullmatch(r"\s*-?\d+\s*", answer):
                    answer = int(answer)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except ValueError as e:  # an integer of more digits than int() reads
                raise UserError(f"{path}:{lineno}: a number too long to read ({e})") from None
            if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                    and record["prompt"].strip() and isinstance(answer, int)
                    and not isinstance(answer, bool)):
                raise UserError(f"{path}:{lineno}: expected {{\"prompt\": non-empty string, "
                                f"\"answer\": integer}}, got {line.strip()[:80]}")
            records.append({"prompt": record["prompt"], "answer": answer})
    if not records:
        raise UserError(f"{path}: no records")
    return records


def load_splits(cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """The training records and the first --val-size / --test-size of the other two files."""
    train_set, val_set, test_set = load_jsonl(cfg.train), load_jsonl(cfg.val), load_jsonl(cfg.test)
    for path, records, size in [(cfg.val, val_set, "val_size"), (cfg.test, test_set, "test_size")]:
        if len(records) < getattr(cfg, size):
            raise UserError(f"{path}: {len(records)} records, but --{size.replace('_', '-')} "
                            f"asks for {getattr(cfg, size)}")
    if len(train_set) < cfg.batch_size:
        raise UserError(f"{cfg.train}: {len(train_set)} records, fewer than --batch-size "
                        f"{cfg.batch_size}")
    splits = [(cfg.train, train_set), (cfg.val, val_set[:cfg.val_size]),
              (cfg.test, test_set[:cfg.test_size])]
    check_disjoint(splits, cfg.allow_overlap)
    return tuple(records for _, records in splits)


def check_disjoint(splits: list[tuple[str, list[dict]]], allow: bool) -> None:
    """No prompt in two of the splits (train, validation, test): a shared prompt inflates every
    accuracy measured on it. Refused, or (allow) a warning."""
    for i, (a, first) in enumerate(splits):
        for b, second in splits[i + 1:]:
            shared = {r["prompt"] for r in first} & {r["prompt"] for r in second}
            if not shared:
                continue
            j = next(j for j, r in enumerate(second) if r["prompt"] in shared)
            k = next(k for k, r in enumerate(first) if r["prompt"] == second[j]["prompt"])
            message = (f"{b}:{line_of(b, j)}: the prompt {second[j]['prompt'][:40]!r} is also at "
                       f"{a}:{line_of(a, k)} ({len(shared)} prompts shared); a prompt in two "
                       f"splits inflates the accuracy measured on it")
            if not allow:
                raise UserError(f"{message}: pass --allow-overlap to go on knowingly")
            print(f"warning: {message}")


def check_prompt_lengths(cfg: Config, splits: list[list[dict]], tokenizer, models) -> None:
    """Every prompt of the three splits, as rendered, is 1 token or more and leaves room for
    --max-new-tokens in the models' positions (max_position_embeddings)."""
    positions = min(getattr(m.config, "max_position_embeddings", None) or math.inf for m in models)
    room = positions - cfg.max_new_tokens
    for path, records in zip([cfg.train, cfg.val, cfg.test], splits):
        for i, ids in enumerate(render_prompts(tokenizer, [r["prompt"] for r in records])):
            if not 1 <= len(ids) <= room:
                raise UserError(f"{path}:{line_of(path, i)}: the prompt is {len(ids)} tokens; "
                                f"expected 1 to {room} (the models' {positions} positions less "
                                f"--max-new-tokens {cfg.max_new_tokens})")


def line_of(path: str, i: int) -> int:
    """The line number of load_jsonl(path)[i] (blank lines hold no record)."""
    with open(path, "rb") as f:
        return [n for n, line in enumerate(f, 1) if line.decode("utf-8").strip()][i]


def load_model_and_tokenizer(path: str, dtype: torch.dtype, device: str):
    """A causal LM and its tokenizer (hub name or folder). Refused in one line: a file that
    cannot be read (check_model_files), a weights file that is not plain tensors, a weight the
    checkpoint lacks or holds in another shape (transformers would start it from random values),
    a weight that is NaN or inf (check_weights)."""
    import pickle
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    check_model_files(path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its load report: refused below in one line instead
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                           output_loading_info=True)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) of a .bin file
        raise UserError(f"{path}: a weights file that is not plain tensors (refused unread: it "
                        f"could run code); save the model with save_pretrained") from None
    except RuntimeError as e:  # transformers' refusal of a size mismatch
        raise UserError(f"cannot load model {path!r}: a weight's shape differs from its "
                        f"config.json ({str(e).splitlines()[0][:80]})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    finally:
        logging.set_verbosity(verbosity)
    for kind in ("missing_keys", "mismatched_keys"):
        if info[kind]:
            name = sorted(map(str, info[kind]))[0]
            raise UserError(f"{path}: weight {name} is {kind.split('_')[0]} in the checkpoint "
                            f"(transformers would start it from random values); expected every "
                            f"weight of its config.json")
    check_weights(model, path)
    return model.to(device), tokenizer


def use_bf16(precision: str, device: str) -> bool:
    """--precision: bf16 (student in fp32 under bf16 autocast, teacher in bf16) or fp32; auto is
    bf16 on a GPU that supports it, fp32 elsewhere."""
    if precision == "auto":
        return device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """OPD compares the two models token by token: they must map text to the same ids."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        differ = sorted(set(s.items()) ^ set(t.items()), key=str)[:3]
        raise UserError(f"student and teacher tokenizers differ ({len(s)} vs {len(t)} tokens; "
                        f"e.g. {differ}); OPD needs one shared tokenizer")


def initial_student(cfg: Config, run, student, device: str):
    """W_0: the student as it was before step 1 (loaded again on --resume)."""
    if not run.resumed:
        return student
    return load_model_and_tokenizer(cfg.student, torch.float32, device)[0]


def load_student_and_teacher(student_path: str, teacher_path: str, device: str, bf16: bool):
    """The student in fp32 (bf16 weights would round lr-1e-6 updates away), the frozen teacher in
    bf16 when bf16, and their one tokenizer, with a pad token. Returns all three."""
    student, tokenizer = load_model_and_tokenizer(student_path, torch.float32, device)
    teacher, teacher_tokenizer = load_model_and_tokenizer(
        teacher_path, torch.bfloat16 if bf16 else torch.float32, device)
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    teacher.eval().requires_grad_(False)
    for name, m in (("student", student), ("teacher", teacher)):
        if m.get_output_embeddings().weight.shape[0] < len(tokenizer):
            raise UserError(f"{name} has {m.get_output_embeddings().weight.shape[0]} logits, "
                            f"fewer than the tokenizer's {len(tokenizer)} tokens")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return student, teacher, tokenizer


def read_json(path: str) -> dict:
    """A JSON object from a file (config.json, model.safetensors.index.json), or a one-line
    refusal naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def open_safetensors(file: str):
    """safetensors.safe_open(file), or a one-line refusal of a truncated or garbage file."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: not a readable .safetensors file ({e})") from None


def checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> .safetensors file of a checkpoint: a local folder (its model.safetensors,
    or the shards that model.safetensors.index.json lists), one .safetensors file, or a hub name
    (fetched by huggingface_hub.snapshot_download, safetensors and JSON files only). The one
    reader of model files: effopd checks a student or teacher folder with it before loading,
    analyze.py reads checkpoints through it."""
    if not os.path.exists(path):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            raise UserError(f"{path}: no such folder or file, and not a hub name")
        from huggingface_hub import snapshot_download
        try:
            path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
        except Exception as e:  # offline, unknown repository, gated model, ...
            raise UserError(f"{path}: not a local folder, and the hub download failed "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") \
                from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        saved = read_json(index)
        weight_map = saved.get("weight_map")
        if "metadata" not in saved or not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()):
            raise UserError(f"{index}: expected the index save_pretrained writes, with "
                            f"\"metadata\" and a \"weight_map\" of tensor names to files")
        outside = [f for f in weight_map.values() if os.path.isabs(f) or ".." in Path(f).parts]
        if outside:
            raise UserError(f"{index}: names {outside[0]!r}, outside the checkpoint's folder")
        return {n: os.path.join(path, file) for n, file in weight_map.items()}
    if os.path.isfile(path) and path.endswith(".safetensors"):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".safetensors"))
    else:
        files = []
    if not files:
        raise UserError(f"{path}: no .safetensors file (save the model with save_pretrained)")
    names = {}
    for file in files:
        with open_safetensors(file) as f:
            names.update({n: file for n in f.keys()})
    return names


def check_model_files(path: str) -> None:
    """A model folder, before transformers reads it: tokenizer files in it, and its shard index
    and the header of each .safetensors file whole (a hub name is left to the hub's own checks;
    a missing shard, to from_pretrained, which names it)."""
    if not os.path.isdir(path):
        return
    files = os.listdir(path)  # without config.json it is no model, as from_pretrained says
    if "config.json" in files and not any(f.startswith(("tokenizer", "vocab")) for f in files):
        raise UserError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, "
                        f"vocab.json); save the model's tokenizer with it")
    if any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
        for file in filter(os.path.isfile, set(checkpoint_files(path).values())):
            with open_safetensors(file):  # reads the header, checked against the file size
                pass


def check_weights(model, path: str) -> None:
    """Every weight of the model loaded from path is finite: nothing is trained or saved from a
    NaN or an infinity."""
    for n, p in model.named_parameters():
        try:
            check_finite(p, f"weight {n}")
        except FloatingPointError:
            raise UserError(f"{path}: weight {n} is NaN or inf; expected finite weights") from None


def print_effopd_scope(anchor: dict[str, torch.Tensor], model: torch.nn.Module,
                       protocol: str) -> None:
    """What EffOPD moves, in one line; an empty scope is refused."""
    if not anchor:
        raise UserError(f"--effopd: no attention or MLP weight among the student's parameters "
                        f"(e.g. {next(iter(dict(model.named_parameters())))}); EffOPD would move "
                        f"nothing")
    print(f"effopd: {len(anchor)} tensors, {sum(b.numel() for b in anchor.values()) / 1e6:.2f}M "
          f"parameters in scope (--protocol {protocol})")


# ------------------------------------------------------------------------------------------------
# The run folder while train() runs: checks, lock, --resume, checkpoints, the metrics log


@contextlib.contextmanager
def open_run(cfg: Config):
    """train()'s run folder: the flags and the folder checked and --resume's state read, once,
    before any model loads (RefusedConfig); the folder held (a lock) while the block runs. Yields
    the Run. A NaN or inf met in the block (FloatingPointError) stops the run in one line naming
    the step and the last finite checkpoint."""
    with contextlib.ExitStack() as stack:
        try:
            check_config(cfg)
            out = run_folder(cfg)
            check_run_folder(out, resume=bool(cfg.resume))
            stack.enter_context(hold_run_folder(out))
            run = Run(cfg, load_resume(out, cfg.steps) if cfg.resume else None)
        except UserError as e:  # exit 2, as argparse refuses a flag
            raise RefusedConfig(str(e)) from None
        try:
            yield run
        except FloatingPointError as e:
            raise UserError(f"step {run.step}: {e}; stopped before saving. Last good (finite) "
                            f"checkpoint: {run.last_checkpoint or 'none saved'}") from None


class Run:
    """A run folder as train() writes it: config.json, metrics.jsonl, the checkpoints step_N and
    resume.pt. resumed: the state of --resume (load_resume), None for a new run."""

    def __init__(self, cfg: Config, resumed: dict | None):
        self.cfg, self.out, self.resumed = cfg, run_folder(cfg), resumed
        self.metrics = os.path.join(self.out, "metrics.jsonl")
        self.step = resumed["step"] if resumed else 0  # the step under way (after: the last done)
        self.clock = resumed["clock"] if resumed else 0.0  # seconds of training and EffOPD
        self.last_checkpoint = os.path.join(self.out, resumed["checkpoint"]) if resumed else None
        self.records, self.probe = [], None  # this call's metrics; the finite-logits inputs

    def start(self, optimizer, anchor: dict | None, probe: tuple[torch.Tensor, torch.Tensor]):
        """On --resume, put back what checkpoint() saved (optimizer state and EffOPD's anchor,
        refused in one line unless they fit this student; RNG states) and cut metrics.jsonl back
        to the saved step's lines; else start metrics.jsonl empty. Then write config.json.
        probe: (input_ids, attention_mask) of check_student's logits."""
        self.probe = probe
        if self.resumed:
            restore_state(self.resumed, optimizer, anchor, os.path.join(self.out, "resume.pt"))
            os.truncate(self.metrics, self.resumed["metrics_bytes"])  # the lines of lost steps
            print(f"resuming {self.out} after step {self.step} ({self.last_checkpoint})")
        else:
            open(self.metrics, "w").close()
        config = json.dumps({**asdict(self.cfg), "out": self.out}, indent=2)
        write_atomically(os.path.join(self.out, "config.json"),
                         lambda tmp: Path(tmp).write_text(config))
        if self.resumed:  # last: nothing after this may draw a random number before step 1
            rng = self.resumed["rng"]
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def steps(self):
        """The steps left to train, in order; self.step is the one under way."""
        while self.step < self.cfg.steps:
            self.step += 1
            yield self.step

    def log(self, record: dict) -> None:
        self.records.append(record)
        append_line(self.metrics, record)

    def check_student(self, model, after: str, logits: bool = False) -> None:
        """Every weight finite, and (logits) the model's logits on the probe prompts: finite
        weights can still overflow them (1e12 after a huge step). Else FloatingPointError."""
        try:
            for n, p in model.named_parameters():
                check_finite(p, f"weight {n}")
            if logits:
                with torch.no_grad():
                    check_finite(model(self.probe[0], attention_mask=self.probe[1]).logits,
                                 "a logit")
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} after {after}") from None

    def checkpoint(self, step: int, student, tokenizer, optimizer, anchor: dict | None) -> None:
        """The student, checked finite, in out/step_N, then what --resume needs besides it in
        out/resume.pt (only the latest): optimizer state, EffOPD anchor, clock, RNG states, and
        the length of metrics.jsonl."""
        self.check_student(student, "the update (diverged: try a lower --lr)", logits=True)
        path = os.path.join(self.out, f"step_{step:06d}")
        save_pretrained_atomically(student, tokenizer, path)
        state = {"step": step, "checkpoint": os.path.basename(path), "clock": self.clock,
                 "optimizer": optimizer.state_dict(), "anchor": anchor,
                 "metrics_bytes": os.path.getsize(self.metrics), "rng": {
                     "python": random.getstate(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized()
                     else []}}

        def save(tmp: str) -> None:  # into an open file: a full disk then surfaces as an OSError
            with open(tmp, "wb") as f:
                torch.save(state, f)
        write_atomically(os.path.join(self.out, "resume.pt"), save)
        self.last_checkpoint = path


def load_resume(out: str, steps: int) -> dict:
    """resume.pt of the run in out, read once (weights_only: no code runs from it) and checked
    before any model loads: the state Run.checkpoint saves, steps left to train, the checkpoint
    it continues from, metrics.jsonl whole up to the length saved with it."""
    path = os.path.join(out, "resume.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's own errors (RuntimeError, EOFError, ...) on a cut file
        why = getattr(e, "strerror", None) or "truncated or corrupt"
        raise UserError(f"{path}: cannot be read ({why}); without it the run cannot be "
                        f"resumed") from None
    kinds = dict(step=int, checkpoint=str, clock=float, optimizer=dict, metrics_bytes=int,
                 rng=dict)  # what Run.checkpoint saves, besides the anchor
    state = state if isinstance(state, dict) else {}
    wrong = [k for k, kind in kinds.items() if type(state.get(k)) is not kind]
    if wrong:
        raise UserError(f"{path}: expected the state effopd.py saves; no valid "
                        f"{', '.join(wrong)} in it")
    done, last = state["step"], os.path.join(out, state["checkpoint"])
    if not re.fullmatch(r"step_\d+", state["checkpoint"]):
        raise UserError(f"{path}: names the checkpoint {state['checkpoint']!r}; expected a "
                        f"step_N folder of the run")
    if done >= steps:
        raise UserError(f"{out} has finished its {done} steps; pass --steps N (N > {done}) "
                        f"to train it further")
    if not os.path.isdir(last):
        raise UserError(f"{last}: missing, but resume.pt continues from this checkpoint; put it "
                        f"back to resume, or start a new run")
    check_metrics(os.path.join(out, "metrics.jsonl"), done, state["metrics_bytes"])
    return state


def restore_state(resumed: dict, optimizer, anchor: dict | None, path: str) -> None:
    """The optimizer state and EffOPD's anchor saved in path, put back in place; refused in one
    line, before anything is written, unless they are this student's (another run's resume.pt
    copied in, an edited one)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        if any(v.shape != params[i].shape for i, s in resumed["optimizer"]["state"].items()
               for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")):  # AdamW's moments
            raise ValueError("another shape")
        optimizer.load_state_dict(resumed["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise UserError(f"{path}: its optimizer state does not fit this student (another run's "
                        f"resume.pt?); without it the run cannot be resumed") from None
    saved = resumed.get("anchor")
    fits = isinstance(saved, dict) and saved.keys() == (anchor or {}).keys() and all(
        isinstance(saved[n], torch.Tensor) and saved[n].shape == b.shape
        for n, b in (anchor or {}).items())
    if anchor is not None and not fits:
        raise UserError(f"{path}: its EffOPD anchor does not fit this student's moved weights "
                        f"({len(anchor)} tensors); without it the run cannot be resumed")
    for n, b in (anchor or {}).items():
        b.copy_(saved[n])


def check_metrics(path: str, step: int, size: int) -> None:
    """Refuse a metrics.jsonl that resuming after step would splice or pad: its first size bytes
    (the length saved with the checkpoint) must be whole JSON records of steps <= step. The lines
    after them, of the steps lost, restore_run cuts off."""
    data = Path(path).read_bytes() if os.path.isfile(path) else b""
    if len(data) < size:
        raise UserError(f"{path}: {len(data)} bytes, fewer than the {size} saved with the "
                        f"checkpoint of step {step}: records were lost; restore them to resume, "
                        f"or start a new run")
    for lineno, line in enumerate(data[:size].splitlines(keepends=True), 1):
        try:
            whole = line.endswith(b"\n") and json.loads(line)["step"] <= step
        except (ValueError, TypeError, KeyError):  # not JSON, not an object, no step
            whole = False
        if not whole:
            raise UserError(f"{path}:{lineno}: expected a JSON record of step <= {step}, as saved "
                            f"with the checkpoint of step {step}, got "
                            f"{line.decode(errors='replace').strip()[:60]!r}; undo the change to "
                            f"resume, or start a new run")


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise FloatingPointError naming what unless every entry of x is finite: a run stops at the
    first NaN or inf, before anything is trained on it or saved from it."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{what} is {x.item() if x.numel() == 1 else 'NaN or inf'}")


def save_pretrained_atomically(model, tokenizer, path: str) -> None:
    """save_pretrained (safetensors) of model and tokenizer into the folder path, atomically."""
    write_atomically(path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def seconds_since(t0: float, device: str) -> float:
    """time.time() - t0, once a GPU has done the work queued on it (it runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.time() - t0


def interrupted(out: str, steps: int) -> str:
    """What Ctrl-C prints: the step it stopped in, and the command that resumes it."""
    step = min(logged_steps(os.path.join(out, "metrics.jsonl")) + 1, steps)
    if os.path.isfile(os.path.join(out, "resume.pt")):
        return f"\ninterrupted at step {step}; resume with: python effopd.py --resume " \
            f"{shlex.quote(out)}"
    return f"\ninterrupted at step {step}; no checkpoint was saved, so nothing can be resumed: " \
        f"delete {shlex.quote(out)} and start again"


def write_atomically(path: str, save) -> None:
    """save(tmp) writes a file or a folder at tmp = path.tmp, which is then renamed to path: a
    crash never leaves half of one under the real name, and an older one there is replaced only
    when the new one is complete (a kill between the two renames leaves it, whole, at path.old).
    Any failure is an OSError naming path; it leaves no tmp behind."""
    tmp, old = path + ".tmp", path + ".old"

    def remove(p: str) -> None:
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p) if os.path.exists(p) else None

    remove(tmp)  # a crashed earlier write
    try:
        save(tmp)
        if os.path.isdir(path):
            remove(old)  # a kill during an earlier remove(old) can leave one
            os.replace(path, old)  # a folder cannot be renamed over another
        os.replace(tmp, path)
    except Exception as e:  # safetensors and torch.save raise their own types on a full disk;
        # torch.save's carries the OS error (No space left on device) as its __context__
        why = next((c.strerror for c in (e, e.__context__) if isinstance(c, OSError)
                    and c.strerror), e)
        raise OSError(f"cannot write {path}: {why}") from e
    finally:
        remove(tmp)
    remove(old)


def append_line(path: str, record: dict) -> None:
    """Append record to the JSONL at path as one line of strict JSON, whole or not at all: a
    non-finite number (a geometry ratio of a zero update, the first alignment) is written as
    null; a failed write (a full disk) is cut back off, and the error names path."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in record.items()}
    line = (json.dumps(record, allow_nan=False) + "\n").encode()
    with open(path, "ab", buffering=0) as f:  # unbuffered: each write goes straight to the OS
        size = f.tell()
        try:
            done = 0
            while done < len(line):  # a write is short when the disk fills; the next one raises
                done += f.write(line[done:])
        except OSError as e:
            f.truncate(size)
            raise OSError(f"cannot write {path}: {e.strerror}") from None


def logged_steps(metrics_path: str) -> int:
    """How many training steps metrics.jsonl records (0 if it does not exist)."""
    if not os.path.isfile(metrics_path):
        return 0
    with open(metrics_path) as f:
        return sum('"train/loss"' in line for line in f)


if __name__ == "__main__":
    main()
