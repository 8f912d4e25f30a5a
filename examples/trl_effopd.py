"""
EffOPD in TRL: distill the tiny student from the tiny teacher with TRL's DistillationTrainer, once
plainly and once with effopd.EffOPDCallback, and print both accuracy curves.

DistillationTrainer (TRL 1.16) is fully on-policy: every step the student samples one completion
per prompt (plain softmax at temperature 1: top_k=0, top_p=1), the teacher scores the same tokens,
and the loss is TRL's generalized JSD over the full vocabulary; beta=1 makes it the reverse
KL(student || teacher), the loss of effopd.opd_loss. The settings are those of `effopd.py --tiny`:
128 responses per step, AdamW at a constant 1e-5, gradient clipping at 1, 64 steps; --setting smol
those of `effopd.py --smol` (SmolLM2-135M-Instruct and its chat template, 32 responses per step,
16 new tokens) at TRL's default rate, 1e-6.

Run (from the repository root or anywhere):
    python examples/trl_effopd.py                                          # one process
    torchrun --standalone --nproc_per_node 2 examples/trl_effopd.py        # two: DDP over gloo
    accelerate launch --multi_gpu --num_processes 2 examples/trl_effopd.py # the same, no GPU here
    accelerate launch --config_file examples/fsdp2.yaml examples/trl_effopd.py  # FSDP2, 2 GPUs
A stopped run goes on where it stopped: --save-every N saves a Trainer checkpoint every N steps
(EffOPD's anchor and the accuracy curve beside it), --resume starts from the newest.
Careful: `accelerate launch --num_processes 2 --cpu` starts ONE process (accelerate 1.15's CPU
launcher is single-process unless given an MPI hostfile); the first line of each run says how many.
"""
import argparse
import glob
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from trl import DistillationConfig, DistillationTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
import effopd  # noqa: E402

