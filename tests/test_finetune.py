"""``hf-distrattn finetune`` on tiny models (CPU, through the differentiable reference): it learns, the checkpoint
resumes to the same weights, the saved model reproduces its logged eval, bad arguments give one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_distrattn.cli import main
from hf_distrattn.eval.prepare_training_data import kjv_training_text


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, shared):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-lm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)).save_pretrained(path)
    AutoTokenizer.from_pretrained(shared / "models/ref-llama-bytes").save_pretrained(path)
    text = path / "train.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    return path, text


def run(tiny_lm, out, *extra):
    path, text = tiny_lm
    return main(["finetune", "--model", str(path), "--text-file", str(text), "--eval-text-file", str(text),
                 "--eval-limit", "2", "--seq-len", "48", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "0",
                 "--attn", "distr:group_size=2,block_size=16,grouping=lsh", "--output-dir", str(out), *extra])


def test_lm_learns_through_distr_and_reproduces_its_eval(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_distrattn import configure, parse_attn_spec
    from hf_distrattn.eval.perplexity import evaluate_perplexity

    assert run(tiny_lm, tmp_path, "--steps", "12") == 0
    payload = json.loads((tmp_path / "finetune.json").read_text())
    assert set(payload) == {"task", "args", "steps", "train_seconds", "final_loss", "environment", "history"}
    exact, drop_in, tuned = payload["history"]
    assert [e["setting"] for e in payload["history"]] == [
        "exact (before fine-tuning)", "distr:group_size=2,block_size=16,grouping=lsh drop-in",
        "distr:group_size=2,block_size=16,grouping=lsh fine-tuned"]
    assert payload["steps"] == tuned["step"] == 12
    assert tuned["bits_per_byte"] < 0.75 * drop_in["bits_per_byte"]  # a random model learns the repeated line
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="distr")
    configure(model, parse_attn_spec("distr:group_size=2,block_size=16,grouping=lsh")[1])
    ids = torch.tensor(list(tiny_lm[1].read_bytes()))
    again = evaluate_perplexity(model.eval(), ids, 48, 48, max_windows=2)
    assert again.bits_per_byte == pytest.approx(tuned["bits_per_byte"], rel=1e-5)


def test_distillation_of_the_query_and_key_projections(shared, tmp_path):
    """ref-llama-bytes, --distill 1 --train qk: only q_proj/k_proj move, and the approximated model moves toward
    the exact one (its bits/byte, learnt from the exact model's predictions, not from the labels)."""
    from safetensors.torch import load_file as load

    model, text = shared / "models/ref-llama-bytes", shared / "data/heldout_kjv.txt"
    assert main(["finetune", "--model", str(model), "--text-file", str(text), "--eval-text-file", str(text),
                 "--eval-limit", "2", "--seq-len", "128", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0",
                 "--attn", "distr:group_size=2,block_size=16,grouping=lsh", "--output-dir", str(tmp_path),
                 "--steps", "12",
                 "--distill", "1", "--train", "qk"]) == 0
    history = json.loads((tmp_path / "finetune.json").read_text())["history"]
    exact, drop_in, tuned = (entry["bits_per_byte"] for entry in history)
    assert drop_in > exact + 0.05 and abs(tuned - exact) < 0.7 * (drop_in - exact), (exact, drop_in, tuned)
    before, after = load(model / "model.safetensors"), load(tmp_path / "final/model.safetensors")
    moved = {k for k in after if not torch.equal(after[k], before[k].to(after[k].dtype))}
    assert moved and all(k.endswith(("q_proj.weight", "k_proj.weight")) for k in moved), moved


def test_resume_gives_the_same_weights(tiny_lm, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(tiny_lm, straight, "--steps", "4", "--save-every", "2") == 0
    assert run(tiny_lm, resumed, "--steps", "4", "--save-every", "2") == 0
    for leftover in ("checkpoint-4", "final"):
        for f in (resumed / leftover).iterdir():
            f.unlink()
        (resumed / leftover).rmdir()
    assert run(tiny_lm, resumed, "--steps", "4", "--resume") == 0
    a = load_file(straight / "final/model.safetensors")
    b = load_file(resumed / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(straight / "checkpoint-2/model.safetensors")
    assert not all(torch.equal(a[k], start[k]) for k in a)  # the resumed steps did train


def test_image_classifier_finetune(shared, tmp_path):
    import datasets
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model_dir = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8, num_labels=10)
                              ).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    rows = datasets.load_dataset("parquet", data_files=str(shared / "data/fashion-mnist-test.parquet"),
                                 split="train").select(range(48))
    rows.to_parquet(tmp_path / "small.parquet")
    assert main(["finetune", "--model", str(model_dir), "--dataset", str(tmp_path / "small.parquet"),
                 "--eval-dataset", str(tmp_path / "small.parquet"), "--batch-size", "16", "--steps", "3",
                 "--attn", "distr:group_size=2,block_size=16,grouping=lsh", "--output-dir", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out/finetune.json").read_text())
    assert payload["task"] == "finetune-image" and payload["steps"] == 3
    assert all(0 <= e["top1"] <= 1 for e in payload["history"]) and len(payload["history"]) == 3
    assert (tmp_path / "out/final/preprocessor_config.json").is_file()


def test_kjv_training_text_stops_before_the_heldout_part():
    verses = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nCol1:12 Giving thanks.\nCol1:13 Who hath.\n"
    assert kjv_training_text(verses, "Giving thanks.\nWho hath.\n") == "In the beginning.\nAnd the earth.\n"
    with pytest.raises(ValueError, match="not in the verse dump"):
        kjv_training_text(verses, "Something else.\n")


@pytest.mark.parametrize("args,message", [
    (["--text-file", "/nonexistent.txt"], "text file not found"),
    (["--resume"], "no checkpoint"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
])
def test_finetune_bad_arguments(tiny_lm, tmp_path, capsys, args, message):
    path, text = tiny_lm
    base = ["finetune", "--model", str(path), "--output-dir", str(tmp_path)]
    if "--text-file" not in args:
        base += ["--text-file", str(text)]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert message in err.splitlines()[-1] and err.splitlines()[-1].startswith("hf-distrattn finetune: error:")


@pytest.mark.parametrize("spec,chat", [("distr:group_size=1", False),
                                       ("distr:group_size=2,block_size=16,grouping=lsh", True)])
def test_prompt_answers_are_compared_with_the_exact_models(tiny_lm, tmp_path, spec, chat):
    """``--prompts-file``: every eval generates greedy answers; after the first (exact) eval, the share of prompts
    answered identically, of equal answer tokens and of exact answer tokens predicted under teacher forcing. G=1
    must agree fully with exact. ``chat``: a tokenizer with a
    chat template (an instruction model's) wraps each prompt in it."""
    import shutil

    from transformers import AutoTokenizer

    model, text = tiny_lm
    if chat:
        model = shutil.copytree(model, tmp_path / "chat-lm")
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
        tokenizer.save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\n\nGod created\nthe heaven and\n")
    out = tmp_path / "out"
    assert run((model, text), out, "--steps", "1", "--prompts-file", str(prompts), "--answer-tokens", "8",
               "--attn", spec) == 0
    history = json.loads((out / "finetune.json").read_text())["history"]
    reference = history[0]["answers"]
    assert len(reference) == 3 and all(len(a) == 8 for a in reference) and "answer_agreement" not in history[0]
    for entry in history[1:]:
        same = [a == b for a, b in zip(entry["answers"], reference, strict=True)]
        tokens = [x == y for a, b in zip(entry["answers"], reference, strict=True) for x, y in zip(a, b, strict=True)]
        assert entry["answer_agreement"] == sum(same) / 3 and entry["token_agreement"] == sum(tokens) / 24
        # teacher forced, each answer's tokens before its first difference from the exact one are predicted
        agreed = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 8)
                     for a, b in zip(entry["answers"], reference, strict=True))
        assert agreed / 24 <= entry["forced_agreement"] <= 1
    if spec == "distr:group_size=1":
        assert history[1]["answer_agreement"] == 1.0 and history[1]["forced_agreement"] == 1.0


def test_precision_floor_evaluates_the_exact_model_in_bfloat16(tiny_lm, tmp_path):
    """``--precision-floor``: a second step-0 entry, the exact model with bfloat16 weights, its answers compared
    with the float32 exact model's (the reference of every later entry too); its bits/byte differ by rounding."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\n\nGod created\n")
    out = tmp_path / "out"
    assert run(tiny_lm, out, "--steps", "1", "--prompts-file", str(prompts), "--answer-tokens", "8",
               "--precision-floor") == 0
    history = json.loads((out / "finetune.json").read_text())["history"]
    assert [e["setting"] for e in history[:2]] == ["exact (before fine-tuning)", "exact in bfloat16 (the floor)"]
    exact, floor = history[0]["bits_per_byte"], history[1]["bits_per_byte"]
    assert floor != exact and abs(floor - exact) < 0.05 * exact
    assert 0 <= history[1]["answer_agreement"] <= 1 and "answer_agreement" not in history[0]
    assert len(history) == 4 and all("answer_agreement" in e for e in history[1:])


def test_prompt_context_puts_a_disjoint_chunk_before_each_prompt(tiny_lm, tmp_path):
    """``--prompt-context-file``: each prompt is preceded by its own ``prompt_context_tokens`` tokens of the text,
    consecutive chunks; a text too short for every prompt is a one-line error naming the file."""
    from hf_distrattn.eval.common import EvalError
    from hf_distrattn.eval.finetune import FinetuneArgs, LMTask

    model, text = tiny_lm
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first question\nsecond question\n")
    context = tmp_path / "context.txt"
    context.write_text("".join(chr(65 + i % 26) for i in range(300)))
    args = dict(model=str(model), output_dir=str(tmp_path / "out"), text_file=str(text), prompts_file=str(prompts))
    bare = LMTask(FinetuneArgs(**args)).prompts
    long = LMTask(FinetuneArgs(**args, prompt_context_file=str(context), prompt_context_tokens=100)).prompts
    tokenizer = LMTask(FinetuneArgs(**args)).tokenizer
    for i, (b, lng) in enumerate(zip(bare, long, strict=True)):
        assert lng.numel() >= b.numel() + 100
        assert context.read_text()[i * 100:(i + 1) * 100] in tokenizer.decode(lng)
    with pytest.raises(EvalError, match="context.txt holds 300 tokens"):
        LMTask(FinetuneArgs(**args, prompt_context_file=str(context), prompt_context_tokens=200))


def test_own_answers_make_the_training_windows(tiny_lm, tmp_path):
    """``--own-answers-file``: each training window is a chunk of the training text, one of the instructions and
    the exact model's greedy answer of ``own_answer_tokens`` tokens, filling ``seq_len``; an instruction that is
    also an eval prompt is an error naming both files."""
    from hf_distrattn.eval.common import EvalError
    from hf_distrattn.eval.finetune import FinetuneArgs, LMTask

    model, text = tiny_lm
    instructions = tmp_path / "train-prompts.txt"
    instructions.write_text("Name a colour.\nCount to three.\n")
    args = dict(model=str(model), output_dir=str(tmp_path / "out"), text_file=str(text), seq_len=40,
                batch_size=2, own_answers_file=str(instructions), own_answers=3, own_answer_tokens=5)
    task = LMTask(FinetuneArgs(**args))
    lm = task.model.eval()
    task.use_own_answers(lm)
    assert len(task.train) == 3
    for i in range(3):
        window = task.train[i]["input_ids"]
        assert window.numel() == 40
        answer = lm.generate(window[None, :35], attention_mask=torch.ones(1, 35, dtype=torch.long), max_new_tokens=5,
                             min_new_tokens=5, do_sample=False, pad_token_id=0)[0, 35:]
        assert torch.equal(answer, window[35:])
        assert ["Name a colour.", "Count to three."][i % 2] in task.tokenizer.decode(window[:35])
    eval_prompts = tmp_path / "eval-prompts.txt"
    eval_prompts.write_text("Count to three.\n")
    with pytest.raises(EvalError, match="shares instructions with the eval prompts"):
        LMTask(FinetuneArgs(**args, prompts_file=str(eval_prompts))).use_own_answers(lm)
