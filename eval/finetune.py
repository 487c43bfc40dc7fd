"""Recovery fine-tuning with DistrAttention in the loop (the paper's protocol), on ``accelerate``.

A causal LM trains on random-order disjoint windows of ``seq_len`` tokens of a text (next-token loss); an image
classifier on a dataset ``SPEC`` as :mod:`hf_distrattn.eval.vit` reads it (cross-entropy). The attention setting
(``distr:group_size=2,...``) is applied before training, so gradients flow through the approximation (the
differentiable ``hf_distrattn::attention`` op, Triton kernels on CUDA). Training stops at ``steps`` or
``max_minutes``, whichever comes first.

Distillation (``--distill W``): the loss is ``(1 − W)·CE + W·KL(exact ‖ approximated)``, the KL between the
next-token (or class) distributions of a frozen copy of the model with exact attention (the teacher) and of the
model through the approximation, so recovery needs no labels in domain: any text will do. ``--train qk`` updates
only the query and key projections (what the approximated scores depend on); everything else stays the original's.

Evals: held-out bits/byte (LM) or top-1 (images); with ``--prompts-file`` (one instruction per line, in the chat
template of an instruction model) also the greedy answers, and their agreement with the exact model's at step 0:
``answer_agreement`` (share of prompts answered identically), ``token_agreement`` (answer tokens equal position
by position) and ``forced_agreement`` (share of the exact answers' tokens that the model predicts greedily when fed
the exact answer so far: per-token agreement without the cascade after a first flipped token, so it varies less
between settings of equal quality). ``--prompt-context-file`` puts its own chunk of ``--prompt-context-tokens``
tokens of a held-out text before each instruction: short prompts fit in the blocks that every setting scores
exactly, so only long ones test the approximation (and not only the weights). Equal greedy answers are a strict
test, and ``--precision-floor`` shows how strict: it also evaluates the exact model with bfloat16 weights. On
SmolLM2 with 1,000-token contexts that alone answers 29 of 48 prompts as the float32 model does (forced
agreement 97.9%).

Self-distillation (``--own-answers-file``, with ``--distill 1``): the training windows become the exact model's own
greedy answers to instructions, each after a chunk of the training text (:meth:`LMTask.use_own_answers`), the
kind of text the answer evals score.

Output folder: ``checkpoint-STEP/`` (accelerate state + ``trainer_state.json``, for ``--resume``), ``final/``
(``save_pretrained`` of the model and its tokenizer or image processor) and ``finetune.json`` (arguments,
environment, the eval history: exact and drop-in numbers at step 0, then the fine-tuned ones).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..settings import apply_setting, check_model, parse_settings
from .common import EvalError, environment


@dataclass
class FinetuneArgs:
    model: str
    output_dir: str
    attn: str = "distr:group_size=2"
    task: str = "auto"  # "lm", "image" or "auto" (from the model's architecture)
    text_file: str | None = None
    dataset: str | None = None
    split: str = "train"
    text_column: str = "text"
    text_template: str | None = None  # e.g. "{query}\n{response}" for an instruction dataset
    eval_text_file: str | None = None
    eval_dataset: str | None = None
    eval_split: str = "test"
    eval_limit: int | None = None  # eval windows (LM) or images
    image_column: str = "image"
    label_column: str = "label"
    seq_len: int = 2048
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    steps: int = 1000
    max_minutes: float | None = None
    eval_every: int = 0  # 0: only at the start and the end
    save_every: int = 0  # 0: only at the end
    mixed_precision: str = "auto"  # "no" or "bf16" (autocast); auto = bf16 on CUDA
    seed: int = 0
    num_workers: int = 0
    resume: bool = False
    distill: float = 0.0  # weight of the KL to the exact model's predictions (0: labels only, 1: distillation only)
    train: str = "all"  # "all" parameters, or "qk": only the query and key projections
    prompts_file: str | None = None  # instruction prompts, one per line: greedy answers compared with the exact model's
    answer_tokens: int = 32
    prompt_context_file: str | None = None  # a held-out text: each prompt is preceded by its own chunk of it
    prompt_context_tokens: int = 1000  # tokens of context per prompt (the approximation acts only on long prompts)
    precision_floor: bool = False  # also evaluate the exact model in bfloat16: what a precision change alone moves
    own_answers_file: str | None = None  # training instructions (not eval prompts): the exact model answers them
    own_answers: int = 256  # how many such training windows
    own_answer_tokens: int = 64


class TokenWindows(torch.utils.data.Dataset):
    """Disjoint windows of ``seq_len`` tokens of a 1-D id tensor (the tail that does not fill one is dropped)."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        if ids.numel() < seq_len:
            raise EvalError(f"the training text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return self.ids.numel() // self.seq_len

    def __getitem__(self, i: int) -> dict:
        window = self.ids[i * self.seq_len : (i + 1) * self.seq_len]
        return {"input_ids": window, "labels": window}


class EpochSampler(torch.utils.data.Sampler):
    """A permutation per epoch from ``(seed, epoch)``: the data order is a function of the step (resumable)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


def detect_task(model: str) -> str:
    from transformers import AutoConfig

    check_model(model)
    try:
        architectures = AutoConfig.from_pretrained(model).architectures or []
    except OSError as error:
        raise EvalError(f"cannot load model {model!r}: {str(error).splitlines()[0]}") from None
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "lm"
    if any(a.endswith("ForImageClassification") for a in architectures):
        return "image"
    raise EvalError(f"cannot tell the task of {model!r} (architectures {architectures}); pass --task lm|image")


def _lines(path: str) -> list[str]:
    """The non-empty lines of a prompts file, stripped."""
    if not Path(path).is_file():
        raise EvalError(f"prompts file not found: {path}")
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise EvalError(f"prompts file {path} holds no prompt")
    return lines


class LMTask:
    """Causal LM: training windows; eval = held-out bits per byte (:func:`.eval.perplexity.evaluate_perplexity`)."""

    def __init__(self, args: FinetuneArgs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .perplexity import load_text, scored_bytes, windows

        self.args = args
        text = load_text(args.text_file, args.dataset, args.split, args.text_column, args.text_template)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.train = TokenWindows(torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids), args.seq_len)
        self.has_eval = bool(args.eval_text_file or args.eval_dataset)
        if self.has_eval:
            eval_text = load_text(args.eval_text_file, args.eval_dataset, args.eval_split, args.text_column)
            self.eval_ids = torch.tensor(self.tokenizer(eval_text, add_special_tokens=False).input_ids)
            spans = windows(self.eval_ids.numel(), args.seq_len, args.seq_len, args.eval_limit)
            self.eval_bytes = scored_bytes(self.tokenizer, self.eval_ids, spans)
        self.prompts = self._prompts(args.prompts_file) if args.prompts_file else []
        self.has_eval = self.has_eval or bool(self.prompts)
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def _prompts(self, path: str) -> list[torch.Tensor]:
        """The prompts' token ids, in the tokenizer's chat template where it has one (instruction models)."""
        lines = _lines(path)
        if self.args.prompt_context_file:
            lines = [f"{context}\n\n{line}" for context, line in zip(self._contexts(len(lines)), lines, strict=True)]
        if getattr(self.tokenizer, "chat_template", None):  # the template's text carries its special tokens
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": line}], tokenize=False,
                                                        add_generation_prompt=True) for line in lines]
            return [torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
        return [torch.tensor(self.tokenizer(line).input_ids) for line in lines]

    @torch.no_grad()
    def use_own_answers(self, model) -> None:
        """Self-distillation data: replace the training windows with ``own_answers`` windows, each a chunk of the
        training text, then one of ``own_answers_file``'s instructions (in the chat template where there is one),
        then the exact ``model``'s greedy answer of exactly ``own_answer_tokens`` tokens (EOS suppressed), so
        that the KL is taught on the kind of text the answers are (instructions after a long context) without any
        in-domain corpus. The chunks are consecutive and fill each window to ``seq_len``; no instruction may be
        an eval prompt."""
        args, tok = self.args, self.tokenizer
        lines = _lines(args.own_answers_file)
        if args.prompts_file and set(lines) & set(_lines(args.prompts_file)):
            raise EvalError(f"{args.own_answers_file} shares instructions with the eval prompts {args.prompts_file}")
        prefix, suffix = "", ""
        if getattr(tok, "chat_template", None):
            prefix, suffix = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                                     add_generation_prompt=True).split("\x00")
        head = tok(prefix, add_special_tokens=False).input_ids
        tails = [tok("\n\n" + line + suffix, add_special_tokens=False).input_ids for line in lines]
        text_ids, position, rows = self.train.ids.tolist(), 0, []
        for i in range(args.own_answers):
            tail = tails[i % len(tails)]
            n_context = args.seq_len - args.own_answer_tokens - len(head) - len(tail)
            if n_context < 1:
                raise EvalError(f"seq_len={args.seq_len} leaves no context before an instruction and "
                                f"{args.own_answer_tokens} answer tokens")
            if position + n_context > len(text_ids):
                position = 0
            rows.append(head + text_ids[position:position + n_context] + tail)
            position += n_context
        device, pad = next(model.parameters()).device, tok.pad_token_id or 0
        n, windows = args.own_answer_tokens, []
        for start in range(0, len(rows), args.batch_size):
            batch = torch.tensor(rows[start:start + args.batch_size], device=device)
            windows.append(model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=pad).cpu())
        self.train = TokenWindows(torch.cat(windows).flatten(), args.seq_len)

    def _contexts(self, count: int) -> list[str]:
        """``count`` consecutive, disjoint chunks of ``prompt_context_tokens`` tokens of the context file, as text."""
        path, n = self.args.prompt_context_file, self.args.prompt_context_tokens
        if not Path(path).is_file():
            raise EvalError(f"prompt context file not found: {path}")
        ids = self.tokenizer(Path(path).read_text(), add_special_tokens=False).input_ids
        if len(ids) < count * n:
            raise EvalError(f"prompt context file {path} holds {len(ids)} tokens; {count} prompts × "
                            f"{n} tokens of context need {count * n}")
        return [self.tokenizer.decode(ids[i * n:(i + 1) * n]) for i in range(count)]

    def collate(self, rows: list[dict]) -> dict:
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Held-out bits/byte (with an eval text) and greedy ``answer_tokens``-token answers to the prompts (with a
        prompts file; :func:`_evaluate` compares them with the exact model's)."""
        from .perplexity import evaluate_perplexity

        metrics = {}
        if self.args.eval_text_file or self.args.eval_dataset:
            seq_len = self.args.seq_len
            r = evaluate_perplexity(model, self.eval_ids, seq_len, seq_len, self.args.eval_limit,
                                    n_bytes=self.eval_bytes)
            metrics |= {"bits_per_byte": r.bits_per_byte, "perplexity": r.perplexity}
        if self.prompts:
            device = next(model.parameters()).device
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            metrics["answers"] = [
                model.generate(ids[None].to(device), max_new_tokens=self.args.answer_tokens, do_sample=False,
                               pad_token_id=pad)[0, ids.numel():].tolist() for ids in self.prompts]
        return metrics

    @torch.no_grad()
    def forced_agreement(self, model, answers: list[list[int]]) -> float:
        """Share of the reference ``answers``' tokens that ``model``, fed each prompt and the answer so far (teacher
        forcing), predicts as its greedy next token: agreement per position, without the cascade of a free-running
        answer, where one flipped token changes everything after it."""
        device = next(model.parameters()).device
        hits = total = 0
        for ids, answer in zip(self.prompts, answers, strict=True):
            if not answer:
                continue
            sequence = torch.cat([ids, torch.tensor(answer[:-1], dtype=ids.dtype)])[None].to(device)
            predicted = model(sequence).logits[0, ids.numel() - 1:].argmax(-1).cpu()
            hits += int((predicted == torch.tensor(answer)).sum())
            total += len(answer)
        return hits / max(1, total)

    def save(self, model, path: str) -> None:
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class ImageTask:
    """Image classifier: a datasets image/label table, top-1 accuracy."""

    def __init__(self, args: FinetuneArgs):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from .vit import load_images

        self.args = args
        if args.dataset is None:
            raise EvalError("image fine-tuning needs --dataset (parquet file, image folder or hub NAME[:SPLIT])")
        self.train = load_images(args.dataset, None, args.image_column, args.label_column)
        self.has_eval = args.eval_dataset is not None
        if self.has_eval:
            self.eval_rows = load_images(args.eval_dataset, args.eval_limit, args.image_column, args.label_column)
        self.processor = AutoImageProcessor.from_pretrained(args.model)
        self.model = AutoModelForImageClassification.from_pretrained(args.model, dtype=torch.float32)

    def collate(self, rows: list[dict]) -> dict:
        images = [r[self.args.image_column].convert("RGB") for r in rows]
        return {"pixel_values": self.processor(images, return_tensors="pt")["pixel_values"],
                "labels": torch.tensor([r[self.args.label_column] for r in rows])}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        correct = 0
        for start in range(0, len(self.eval_rows), 64):
            batch = self.collate([self.eval_rows[i] for i in range(start, min(start + 64, len(self.eval_rows)))])
            logits = model(pixel_values=batch["pixel_values"].to(device, dtype)).logits
            correct += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
        return {"top1": correct / len(self.eval_rows)}

    def save(self, model, path: str) -> None:
        model.save_pretrained(path)
        self.processor.save_pretrained(path)


def _evaluate(task, model, accelerator, label: str, step: int, history: list) -> None:
    """Append ``{"step", "setting", metrics...}`` to ``history`` and print it. Evals run in the model's float32
    (no autocast), so that the exact, drop-in and fine-tuned numbers compare at one precision; only the
    ``--precision-floor`` entry is given a bfloat16 copy, on purpose."""
    if not task.has_eval:
        return
    was_training = model.training
    model.eval()
    bare = accelerator.unwrap_model(model)
    metrics = task.evaluate(bare)
    if "answers" in metrics and history:  # agreement with the exact model's answers (the first entry's)
        reference = history[0]["answers"]
        pairs = list(zip(metrics["answers"], reference, strict=True))
        metrics["answer_agreement"] = sum(a == b for a, b in pairs) / len(pairs)
        metrics["token_agreement"] = (sum(x == y for a, b in pairs for x, y in zip(a, b, strict=False))
                                      / max(1, sum(max(len(a), len(b)) for a, b in pairs)))
        metrics["forced_agreement"] = task.forced_agreement(bare, reference)
    model.train(was_training)
    entry = {"step": step, "setting": label, **metrics}
    history.append(entry)
    accelerator.print(json.dumps({k: v for k, v in entry.items() if k != "answers"}))


def distillation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(softmax(target) ‖ softmax(logits))`` along the last dim, in float32."""
    log_p = torch.log_softmax(target.float(), -1)
    return (log_p.exp() * (log_p - torch.log_softmax(logits.float(), -1))).sum(-1).mean()


def finetune(args: FinetuneArgs) -> dict:
    """Fine-tune ``args.model`` with attention ``args.attn``; returns the ``finetune.json`` payload."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    ((spec, name, config),) = parse_settings([args.attn])
    task_kind = detect_task(args.model) if args.task == "auto" else args.task
    if task_kind not in ("lm", "image"):
        raise EvalError(f"--task must be lm, image or auto, got {args.task!r}")
    precision = args.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    if precision not in ("no", "bf16"):
        raise EvalError(f"--mixed-precision must be auto, no or bf16, got {precision!r}")
    if not 0 <= args.distill <= 1:
        raise EvalError(f"--distill must be a weight in [0, 1], got {args.distill}")
    if args.train not in ("all", "qk"):
        raise EvalError(f"--train must be all or qk, got {args.train!r}")
    accelerator = Accelerator()  # autocast is ours (train steps only), so evals stay in float32
    set_seed(args.seed)
    task = (LMTask if task_kind == "lm" else ImageTask)(args)
    model = task.model
    out = Path(args.output_dir)
    start_step, elapsed, history = 0, 0.0, []
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if args.resume else []
    if args.resume and not checkpoints:
        raise EvalError(f"--resume: no checkpoint-* folder in {out}")

    model.to(accelerator.device)
    if not checkpoints:  # step-0 numbers: the exact model (in bfloat16 too: the floor) and the drop-in swap
        _evaluate(task, model, accelerator, "exact (before fine-tuning)", 0, history)
        if args.precision_floor:
            _evaluate(task, copy.deepcopy(model).to(torch.bfloat16), accelerator, "exact in bfloat16 (the floor)", 0,
                      history)
    if args.own_answers_file:  # the exact model writes the training windows: their time counts as training time
        if task_kind != "lm":
            raise EvalError("--own-answers-file needs a causal LM")
        started = time.perf_counter()
        task.use_own_answers(model.eval())
        elapsed += time.perf_counter() - started
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if args.distill else None  # exact attention
    apply_setting(model, name, config)
    if not checkpoints:
        _evaluate(task, model, accelerator, f"{spec} drop-in", 0, history)
    if args.train == "qk":
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter_name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "query", "key"))
        if not any(p.requires_grad for p in model.parameters()):
            raise EvalError("--train qk: the model has no q_proj/k_proj (or query/key) projections")

    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2]
    no_decay = [p for n, p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    sampler = EpochSampler(len(task.train), args.seed)
    loader = torch.utils.data.DataLoader(task.train, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=task.collate, num_workers=args.num_workers)
    if len(loader) == 0:
        raise EvalError(f"batch_size={args.batch_size} is larger than the training set ({len(task.train)} samples)")
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        start_step, elapsed, history = state["step"], state["elapsed_s"], state["history"]
        accelerator.print(f"resumed from {checkpoints[-1]} at step {start_step}")

    def save_checkpoint(step: int) -> None:
        path = out / f"checkpoint-{step}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            state = {"step": step, "elapsed_s": elapsed, "history": history}
            (path / "trainer_state.json").write_text(json.dumps(state, indent=2))

    model.train()
    step, losses = start_step, []
    budget = math.inf if args.max_minutes is None else 60 * args.max_minutes
    bar = tqdm(total=args.steps, initial=step, desc=f"finetune {spec}", disable=not accelerator.is_local_main_process)
    while step < args.steps and elapsed < budget:
        epoch, offset = divmod(step, len(loader))
        sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, offset) if offset else loader
        started = time.perf_counter()
        for batch in batches:
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                output = model(**batch)
                loss = output.loss
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    loss = (1 - args.distill) * loss + args.distill * distillation_loss(output.logits, target)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            elapsed += time.perf_counter() - started  # training time: data and steps, not evals or saves
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                _evaluate(task, model, accelerator, f"{spec} fine-tuned", step, history)
            if args.save_every and step % args.save_every == 0:
                save_checkpoint(step)
            if step >= args.steps or elapsed >= budget:
                break
            started = time.perf_counter()
    bar.close()
    _evaluate(task, model, accelerator, f"{spec} fine-tuned", step, history)
    save_checkpoint(step)
    unwrapped = accelerator.unwrap_model(model)
    payload = {"task": f"finetune-{task_kind}", "args": asdict(args), "steps": step, "train_seconds": elapsed,
               "final_loss": losses[-1] if losses else None, "environment": environment(str(accelerator.device)),
               "history": history}
    if accelerator.is_main_process:
        task.save(unwrapped, str(out / "final"))
        (out / "finetune.json").write_text(json.dumps(payload, indent=2))
    return payload


def format_history(payload: dict) -> str:
    lines = [f"{payload['task']}: {payload['steps']} steps in {payload['train_seconds']:.0f} s of training", "",
             "| step | setting | metric |", "|---:|---|---|"]
    for entry in payload["history"]:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k not in ("step", "setting", "answers"))
        lines.append(f"| {entry['step']} | {entry['setting']} | {metrics} |")
    return "\n".join(lines)