# per setting: the flags' defaults, and max_new_tokens (effopd.py's, as both generate and score)
SETTINGS = {"tiny": dict(batch_size=128, lr=1e-5, test_size=500, max_new_tokens=6),
            "smol": dict(batch_size=32, lr=1e-6, test_size=200, max_new_tokens=16)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = effopd.OneLineErrors(description=__doc__.strip().split("\n\n")[0],
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="tiny",
                        help="models and prompts of effopd.py --tiny, or of --smol (SmolLM2-135M-"
                             "Instruct, its chat template; python data/make_data.py --models smol)")
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts (= responses) per step, over all processes (default: tiny "
                             "128, smol 32, as effopd.py's responses per step)")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate, constant (default: tiny 1e-5, smol 1e-6, "
                             "TRL's own default)")
    parser.add_argument("--max-candidates", type=int, default=5, help="EffOPD: W+2D, W+4D, ...")
    parser.add_argument("--eval-every", type=int, default=4, help="accuracy every N steps")
    parser.add_argument("--geometry-every", type=int, default=0,
                        help="log the update's geometry every N steps (effopd.GeometryCallback); "
                             "0: off")
    parser.add_argument("--val-size", type=int, default=50, help="validation prompts (EffOPD)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="held-out test prompts (default: tiny 500, smol 200)")
    parser.add_argument("--runs", nargs="+", default=["opd", "effopd"], choices=["opd", "effopd"])
    parser.add_argument("--save-every", type=int, default=0,
                        help="a Trainer checkpoint every N steps, the newest kept; 0: none")
    parser.add_argument("--resume", action="store_true",
                        help="each run goes on from the newest checkpoint in OUT/<run>")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "trl"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, value in SETTINGS[args.setting].items():  # the flags left at None
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "max_candidates", "eval_every", "val_size", "test_size"):
        if (value := getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("geometry_every", "save_every"):
        if (value := getattr(args, name)) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (off) or at least 1, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be finite and > 0, got {args.lr}")
    for run in args.runs if args.resume else []:
        folder = os.path.join(args.out, run)
        if not last_whole_checkpoint(folder):
            parser.error(f"--resume: {folder} holds no checkpoint (they are saved with "
                         f"--save-every)")
    probe = os.path.join(args.out, f"write-test-{os.getpid()}.tmp")  # one per process
    try:
        os.makedirs(args.out, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot write there ({e.strerror}: {e.filename})")
    return args


CURVE = "accuracy_curve.json"  # AccuracyCurve's file in each checkpoint


def last_whole_checkpoint(folder: str) -> str | None:
    """The newest checkpoint-N in folder whose saving finished (AccuracyCurve writes its file
    last): a run killed while saving resumes from the one before."""
    whole = [c for c in glob.glob(os.path.join(folder, "checkpoint-*"))
             if os.path.isfile(os.path.join(c, CURVE))]
    return max(whole, key=lambda c: int(c.rsplit("-", 1)[1]), default=None)


def unwrapped(trainer) -> torch.nn.Module:
    """The student as it is trained now, without its DDP wrapper."""
    return trainer.accelerator.unwrap_model(trainer.model_wrapped)


class AccuracyCurve(TrainerCallback):
    """Greedy validation and test accuracy at step 0, every eval_every steps and at the end, on
    rank 0 (the others wait at their next collective; under FSDP every rank takes part in the
    forwards); also prints each EffOPD ladder it logs. Added after EffOPDCallback, so that it sees
    the weights EffOPD kept. The curve so far is saved in every checkpoint, and read back from the
    one a run resumes."""

    def __init__(self, trainer, tokenizer, val, test, eval_every: int, max_new_tokens: int):
        self.trainer, self.tokenizer, self.val, self.test = trainer, tokenizer, val, test
        self.max_new_tokens = max_new_tokens
        self.eval_every, self.eos = eval_every, effopd.eos_ids(tokenizer, unwrapped(trainer))
        self.curve = []  # (step, val, test, training seconds: EffOPD's validation counted)
        self.began = self.step_ended = time.time()
        self.excluded_s = 0.0  # seconds since began spent evaluating and saving, not training

    def evaluate(self, state) -> None:
        t0, model = time.time(), unwrapped(self.trainer)
        seconds = t0 - self.began - self.excluded_s
        if not (state.is_world_process_zero or effopd.is_sharded(model)):
            return
        was_training = model.training
        model.eval()
        val, test = (effopd.accuracy(model, self.tokenizer, records, self.max_new_tokens, self.eos)
                     for records in (self.val, self.test))
        model.train(was_training)
        self.curve.append((state.global_step, val, test, round(seconds, 3)))
        if state.is_world_process_zero:
            print(f"eval {state.global_step:4d} | val {val:.3f} | test {test:.3f}", flush=True)
        self.excluded_s += time.time() - t0

    def on_train_begin(self, args, state, control, **kwargs):
        self.began, self.excluded_s = time.time(), 0.0
        if state.global_step == 0:
            self.evaluate(state)
        elif state.is_world_process_zero:  # resumed: the curve saved with the checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", CURVE)
            if not os.path.isfile(path):
                sys.exit(f"trl_effopd.py: error: {path} is missing: the resumed run's accuracy "
                         f"curve is saved beside each checkpoint")
            saved = json.loads(Path(path).read_text())
            self.curve = [tuple(point) for point in saved["curve"]]
            self.began -= saved["train_s"]
        self.step_ended = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_every == 0 or state.global_step == state.max_steps:
            self.evaluate(state)
        self.step_ended = time.time()

    def on_save(self, args, state, control, **kwargs):
        now = time.time()
        self.excluded_s += now - self.step_ended  # the checkpoint's seconds: not training
        self.step_ended = now
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", CURVE)
            saved = {"curve": self.curve, "train_s": now - self.began - self.excluded_s}
            effopd.write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(saved)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and "geometry/effective_rank" in logs:
            print(f"geometry {state.global_step:4d} | effective rank "
                  f"{logs['geometry/effective_rank']:.2f} | sigma_1/||dW||_F "
                  f"{logs['geometry/spectral_ratio']:.3f} | alignment with the last "
                  f"{logs['geometry/alignment']:.3f}", flush=True)
        if state.is_world_process_zero and "effopd/kept_multiple" in logs:
            ladder = " ".join(f"{k.split('_')[-1]}:{v:.3f}" for k, v in logs.items()
                              if k.startswith("effopd/score_"))
            kept = logs["effopd/kept_multiple"]
            print(f"effopd {state.global_step:4d} | {ladder} | kept W+{kept}D"
                  f" | {logs['effopd/val_s']:.2f} s", flush=True)


def make_trainer(args, use_effopd: bool, world_size: int) -> DistillationTrainer:
    """The student, the teacher, the prompts and DistillationTrainer; EffOPD: one callback more."""
    data = os.path.join(ROOT, "data", args.setting)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data, "student"))
    student = AutoModelForCausalLM.from_pretrained(os.path.join(data, "student"))
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(data, "teacher"))
    train, val, test = (effopd.load_jsonl(os.path.join(data, f"{split}.jsonl"))
                        for split in ("train", "val", "test"))
    if tokenizer.chat_template:  # as effopd.py renders a prompt: the user turn of a chat
        train = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in train]
    if args.batch_size % world_size:
        sys.exit(f"--batch-size {args.batch_size} does not split over {world_size} processes")
    config = DistillationConfig(
        output_dir=os.path.join(args.out, "effopd" if use_effopd else "opd"),
        max_steps=args.steps, per_device_train_batch_size=args.batch_size // world_size,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        beta=1.0,                                 # reverse KL(student || teacher): the OPD loss
        temperature=1.0, top_k=0, top_p=1.0,      # on-policy: the plain softmax
        max_completion_length=args.max_new_tokens,  # effopd.py's for the setting
        bf16=False, activation_checkpointing=False,  # fp32, tiny models
        use_cpu=torch.cuda.device_count() < world_size,  # a GPU each if there are: FSDP needs them
        logging_steps=1, report_to="none", disable_tqdm=True, seed=args.seed,
        **(dict(save_strategy="steps", save_steps=args.save_every, save_total_limit=1)
           if args.save_every else dict(save_strategy="no")))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  processing_class=tokenizer,
                                  train_dataset=Dataset.from_list(train))  # its "prompt" column
    trainer.remove_callback(PrinterCallback)  # AccuracyCurve prints what matters here
    if use_effopd:  # the whole EffOPD integration: one callback, scored by validation accuracy
        eos = effopd.eos_ids(tokenizer, student)
        val_set = val[:args.val_size]
        trainer.add_callback(effopd.EffOPDCallback(
            trainer, lambda model: effopd.accuracy(model, tokenizer, val_set,
                                                   args.max_new_tokens, eos),
            max_candidates=args.max_candidates))
    trainer.add_callback(AccuracyCurve(trainer, tokenizer, val[:args.val_size],
                                       test[:args.test_size], args.eval_every,
                                       args.max_new_tokens))
    if args.geometry_every:  # Table 1's metrics of W_t - W_0, into the trainer's log
        trainer.add_callback(effopd.GeometryCallback(trainer, every=args.geometry_every))
    return trainer


