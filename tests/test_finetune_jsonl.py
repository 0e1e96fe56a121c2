"""Your model, your data, through the command line: `minipeft finetune --base DIR --data F.jsonl`, then `generate`,
`evaluate` and `merge`, and the hand-off to Hugging Face (peft loads the adapter, transformers the merged model,
both with minipeft's logits to 1e-4 in fp32). Also: --resume equals a run that never stopped, bad flag
combinations are one-line usage errors, and LoRA learns a small classification file well above chance.

The fixtures are built here (tests/own_model.py): a random transformers GPT-2 with odd sizes, a BPE trained with
`tokenizers` on built-in text saved beside it as tokenizer.json, and JSONL files of each row format. Nothing is
downloaded: the Hub is switched off for the module.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from own_model import MODEL_VOCAB, completion_rows, review_rows, save_gpt2, text_rows, train_bpe, write_jsonl
from safetensors.torch import load_file
from tolerances import assert_close

from minipeft import kernels
from minipeft.cli import main
from minipeft.jsonl import EpochBatches
from minipeft.model import GPT
from minipeft.tuners import PeftModel

IDX = torch.randint(0, MODEL_VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf():
    """(peft, transformers), with the Hub offline for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        peft = pytest.importorskip("peft")
        transformers = pytest.importorskip("transformers")
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield peft, transformers


@pytest.fixture(scope="module")
def files(hf, tmp_path_factory):
    """{"base": a GPT-2 dir with tokenizer.json, "text" / "completion" / "reviews" / "reviews_val": JSONL files}."""
    root = tmp_path_factory.mktemp("own")
    save_gpt2(root / "gpt2")
    train_bpe(root / "gpt2")
    return {"base": root / "gpt2", "root": root,
            "text": write_jsonl(root / "text.jsonl", text_rows(16)),
            "completion": write_jsonl(root / "completion.jsonl", completion_rows(16)),
            "reviews": write_jsonl(root / "reviews.jsonl", review_rows(160)),
            "reviews_val": write_jsonl(root / "reviews_val.jsonl", review_rows(64, seed=1))}


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


def finetune(files, data: str, out, method: str, *extra: str) -> int:
    return main(["finetune", "--base", str(files["base"]), "--data", str(files[data]), "--method", method, "--out",
                 str(out), "--device", "cpu", "--batch-size", "4", *extra])


def hf_gpt2(hf, directory):
    return hf[1].GPT2LMHeadModel.from_pretrained(str(directory)).eval()


@torch.no_grad()
def minipeft_logits(files, adapter) -> torch.Tensor:
    pm = PeftModel.from_pretrained(GPT.from_pretrained(files["base"]), str(adapter)).eval()
    return pm(IDX)[0]


