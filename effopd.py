"""
effopd: on-policy distillation (OPD) of a student LLM from a teacher, its EffOPD acceleration, and
the geometry of the weight updates, in one file.

OPD. The student samples responses y ~ pi_student(.|x) to training prompts; the teacher scores the
same token ids; the student minimizes the token-level reverse KL on its own samples:

    kl_t = sum_v pi_student(v|x,y<t) * (log pi_student(v|x,y<t) - log pi_teacher(v|x,y<t))
    loss = mean of kl_t over response tokens (the first EOS counts; prompt, padding and all after
           the first EOS do not)

i.e. KL(student || teacher), over the full vocabulary, in fp32. Like the EffOPD paper and the public
OPD trainers, we keep only this immediate per-token term and drop the gradient through sampling.

EffOPD. After the optimizer step at t = 1, 2, 4, 8, ..., extrapolate along the update direction
D = W_t - B (B: the weights kept at the previous trigger, at first the initial student) and try
W_t + 2D, W_t + 4D, ... (at most 5), keeping a candidate only while its validation accuracy is
strictly higher than the best so far. Only attention and MLP weights move.

Geometry. For every weight matrix, dW = W_t - W_0: spectral norm, sigma_1/||dW||_F, effective rank,
top-1% subspace norm ratio, and the overlap of top-k singular subspaces between two updates. The
diagnostics of "On the Geometry of On-Policy Distillation": the share of bf16 weights an update
leaves unchanged, the share of its energy inside the base weight's top singular subspaces and how
far those turn; and the top-k / bottom-k singular parts of an update (EffOPD paper, Fig. 4).

Simplifications, all deliberate: one device (a GPU or the CPU); rollouts from a plain KV-cached
sampler in the training process (no vLLM); one optimizer step per batch of rollouts (scored in
micro-batches whose gradients accumulate), at a constant learning rate; no sequence packing; the
teacher in bf16 and the student in fp32 under bf16 autocast on a GPU, everything fp32 on the CPU.
Where EffOPD departs from the official code: candidates are scored by greedy decoding (the official
code samples one response per prompt at temperature 1, a +-0.07 standard error on 50 prompts, so
that "strictly better" is mostly noise), and Qwen3's q_norm/k_norm stay fixed like every other norm
(the official substring match on "attn" would move them); q/k/v biases move with their weights.

Run:
    python effopd.py --tiny              # tiny models, CPU, ~15 s (see README)
    python effopd.py                     # Qwen2.5-0.5B-Instruct <- Qwen2.5-1.5B-Instruct, one GPU
    python effopd.py --tiny --effopd     # with EffOPD
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

# ------------------------------------------------------------------------------------------------
# Configuration


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # models and data
    student: str = arg("Qwen/Qwen2.5-0.5B-Instruct", "student model: hub name or local path")
    teacher: str = arg("Qwen/Qwen2.5-1.5B-Instruct", "teacher model: hub name or local path")
    train: str = arg("data/arith/train.jsonl", "training prompts (JSONL with prompt, answer)")
    val: str = arg("data/arith/val.jsonl", "validation set: EffOPD acceptance, --eval-every")
    test: str = arg("data/arith/test.jsonl", "held-out test set, reported only")
    val_size: int = arg(50, "validation examples used (the first N of --val)")
    test_size: int = arg(500, "test examples used (the first N of --test)")
    # training
    loss: str = arg("opd", "opd: full-vocabulary reverse KL | sampled: per-token policy "
                    "gradient, advantage log pi_teacher - log pi_student | grpo: answer reward")
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
    # evaluation and output
    eval_every: int = arg(8, "validation and test accuracy every N steps (and at 0 and the end)")
    eval_batch_size: int = arg(64, "prompts per greedy-decoding batch in evaluation")
    out: str = arg("", "run folder (default runs/<loss>[-effopd]-seed<seed>)")
    save_checkpoints: bool = arg(True, "save the student at steps 0, 1, 2, 4, 8, ... and the end")
    seed: int = arg(0, "seed for data order, sampling and everything else")
    device: str = arg("", "cuda or cpu (default: cuda when available)")
    tiny: bool = arg(False, "the tiny CPU setting: data/tiny models and data (see TINY)")


# The tiny CPU setting: character-level Qwen2 models made by data/make_data.py, task "a+b=".
TINY = dict(student="data/tiny/student", teacher="data/tiny/teacher",
            train="data/tiny/train.jsonl", val="data/tiny/val.jsonl", test="data/tiny/test.jsonl",
            batch_size=64, group_size=2, max_new_tokens=6, lr=1e-5, steps=64,
            micro_batch_size=128, eval_every=4, device="cpu")


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                help=f.metadata["help"])
    args = parser.parse_args(argv)
    if args.tiny:  # tiny defaults, then the user's flags on top
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    if args.loss not in ("opd", "sampled", "grpo"):
        parser.error(f"--loss must be opd, sampled or grpo, not {args.loss!r}")
    return Config(**vars(args))


class UserError(Exception):
    """Bad input (files, models, settings): reported as one line, with a non-zero exit."""


# ------------------------------------------------------------------------------------------------
# Data: JSONL records {"prompt": str, "answer": int}, graded by the last number in the response


def load_jsonl(path: str) -> list[dict]:
    """Read prompt/answer records; a bad line is reported by file and line number."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            answer = record.get("answer") if isinstance(record, dict) else None
            if isinstance(answer, str) and re.fullmatch(r"\s*-?\d+\s*", answer):
                answer = int(answer)
            if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                    and isinstance(answer, int) and not isinstance(answer, bool)):
                raise UserError(f"{path}:{lineno}: expected {{\"prompt\": string, \"answer\": "
                                f"integer}}, got {line.strip()[:80]}")
            records.append({"prompt": record["prompt"], "answer": answer})
    if not records:
        raise UserError(f"{path}: no records")
    return records