def main(argv=None) -> dict[str, dict]:
    """Both runs; returns, per run, its accuracy curve and the trainer's log history."""
    args = parse_args(argv)
    import transformers
    transformers.utils.logging.set_verbosity_error()  # the curves are the whole log
    transformers.utils.logging.disable_progress_bar()
    # TRL 1.16 uses names that transformers 5.23 deprecates
    warnings.filterwarnings("ignore", category=FutureWarning)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch and torchrun
    curves, results = {}, {}
    for run in args.runs:
        trainer = make_trainer(args, run == "effopd", world_size)
        curve = next(c for c in trainer.callback_handler.callbacks if isinstance(c, AccuracyCurve))
        if trainer.is_world_process_zero():
            print(f"--- {run}: TRL DistillationTrainer, {world_size} process(es)"
                  f"{', FSDP' if trainer.is_fsdp_enabled else ''}", flush=True)
        trainer.train(resume_from_checkpoint=last_whole_checkpoint(trainer.args.output_dir)
                      if args.resume else None)
        if trainer.is_world_process_zero():
            print(f"{run}: {args.steps} steps in {curve.curve[-1][3]:.1f} s of training "
                  f"(evaluation excluded)", flush=True)
        curves[run] = curve.curve
        results[run] = {"curve": curve.curve, "log_history": trainer.state.log_history}
    if curves and int(os.environ.get("RANK", "0")) == 0:
        print("\nstep | " + " | ".join(f"{run:>6} val  test" for run in curves))
        for rows in zip(*curves.values()):
            print(f"{rows[0][0]:4d} | " + " | ".join(f"{v:10.3f} {t:.3f}" for _, v, t, _ in rows))
    return results


if __name__ == "__main__":
    main()