def test_lora_on_prompt_completion_rows_hands_off_to_peft_and_transformers(hf, files, tmp_path, capsys):
    peft = hf[0]
    out = tmp_path / "lora"
    assert finetune(files, "completion", out, "lora", "--steps", "4", "--lr", "1e-2", "--format", "peft",
                    "--r", "4", "--target-modules", "c_attn,c_fc") == 0
    assert "lora on completion.jsonl: 4 steps" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all({"loss", "lr", "tokens_per_second"} <= set(r)
                                                               for r in lines)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "lora" and run["data"]["format"] == "completion" and run["options"]["r"] == 4

    ours = minipeft_logits(files, out)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_gpt2(hf, files["base"]), str(out)).eval()(input_ids=IDX).logits
        base = hf_gpt2(hf, files["base"])(input_ids=IDX).logits
    assert_close(ours, theirs, "interop")
    assert (ours - base).abs().max() > 1e-3  # the adapter learned something: the check could fail

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(files["base"]), "--adapter", str(out), "--out", str(merged)]) == 0
    assert f"wrote {merged}" in capsys.readouterr().out and (merged / "tokenizer.json").is_file()
    base_config, merged_config = (json.loads((d / "config.json").read_text()) for d in (files["base"], merged))
    for key in ("bos_token_id", "eos_token_id"):  # the base's, not transformers' GPT-2 default 50256
        assert merged_config[key] == base_config[key], key
    with torch.no_grad():
        assert_close(hf_gpt2(hf, merged)(input_ids=IDX).logits, ours, "interop")

    assert main(["generate", "--base", str(files["base"]), "--adapter", str(out), "Record: name=Tobar",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Record: name=Tobar")
    assert main(["evaluate", "--base", str(files["base"]), "--adapter", str(out), "--data",
                 str(files["completion"]), "--device", "cpu"]) == 0
    assert "16 rows (completion): loss " in capsys.readouterr().out


def test_prompt_tuning_on_text_rows_loads_in_peft(hf, files, tmp_path):
    out = tmp_path / "prompt"
    assert finetune(files, "text", out, "prompt", "--steps", "3", "--num-virtual-tokens", "4", "--init-text",
                    "Zuvel lives in", "--format", "peft") == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    ours = minipeft_logits(files, out)
    with torch.no_grad():
        theirs = hf[0].PeftModel.from_pretrained(hf_gpt2(hf, files["base"]), str(out)).eval()(input_ids=IDX).logits
    assert_close(ours, theirs[:, -IDX.shape[1]:], "interop")  # peft returns the virtual tokens' logits too


def test_pfeiffer_trains_and_evaluates_but_has_no_peft_format(files, tmp_path, capsys):
    out = tmp_path / "pfeiffer"
    assert finetune(files, "reviews", out, "pfeiffer", "--steps", "2", "--format", "peft") == 2
    assert "bottleneck" in capsys.readouterr().err and not out.exists()  # refused before anything was written
    assert finetune(files, "reviews", out, "pfeiffer", "--steps", "2", "--reduction-factor", "4",
                    "--eval-data", str(files["reviews_val"])) == 0
    assert "eval loss" in capsys.readouterr().out
    assert main(["evaluate", "--base", str(files["base"]), "--adapter", str(out), "--data",
                 str(files["reviews_val"])]) == 0
    shown = capsys.readouterr().out
    assert "64 rows (classification): loss" in shown and "accuracy" in shown
    assert main(["merge", "--base", str(files["base"]), "--adapter", str(out), "--out", str(tmp_path / "m")]) == 2
    assert "only LoRA" in capsys.readouterr().err


def test_resume_continues_to_the_result_of_an_uninterrupted_run(files, tmp_path, monkeypatch):
    """The GPT-2 keeps its 0.1 dropout, so the random state has to be restored too, not just the weights."""
    args = ("--steps", "6", "--save-every", "2", "--lr", "3e-3", "--seed", "3", "--grad-accum", "2")
    assert finetune(files, "completion", tmp_path / "whole", "lora", *args) == 0

    calls = {"n": 0}
    real_call = EpochBatches.__call__

    def crash_in_step_6(self, generator=None):  # two batches a step: the 11th is step 6's first
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real_call(self, generator)

    with monkeypatch.context() as mp:
        mp.setattr(EpochBatches, "__call__", crash_in_step_6)
        with pytest.raises(KeyboardInterrupt):
            finetune(files, "completion", tmp_path / "cut", "lora", *args)
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 5  # step 5 ran, uncheckpointed
    assert finetune(files, "completion", tmp_path / "cut", "lora", *args) == 2  # without --resume: refused
    assert finetune(files, "completion", tmp_path / "cut", "lora", *args, "--resume") == 0

    whole, cut = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name
    lines = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("whole", "cut")}
    assert [r["step"] for r in lines["cut"]] == [1, 2, 3, 4, 5, 6]  # step 5 once: the cut run's line was dropped
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["latest.json", "step-000006"]
    assert [r["loss"] for r in lines["cut"]] == [r["loss"] for r in lines["whole"]]
    assert finetune(files, "completion", tmp_path / "cut", "lora", "--steps", "8", "--save-every", "2", "--lr",
                    "3e-3", "--seed", "3", "--grad-accum", "2", "--resume") == 2  # another config: refused


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--method", "lora", "--preset", "tiny", "--base", "b", "--data", "d", "--out", "o"],
     "--preset (the built-in base and tasks) and --base"),
    (["finetune", "--method", "lora", "--task", "facts", "--data", "d.jsonl"], "--task .* and --data"),
    (["finetune", "--method", "lora", "--base", "b", "--out", "o"], "--base (your own model) also needs --data"),
    (["finetune", "--method", "lora", "--epochs", "1"], "also needs --base, --data, --out"),
    (["finetune", "--method", "lora", "--base", "b", "--data", "d", "--out", "o", "--steps", "3", "--epochs", "1"],
     "give one of them"),
    (["generate", "--adapter", "a", "hello"], "also needs --base"),
    (["generate", "--preset", "tiny", "--base", "b", "hello"], "cannot be combined"),
])
def test_built_in_and_own_flags_are_alternatives(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err
    assert re.search(message.replace("(", r"\(").replace(")", r"\)"), err), err


def test_option_of_another_method_and_a_too_long_max_length_fail_before_training(files, tmp_path, capsys):
    assert finetune(files, "text", tmp_path / "a", "prompt", "--r", "4") == 2
    assert "option r=4 does not apply to method 'prompt'" in capsys.readouterr().err
    assert finetune(files, "text", tmp_path / "b", "lora", "--max-length", "500") == 2
    assert "max_length must be an int in 2…70" in capsys.readouterr().err
    assert finetune(files, "text", tmp_path / "c", "full", "--format", "peft") == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_diverged_run_fails_and_leaves_the_adapter_already_in_out(files, tmp_path, capsys):
    """lr 1e30 sends the weights past float32 by step 2: the loss is NaN there, the CLI says so and exits 2, and
    the adapter and run.json that a good run left in OUT are still there, byte for byte."""
    out = tmp_path / "lora"
    assert finetune(files, "completion", out, "lora", "--steps", "2") == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("adapter_") or p.name == "run.json"}
    assert {"adapter_model.safetensors", "run.json"} <= kept.keys()
    capsys.readouterr()
    assert finetune(files, "completion", out, "lora", "--steps", "4", "--lr", "1e30") == 2
    shown = capsys.readouterr()
    assert "wrote" not in shown.out and "final loss" not in shown.out
    diverged = re.search(r"loss at step (\d) of 4 is nan \(not finite\).*they were not saved", shown.err)
    assert diverged, shown.err
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, int(diverged[1]))) and 2 <= int(diverged[1]) < 4
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert not (out / "checkpoints").exists()