def extract_answer(text: str) -> int | None:
    """The last integer in the text ('1,234' counts as 1234; the '-' in '5-3' is not a sign)."""
    numbers = re.findall(r"(?<!\d)-?\d+", re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return int(numbers[-1]) if numbers else None


# ------------------------------------------------------------------------------------------------
# The OPD loss: reverse KL(student || teacher) over the full vocabulary, in bounded memory


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


def grpo_loss(student_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor) -> torch.Tensor:
    """On-policy GRPO with one update per batch (no ratio to clip): -mean_t A * log p_s(y_t)."""
    return -masked_mean(advantages[:, None] * token_logprobs(student_logits, tokens), mask)


# ------------------------------------------------------------------------------------------------
# Models, prompts, sampling and scoring


def load_model_and_tokenizer(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    return model, tokenizer


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """OPD compares the two models token by token: they must map text to the same ids."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        differ = sorted(set(s.items()) ^ set(t.items()), key=str)[:3]
        raise UserError(f"student and teacher tokenizers differ ({len(s)} vs {len(t)} tokens; "
                        f"e.g. {differ}); OPD needs one shared tokenizer")


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
            token = torch.multinomial((logits / temperature).softmax(-1), 1).squeeze(-1)
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


@torch.no_grad()
def accuracy(model, tokenizer, records: list[dict], max_new_tokens: int, eos: list[int],
             batch_size: int = 64) -> float:
    """Share of records whose greedy response ends in the right number (deterministic)."""
    correct = 0
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        ids, _, mask = sample(model, render_prompts(tokenizer, [r["prompt"] for r in batch]),
                              max_new_tokens, eos, tokenizer.pad_token_id, len(tokenizer), 0.0)
        response = ids[:, -mask.shape[1]:]
        for r, row, m in zip(batch, response, mask):
            text = tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
            correct += extract_answer(text) == r["answer"]
    return correct / len(records)


# ------------------------------------------------------------------------------------------------
# EffOPD: extrapolation along the update direction, kept only when validation improves

SCOPE = ("attn", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "gate_proj", "up_proj", "down_proj")


def in_effopd_scope(name: str) -> bool:
    """Attention and MLP weights move; embeddings, lm_head and all norms (Qwen3's q_norm and
    k_norm sit inside self_attn) never do."""
    return any(s in name for s in SCOPE) and "norm" not in name


def effopd_extrapolate(model: torch.nn.Module, anchor: dict[str, torch.Tensor], score_fn,
                       max_candidates: int = 5) -> list[dict]:
    """Try W_t + 2D, W_t + 4D, ... with D = W_t - anchor; keep the best strictly-improving one.

    The official update W := W + f (W - B), f = 2, then f := f / (1 + f) after each acceptance,
    walks exactly W_t + 2D, W_t + 4D, W_t + 6D, ...; we compute W_t + m D directly, which is the
    same point without the rounding drift. score_fn(model) -> float, higher is better. At the
    first candidate that does not beat the best so far, the best weights are restored. anchor
    (parameter name -> tensor, on any device) is set to the kept weights. Returns one entry per
    evaluation: {"multiple": m, "score": s, "kept": bool}, m = 0 for the unextrapolated W_t,
    kept = it beat every earlier score; the model ends at the last kept multiple.
    """
    params = dict(model.named_parameters())
    start = {n: params[n].detach().to(b.device, copy=True) for n, b in anchor.items()}  # W_t

    @torch.no_grad()
    def move_to(multiple: int):
        for n, w in start.items():
            params[n].copy_(w + multiple * (w - anchor[n]) if multiple else w)

    best = score_fn(model)
    history, kept_multiple = [{"multiple": 0, "score": best, "kept": True}], 0
    for multiple in range(2, 2 * max_candidates + 1, 2):
        move_to(multiple)
        score = score_fn(model)
        history.append({"multiple": multiple, "score": score, "kept": score > best})
        if score <= best:
            break
        best, kept_multiple = score, multiple
    move_to(kept_multiple)
    with torch.no_grad():
        for n, b in anchor.items():
            b.copy_(params[n])
    return history


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
    Left vectors span the output side of dW x; pass delta_a.T, delta_b.T for the input side."""
    if delta_a.shape != delta_b.shape or delta_a.dim() != 2:
        raise ValueError(f"need two 2-D matrices of one shape, got {tuple(delta_a.shape)} and "
                         f"{tuple(delta_b.shape)}")
    if not 1 <= k <= min(delta_a.shape):
        raise ValueError(f"k must be in [1, {min(delta_a.shape)}], got {k}")
    u_a = torch.linalg.svd(delta_a.detach().double(), full_matrices=False)[0][:, :k]  # (m, k)
    u_b = torch.linalg.svd(delta_b.detach().double(), full_matrices=False)[0][:, :k]
    return ((u_a.T @ u_b).square().sum() / k).item()


def top_singular_subspaces(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the top-k left and right singular subspaces of w (m, n): (m, k), (n, k).

    From the eigenvectors of the smaller Gram matrix (w^T w or w w^T, N = min(m, n)): one N x N
    eigh instead of a full SVD, 2-4x faster on a CPU for Qwen2.5's matrix shapes. Squaring the
    matrix costs precision only in the smallest singular values, which this never uses. fp32
    (float64 stays float64).
    """
    if w.dim() != 2 or not 1 <= k <= min(w.shape):
        raise ValueError(f"need a 2-D matrix and k in [1, min(m, n)], got {tuple(w.shape)}, k={k}")
    a = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    wide = a.shape[1] > a.shape[0]
    a = a.T if wide else a  # (M, N), M >= N
    v = torch.linalg.eigh(a.T @ a)[1][:, -k:]  # (N, k): eigenvalues ascend, the top k are last
    u = torch.linalg.qr(a @ v)[0]  # (M, k): span(a v_k) = span(u_k), made orthonormal
    return (v, u) if wide else (u, v)


def unchanged_fraction(w_base: torch.Tensor, w_tuned: torch.Tensor,
                       dtype: torch.dtype = torch.bfloat16) -> float:
    """Share of entries equal after casting both matrices to dtype (paper 2, bf16: SFT leaves 8.1%
    of the weights unchanged, OPD 51.6%, RLVR 77.2%). An fp32 update below half a bf16 step
    rounds away: fp32 checkpoints must be cast before they are compared."""
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
    principal_overlap."""
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"shapes differ: {tuple(w_base.shape)} and {tuple(w_tuned.shape)}")
    u_base = (base_subspaces if base_subspaces is not None
              else top_singular_subspaces(w_base, k))[0]  # (m, k)
    u_tuned = top_singular_subspaces(w_tuned, k)[0].to(u_base.dtype)
    return max(0.0, 1.0 - ((u_base.T @ u_tuned).square().sum() / k).item())  # no -1e-7 round-off


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
# Checkpoints and logging


def save_checkpoint(model, tokenizer, path: str) -> None:
    """save_pretrained (safetensors) into path.tmp, then rename: a crash never leaves half a
    checkpoint under the real name, and an older one at that name is replaced only when the new one
    is complete (a crash between the two renames leaves it, whole, at path.old)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def is_power_of_two(t: int) -> bool:
    return t > 0 and t & (t - 1) == 0


def log(path: str, record: dict) -> None:
    with open(path, "a") as f:  # one line per record, on disk at once
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------
# Training


def train(cfg: Config) -> list[dict]:
    """Run OPD (or the sampled-token / GRPO variants), optionally with EffOPD; return the metrics
    records, which are also appended to <out>/metrics.jsonl."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    train_set, val_set, test_set = load_jsonl(cfg.train), load_jsonl(cfg.val), load_jsonl(cfg.test)
    if len(val_set) < cfg.val_size:
        raise UserError(f"{cfg.val}: {len(val_set)} records, but --val-size asks for "
                        f"{cfg.val_size}")
    val_set, test_set = val_set[:cfg.val_size], test_set[:cfg.test_size]
    if len(train_set) < cfg.batch_size:
        raise UserError(f"{cfg.train}: {len(train_set)} records, fewer than --batch-size "
                        f"{cfg.batch_size}")

    # The student trains in fp32 (bf16 weights would round lr-1e-6 updates away) under bf16
    # autocast on a GPU; the frozen teacher is held in bf16 there.
    student, tokenizer = load_model_and_tokenizer(cfg.student, torch.float32, device)
    teacher, teacher_tok = load_model_and_tokenizer(
        cfg.teacher, torch.bfloat16 if bf16 else torch.float32, device)
    check_same_tokenizer(tokenizer, teacher_tok)
    teacher.eval().requires_grad_(False)
    vocab = len(tokenizer)  # real tokens; checkpoints may pad their logit width beyond it
    for name, m in (("student", student), ("teacher", teacher)):
        if m.get_output_embeddings().weight.shape[0] < vocab:
            raise UserError(f"{name} has {m.get_output_embeddings().weight.shape[0]} logits, "
                            f"fewer than the tokenizer's {vocab} tokens")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = eos_ids(tokenizer, student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    out = cfg.out or (f"runs/{'tiny-' if cfg.tiny else ''}{cfg.loss}"
                      f"{'-effopd' if cfg.effopd else ''}-seed{cfg.seed}")
    if os.path.isdir(out) and any(d.startswith("step_") for d in os.listdir(out)):
        raise UserError(f"{out} holds checkpoints of an earlier run; pass another --out or "
                        f"delete it (mixing two runs' checkpoints would corrupt analyze.py)")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=2)
    metrics_path = os.path.join(out, "metrics.jsonl")
    open(metrics_path, "w").close()
    history, last_checkpoint, clock = [], None, 0.0  # clock: training + EffOPD seconds

    def evaluate(step: int) -> None:
        record = {"step": step, "time/train_s": round(clock, 3),
                  "eval/val_acc": accuracy(student, tokenizer, val_set, cfg.max_new_tokens, eos,
                                           cfg.eval_batch_size),
                  "eval/test_acc": accuracy(student, tokenizer, test_set, cfg.max_new_tokens, eos,
                                            cfg.eval_batch_size)}
        print(f"eval {step:4d} | val {record['eval/val_acc']:.3f} | "
              f"test {record['eval/test_acc']:.3f}")
        history.append(record)
        log(metrics_path, record)

    def checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        if cfg.save_checkpoints:
            last_checkpoint = os.path.join(out, f"step_{step:06d}")
            save_checkpoint(student, tokenizer, last_checkpoint)

    def val_score(model) -> float:
        with autocast:
            return accuracy(model, tokenizer, val_set, cfg.max_new_tokens, eos, cfg.eval_batch_size)

    anchor = {n: p.detach().to(cfg.anchor_device, copy=True)  # B: the initial student
              for n, p in student.named_parameters() if in_effopd_scope(n)} if cfg.effopd else None
    with autocast:
        evaluate(0)
    checkpoint(0)
    for step in range(1, cfg.steps + 1):
        t0 = time.time()
        # 1. Rollouts: group_size samples per prompt, from the student as it is now.
        batch = random.sample(train_set, cfg.batch_size)
        batch = [r for r in batch for _ in range(cfg.group_size)]  # group after group
        with autocast:
            ids, attention_mask, mask = sample(
                student, render_prompts(tokenizer, [r["prompt"] for r in batch]),
                cfg.max_new_tokens, eos, tokenizer.pad_token_id, vocab, cfg.temperature)
        n_response = mask.shape[1]
        tokens = ids[:, -n_response:]  # (B, R): the response ids, scored by both models
        if cfg.loss == "grpo":  # the reward: is the last number of the response the answer?
            texts = tokenizer.batch_decode(torch.where(mask, tokens, tokenizer.pad_token_id),
                                           skip_special_tokens=True)
            rewards = torch.tensor([float(extract_answer(t) == r["answer"])
                                    for t, r in zip(texts, batch)], device=ids.device)
            advantages = grpo_advantages(rewards, cfg.group_size)  # (B,)
        # 2. Both models score the same ids, micro-batch by micro-batch; each micro-batch's loss is
        # weighted by its share of the scored tokens, so the gradients add up to the gradient of
        # the mean over the whole batch.
        n_scored, loss_sum, kl_sum = mask.sum().clamp(min=1), 0.0, 0.0
        for i in range(0, len(batch), cfg.micro_batch_size):
            mb = slice(i, i + cfg.micro_batch_size)
            with autocast:
                student_logits = response_logits(student, ids[mb], attention_mask[mb], n_response,
                                                 vocab)  # (b, R, V)
                with torch.no_grad():
                    teacher_logits = response_logits(teacher, ids[mb], attention_mask[mb],
                                                     n_response, vocab)
            # 3. The loss; the mean KL to the teacher is logged whatever the loss.
            with torch.set_grad_enabled(cfg.loss == "opd"):
                kl = opd_loss(student_logits, teacher_logits, mask[mb], cfg.chunk_size)
            if cfg.loss == "opd":
                loss = kl
            elif cfg.loss == "sampled":
                loss = sampled_token_loss(student_logits, teacher_logits, tokens[mb], mask[mb])
            else:
                loss = grpo_loss(student_logits, tokens[mb], mask[mb], advantages[mb])
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at step {step}; stopped before the update. "
                                f"Last good checkpoint: {last_checkpoint or 'none saved'}")
            weight = mask[mb].sum() / n_scored  # this micro-batch's share of the scored tokens
            weighted = loss * weight
            weighted.backward()
            loss_sum, kl_sum = loss_sum + weighted.item(), kl_sum + (kl * weight).item()
            del student_logits, teacher_logits, loss, kl, weighted  # free before the next forward
        # 4. One optimizer step.
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()  # the GPU works asynchronously: wait before reading the clock
        step_s = time.time() - t0
        record = {"step": step, "train/loss": loss_sum, "train/kl": kl_sum,
                  "train/response_len": mask.sum(1).float().mean().item(),
                  "time/step_s": round(step_s, 3)}
        if on_gpu:
            record["gpu/peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"step {step:4d}/{cfg.steps} | loss {record['train/loss']:8.4f} | "
              f"kl {record['train/kl']:.4f} | len {record['train/response_len']:5.1f} | "
              f"{step_s:.2f} s")
        # 5. EffOPD at t = 1, 2, 4, 8, ...: extrapolate, keep only what validation accepts.
        if cfg.effopd and is_power_of_two(step):
            t1 = time.time()
            trials = effopd_extrapolate(student, anchor, val_score, cfg.max_candidates)
            kept = max(h["multiple"] for h in trials if h["kept"])
            record.update({"effopd/trials": trials, "effopd/kept_multiple": kept,
                           "effopd/val_s": round(time.time() - t1, 3)})
            print(f"effopd {step:4d} | " + " ".join(
                f"{h['multiple']:+d}D:{h['score']:.3f}{'*' if h['kept'] else ''}" for h in trials)
                + f" | kept W+{kept}D | {record['effopd/val_s']:.2f} s")
        clock += time.time() - t0
        record["time/train_s"] = round(clock, 3)
        history.append(record)
        log(metrics_path, record)
        if is_power_of_two(step) or step == cfg.steps:
            checkpoint(step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with autocast:
                evaluate(step)
    if on_gpu:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"done: {out}")
    return history


def main(argv=None) -> None:
    cfg = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # one line per step is the whole log
    try:
        train(cfg)
    except UserError as e:
        sys.exit(f"effopd: error: {e}")


if __name__ == "__main__":
    main()