def test_out_may_not_be_the_base_nor_hold_an_input_under_an_output_name(files, tmp_path, capsys):
    """A full fine-tune into the base's directory would replace its model.safetensors and config.json; a data
    file in OUT named metrics.jsonl would be replaced by the run's log. Both are refused before anything runs."""
    base = tmp_path / "base"
    shutil.copytree(files["base"], base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}

    def run(data, out, method="full"):
        return main(["finetune", "--base", str(base), "--data", str(data), "--method", method, "--out", str(out),
                     "--device", "cpu", "--batch-size", "4", "--steps", "1"])

    for out in (base, tmp_path / "elsewhere" / ".." / "base"):  # the same directory, spelled another way
        assert run(files["text"], out) == 2
        assert "is the base directory" in capsys.readouterr().err
    assert run(files["text"], base, "lora") == 2
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # nothing written, nothing replaced

    mine = tmp_path / "run" / "metrics.jsonl"
    mine.parent.mkdir()
    shutil.copyfile(files["text"], mine)
    assert run(mine, mine.parent, "lora") == 2
    assert re.search(r"data .*metrics\.jsonl.* is out's metrics\.jsonl .*which the run writes", capsys.readouterr().err)
    assert mine.read_bytes() == files["text"].read_bytes() and sorted(mine.parent.iterdir()) == [mine]
    link = tmp_path / "train.jsonl"  # a link elsewhere that points at out's metrics.jsonl is the same file
    link.symlink_to(mine)
    assert run(link, mine.parent, "lora") == 2 and "is out's metrics.jsonl" in capsys.readouterr().err
    assert mine.read_bytes() == files["text"].read_bytes()
    kept = tmp_path / "beside" / "train.jsonl"  # another name in OUT is not in the run's way
    kept.parent.mkdir()
    shutil.copyfile(files["text"], kept)
    assert run(kept, kept.parent, "lora") == 0 and kept.read_bytes() == files["text"].read_bytes()


def test_lora_learns_a_small_classification_file_well_above_chance(files, tmp_path):
    """The base is frozen and random, but each review's polar word is one token of the BPE: LoRA learns to carry
    it to the answer position. Measured on four random bases: 0.91–1.00 held-out accuracy after these 150 steps
    (about 2 s); chance is 0.5, and 0.8 on 64 reviews is five standard deviations above it."""
    out = tmp_path / "learn"
    assert finetune(files, "reviews", out, "lora", "--epochs", "15", "--batch-size", "16", "--lr", "5e-3",
                    "--eval-data", str(files["reviews_val"]), "--save-every", "0") == 0
    result = json.loads((out / "run.json").read_text())["result"]
    assert result["eval"]["accuracy"] >= 0.8, result
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 150 and last["eval_accuracy"] == result["eval"]["accuracy"]
    assert not (out / "checkpoints").exists()  # --save-every 0


def readme_python_block(title: str = "## Your model, your data", starts: str = "from minipeft import") -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(title, 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if b.startswith(starts)]
    assert len(blocks) == 1, f"README's {title!r} has {len(blocks)} python blocks starting with {starts!r}"
    return blocks[0]


def test_the_readme_python_api_runs_as_written(files, tmp_path, monkeypatch, capsys):
    """The README's few lines, verbatim, in a folder holding what they name (gpt2-local, train/val.jsonl)."""
    shutil.copytree(files["base"], tmp_path / "gpt2-local")
    shutil.copyfile(files["reviews"], tmp_path / "train.jsonl")
    shutil.copyfile(files["reviews_val"], tmp_path / "val.jsonl")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_block(), "README.md", "exec"), {})
    assert "160 rows of" in capsys.readouterr().out  # data.summary()
    out = tmp_path / "runs" / "mine-py"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 200 and "eval_accuracy" in json.loads(lines[-1])
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 200
