"""Many tasks on one base, measured: two adapters serving one mixed batch, and AdapterFusion against joint training.

On the built-in base, with the recipe `minipeft compare` trains its adapter rows with (the method's rate from
minipeft/methods.py, batch 16, `--steps` steps, warmup min(10, steps/10), the task's own loss), this script trains
per seed:

    LoRA       one adapter on `sentiment`, one on `facts`                    ("lora_sentiment", "lora_facts")
    Pfeiffer   one adapter on `sentiment`, one on `facts`                    ("sentiment", "facts")
    joint      one Pfeiffer adapter on both tasks: 2·steps steps of 8 + 8 rows, so each task gets the rows it
               got alone and the budget is the two adapters' together
    fusion     AdapterFusion of the two Pfeiffer adapters (Fuse("sentiment", "facts")), base and adapters
               frozen, on `--fusion-steps` steps of 8 + 8 rows; loss + the library's 0.01·Σ‖W_V − I‖². Its rate,
               1e-3, was the best of {3e-4, 1e-3, 3e-3} on the validation splits for one seed (sentiment / facts
               0.54 / 0.83, 0.64 / 0.79, 0.62 / 0.79); the test splits were not used to choose it

and measures, on the test splits (200 sentiment reviews, 96 facts questions: 4 about each of the 24 test people):

(a) one mixed batch serving both tasks. Every test example of both tasks, plus `--base-rows` of each task named
    "__base__", in ONE batch: `pm(idx, adapter_names=[...])` (one name per row) and `pm.generate(...,
    adapter_names=[...])`, scored by the project's own `minipeft.evaluate.predict` (sentiment rows read the
    verbalizer off the forward's last logits, facts rows the greedy generation), against each adapter alone:
    the largest |Δ logit| between a row of the mixed batch and the same padded rows run with only its adapter
    active (or adapters disabled), and each task's score and answers computed both ways (alone: `predict` with
    `evaluate`'s batching, as `compare` scores). This claim is exact, so it is checked per seed, not averaged.
(b) the 2×2 of Pfeiffer adapter × task, the fusion and the joint adapter on each task, and the fusion's mean
    attention weight per layer for each task's test prompts (real tokens only; `fusion_attention`'s
    `average=True` would count padding, so the raw weights are averaged under the attention mask).

What varies with the seed is what varies between two fine-tuning runs: the adapters' random init and the
order of the training batches. The base (pretrained with seed 0) and the data (task seed 0) stay fixed.
Claims that depend on that noise are paired differences over the seeds, reported as mean ± the half-width of
a 95% t-interval; a verdict says "beats" only when the whole interval is above zero.

Budget: the default (3 seeds, 150 steps per adapter, 150 fusion steps) trains 3 × (4·150 + 300 + 150) = 3,150
steps of 16 rows and scores ~40 evaluations. It ran in 7.1 minutes on a 2-core CPU (~140 s a seed;
benchmarks/RESULTS.md, "Many tasks on one base"). Small models on few cores suffer badly from a concurrent job: the
same run beside a CI run took over 40 minutes, so time it alone.

    python benchmarks/multi_task.py [--seeds 3] [--steps 150] [--markdown section.md] [--json results.json]
    python benchmarks/multi_task.py --quick      # a tiny random GPT (no pretraining), 3 steps: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minipeft import GPT, Fuse, GPTConfig, PeftModel, get_peft_model, kernels
from minipeft.checkpoint import save_json
from minipeft.data import Example, Task, load_task, task_batch, task_loss
from minipeft.evaluate import evaluate, predict
from minipeft.jsonl import pad_right
from minipeft.methods import METHODS, method_config
from minipeft.pretrain import load_base
from minipeft.stats import MIN_SEEDS, compare_verdict, fmt_interval, interval
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, pad_batch, resolve_device, train

TASK_NAMES = ("sentiment", "facts")
BASE = "__base__"  # minipeft.tuners.mixed_batch.BASE: the row runs the frozen model
FUSE = Fuse(*TASK_NAMES)  # the Pfeiffer adapters are named after their tasks
# t_{0.975, df} for a 95% two-sided t-interval (scipy is not a dependency); larger df use the normal's 1.96


# ------------------------------------------------------------------------------------------ training
def compare_recipe(key: str, steps: int, seed: int) -> TrainConfig:
    """The schedule `minipeft compare` trains method `key` with (minipeft/compare.py, run_method)."""
    return TrainConfig(steps=steps, lr=METHODS[key].lr, batch_size=16, warmup_steps=max(1, min(10, steps // 10)),
                       seed=seed)


def add_task_adapter(model: GPT | PeftModel, name: str, key: str, init_seed: int) -> PeftModel:
    """Adapter `name` of method `key` (compare's config), made the one active and trainable adapter. A GPT is
    wrapped in place (get_peft_model); a PeftModel gets one more adapter."""
    torch.manual_seed(init_seed)  # the adapter's random init (LoRA's A, the bottleneck's down-projection)
    if not isinstance(model, PeftModel):
        return get_peft_model(model, method_config(key), adapter_name=name)
    model.add_adapter(name, method_config(key))
    model.set_adapter(name)
    return model


def train_on_task(pm: PeftModel, task: Task, tok: ByteTokenizer, cfg: TrainConfig) -> None:
    """compare's training step: task_batch rows, the task's own loss (verbalizer CE or the answer's tokens)."""
    T = pm.config.block_size
    train(pm, lambda g: task_batch(task, tok, cfg.batch_size, T, g), cfg, loss_fn=task_loss(task, tok),
          progress=False)


def two_task_batch(tasks: Sequence[Task], tok: ByteTokenizer, batch_size: int, block_size: int):
    """get_batch for training on several tasks at once: rows [i·h, (i+1)·h) are task i's (h = batch_size / n),
    each task's rows encoded as task_batch does, right-padded to one length."""
    h = batch_size // len(tasks)

    def get_batch(generator: torch.Generator):
        parts = [task_batch(t, tok, h, block_size, generator) for t in tasks]
        T = max(p[0].shape[1] for p in parts)
        parts = [pad_batch(*p, T) for p in parts]  # padding is masked out and predicts nothing
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # idx, targets, mask: (B, T)

    return get_batch


def two_task_loss(tasks: Sequence[Task], tok: ByteTokenizer, batch_size: int,
                  extra: Callable[[], torch.Tensor] | None = None):
    """The mean over tasks of each task's own loss on its rows of a two_task_batch (+ extra(), e.g. a
    regulariser): every task weighs the same, as in two separate runs."""
    h = batch_size // len(tasks)
    losses = [task_loss(t, tok) for t in tasks]

    def loss_fn(net, idx, targets, mask):
        total = 0.0
        for i, fn in enumerate(losses):
            rows = slice(i * h, (i + 1) * h)
            if fn is None:  # the model's own next-token loss on the answer tokens
                loss = net(idx[rows], targets=targets[rows], attention_mask=mask[rows], return_logits=False)[1]
            else:
                loss = fn(net, idx[rows], targets[rows], mask[rows])
            total = total + loss
        total = total / len(losses)
        return total if extra is None else total + extra()

    return loss_fn


# ------------------------------------------------------------------------------------------ one mixed batch
class RowRouted:
    """A PeftModel seen as a model whose row b always runs adapter names[b]: the forward, generate, config and
    parameters that `minipeft.evaluate.predict` reads, so a mixed batch is scored by the project's own code.
    It keeps the last forward's (idx, mask, logits) for the exact comparison. (Rows here are LoRA or bottleneck
    adapters; rows with soft prompts would also need their longest prompt as `num_virtual_tokens`, which predict
    subtracts from block_size when it makes room to generate.)"""

    def __init__(self, pm: PeftModel, names: list[str]) -> None:
        self.pm, self.names, self.config = pm, names, pm.config
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def parameters(self):
        return self.pm.parameters()

    def __call__(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        logits, loss = self.pm(idx, attention_mask=attention_mask, adapter_names=self.names, **kw)
        self.last = (idx, attention_mask, logits)
        return logits, loss

    def generate(self, idx: torch.Tensor, max_new_tokens: int = 20, **kw) -> torch.Tensor:
        return self.pm.generate(idx, max_new_tokens, adapter_names=self.names, **kw)


@torch.no_grad()
def logits_alone(pm: PeftModel, name: str, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits of these rows with only adapter `name` active (adapters disabled for "__base__")."""
    if name == BASE:
        with pm.disable_adapter():
            return pm(idx, attention_mask=mask)[0]
    pm.set_adapter(name)
    return pm(idx, attention_mask=mask)[0]


def accuracy(preds: list[str], examples: list[Example]) -> float:
    """The task metric as `evaluate` computes it from predict's answers (accuracy or exact match)."""
    return sum(p == ex.answer for p, ex in zip(preds, examples, strict=True)) / len(examples)


@torch.no_grad()
def mixed_batch_check(pm: PeftModel, adapters: dict[str, str], tasks: dict[str, Task], tok: ByteTokenizer,
                      max_eval: int | None, base_rows: int) -> dict:
    """Every test example of every task in one batch, each row on its task's adapter (plus `base_rows` rows of
    each task on "__base__"), against each adapter alone: max |Δ logit| and the scores computed both ways."""
    pm.eval()
    rows: list[tuple[str, str, Example]] = []  # (task, adapter name, example)
    for t, task in tasks.items():
        rows += [(t, adapters[t], ex) for ex in task.test[:max_eval]]
        rows += [(t, BASE, ex) for ex in task.test[:base_rows]]
    examples, names = [ex for _, _, ex in rows], [name for _, name, _ in rows]
    mixed = RowRouted(pm, names)
    # predict with batch_size = all rows: one forward (what classification rows read) and one generate (what
    # generation rows read), each over the whole mixed batch; the other task's rows' answers are ignored
    preds = {t: predict(mixed, task, tok, examples, batch_size=len(rows)) for t, task in tasks.items()}
    idx, mask, logits = mixed.last  # the forward's batch (left-padded by predict); generate does not set it
    real = mask.bool()
    out = {"rows": len(rows), "max_abs_diff": 0.0, "effect": 0.0, "scores": {}}
    base_logits = logits_alone(pm, BASE, idx, mask)
    for name in dict.fromkeys(names):
        sel = torch.tensor([n == name for n in names])
        alone = logits_alone(pm, name, idx[sel], mask[sel])
        diff = (logits[sel] - alone).abs()[real[sel]]  # (real tokens, vocab)
        out["max_abs_diff"] = max(out["max_abs_diff"], diff.max().item())
        if name != BASE:  # what the adapter changes: a difference of 0 must not come from adapters that do nothing
            out["effect"] = max(out["effect"], (alone - base_logits[sel]).abs()[real[sel]].max().item())
    for t, task in tasks.items():
        for who in (adapters[t], BASE):
            picked = [i for i, (rt, name, _) in enumerate(rows) if rt == t and name == who]
            chosen = [examples[i] for i in picked]  # the task's first len(picked) test examples
            with contextlib.ExitStack() as stack:  # alone: evaluate's own batching (64 rows, its own padding)
                if who == BASE:
                    stack.enter_context(pm.disable_adapter())
                else:
                    pm.set_adapter(who)
                alone = predict(pm, task, tok, chosen)
            out["scores"][f"{t}/{'base' if who == BASE else 'adapter'}"] = {
                "mixed": accuracy([preds[t][i] for i in picked], chosen), "alone": accuracy(alone, chosen),
                "n": len(picked), "answers_differ": sum(preds[t][i] != a for i, a in zip(picked, alone, strict=True))}
    return out


# ------------------------------------------------------------------------------------------ fusion attention
@torch.no_grad()
def fusion_attention_by_task(pm: PeftModel, tasks: dict[str, Task], tok: ByteTokenizer,
                             max_eval: int | None) -> dict[str, dict[str, list[float]]]:
    """{task: {layer: [p_1, …, p_N] over real tokens, and "<layer>@answer": at the last prompt token]}} for the
    active fusion on the task's test prompts (one right-padded batch per task)."""
    out = {}
    for t, task in tasks.items():
        ids = [tok.encode(ex.prompt, add_bos=True) for ex in task.test[:max_eval]]
        idx, _, mask = pad_right(ids, [[] for _ in ids], tok.pad_token_id)  # (B, T)
        pm(idx, attention_mask=mask)
        last = mask.sum(dim=1) - 1  # (B,) the position whose logits answer
        weights = mask.unsqueeze(-1).float()  # (B, T, 1)
        per_layer = {}
        for layer, p in pm.fusion_attention(FUSE).items():  # p (B, T, N)
            per_layer[layer] = ((p * weights).sum(dim=(0, 1)) / weights.sum()).tolist()
            per_layer[f"{layer}@answer"] = p[torch.arange(p.shape[0]), last].mean(dim=0).tolist()
        out[t] = per_layer
    return out


# ------------------------------------------------------------------------------------------ one seed
@dataclass
class Setup:
    base: GPT
    tasks: dict[str, Task]
    tok: ByteTokenizer
    steps: int
    fusion_steps: int
    fusion_lr: float
    max_eval: int | None
    base_rows: int


def run_seed(s: Setup, seed: int, log: Callable[[str], None]) -> dict:
    """Train every adapter of one seed and measure it (the module docstring)."""
    tasks, tok = s.tasks, s.tok
    res: dict = {"seed": seed, "scores": {}}
    start = time.perf_counter()

    # LoRA pair, then its mixed batch
    lora = copy.deepcopy(s.base)  # get_peft_model wraps in place: each PeftModel gets its own copy
    for i, t in enumerate(TASK_NAMES):
        lora = add_task_adapter(lora, f"lora_{t}", "lora", 100 * seed + i)
        train_on_task(lora, tasks[t], tok, compare_recipe("lora", s.steps, seed))
    for t in TASK_NAMES:
        lora.set_adapter(f"lora_{t}")
        res["scores"][f"lora_{t}/{t}"] = evaluate(lora, tasks[t], tok, "test", max_examples=s.max_eval)
    res["mixed_lora"] = mixed_batch_check(lora, {t: f"lora_{t}" for t in TASK_NAMES}, tasks, tok, s.max_eval,
                                          s.base_rows)
    log(f"  seed {seed}: LoRA pair trained and checked ({time.perf_counter() - start:.0f} s)")

    # Pfeiffer pair: the 2×2, then its mixed batch
    pm = copy.deepcopy(s.base)
    for i, t in enumerate(TASK_NAMES):
        pm = add_task_adapter(pm, t, "pfeiffer", 100 * seed + 10 + i)
        train_on_task(pm, tasks[t], tok, compare_recipe("pfeiffer", s.steps, seed))
    for adapter in TASK_NAMES:
        pm.set_adapter(adapter)
        for t in TASK_NAMES:
            res["scores"][f"{adapter}/{t}"] = evaluate(pm, tasks[t], tok, "test", max_examples=s.max_eval)
    res["mixed_pfeiffer"] = mixed_batch_check(pm, {t: t for t in TASK_NAMES}, tasks, tok, s.max_eval, s.base_rows)
    log(f"  seed {seed}: Pfeiffer pair trained and checked ({time.perf_counter() - start:.0f} s)")

    # one Pfeiffer adapter on both tasks, the two adapters' budget together
    task_list = [tasks[t] for t in TASK_NAMES]
    T = s.base.config.block_size
    add_task_adapter(pm, "joint", "pfeiffer", 100 * seed + 20)
    cfg = compare_recipe("pfeiffer", 2 * s.steps, seed)
    train(pm, two_task_batch(task_list, tok, cfg.batch_size, T), cfg,
          loss_fn=two_task_loss(task_list, tok, cfg.batch_size), progress=False)
    for t in TASK_NAMES:
        res["scores"][f"joint/{t}"] = evaluate(pm, tasks[t], tok, "test", max_examples=s.max_eval)

    # AdapterFusion of the two task adapters, trained on the same mix with everything else frozen
    torch.manual_seed(100 * seed + 30)  # the fusion's W_Q, W_K init
    pm.add_adapter_fusion(FUSE)
    pm.train_adapter_fusion(FUSE)
    cfg = TrainConfig(steps=s.fusion_steps, lr=s.fusion_lr, batch_size=16,
                      warmup_steps=max(1, min(10, s.fusion_steps // 10)), seed=seed)
    train(pm, two_task_batch(task_list, tok, cfg.batch_size, T), cfg,
          loss_fn=two_task_loss(task_list, tok, cfg.batch_size, extra=pm.fusion_regularization_loss),
          progress=False)
    for t in TASK_NAMES:
        res["scores"][f"fusion/{t}"] = evaluate(pm, tasks[t], tok, "test", max_examples=s.max_eval)
    res["attention"] = fusion_attention_by_task(pm, tasks, tok, s.max_eval)
    res["seconds"] = time.perf_counter() - start
    log(f"  seed {seed}: joint adapter and fusion trained ({res['seconds']:.0f} s)")
    return res


# ------------------------------------------------------------------------------------------ the report
def summarize(results: list[dict], tasks: dict[str, Task]) -> dict:
    """Tables (markdown) and verdict sentences computed from the seeds' results."""
    def series(key: str) -> list[float]:
        return [r["scores"][key] for r in results]

    n_eval = {t: results[0]["mixed_pfeiffer"]["scores"][f"{t}/adapter"]["n"] for t in TASK_NAMES}
    metric = {t: f"{t}: {tasks[t].metric} (chance {tasks[t].chance:.3f}, n={n_eval[t]})" for t in TASK_NAMES}
    models = [("base, zero-shot", "base"), ("LoRA, the task's own adapter", "lora_own"),
              ("Pfeiffer `sentiment` adapter", "sentiment"), ("Pfeiffer `facts` adapter", "facts"),
              ("Pfeiffer joint (both tasks, 2×steps)", "joint"), ("AdapterFusion(sentiment, facts)", "fusion")]
    lines = ["| model | " + " | ".join(metric[t] for t in TASK_NAMES) + " |", "|---|" + "---|" * len(TASK_NAMES)]
    for label, key in models:
        cells = []
        for t in TASK_NAMES:
            if key == "base":
                values = [r["base_scores"][t] for r in results]
            elif key == "lora_own":
                values = series(f"lora_{t}/{t}")
            else:
                values = series(f"{key}/{t}")
            per_seed = ", ".join(f"{v:.3f}" for v in values)
            cells.append(f"{fmt_interval(values)} [{per_seed}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    score_table = "\n".join(lines)

    lines = ["| pair | rows | max \\|Δ logit\\| mixed vs alone | max \\|Δ logit\\| adapter vs base | "
             + " | ".join(f"{t}: mixed / alone" for t in TASK_NAMES)
             + " | `__base__` rows (" + ", ".join(TASK_NAMES) + "): mixed / alone | answers that differ |",
             "|---|---|---|---|" + "---|" * len(TASK_NAMES) + "---|---|"]
    exact = True  # every score and every answer the same both ways
    for label, key in (("LoRA", "mixed_lora"), ("Pfeiffer", "mixed_pfeiffer")):
        for r in results:
            m = r[key]
            both = {k: f"{sc['mixed']:.3f} / {sc['alone']:.3f}" for k, sc in m["scores"].items()}
            differ = sum(sc["answers_differ"] for sc in m["scores"].values())
            exact &= differ == 0 and all(sc["mixed"] == sc["alone"] for sc in m["scores"].values())
            lines.append(f"| {label}, seed {r['seed']} | {m['rows']} | {m['max_abs_diff']:.2e} | {m['effect']:.2e} | "
                         + " | ".join(both[f"{t}/adapter"] for t in TASK_NAMES) + " | "
                         + ", ".join(both[f"{t}/base"] for t in TASK_NAMES) + f" | {differ} of {m['rows']} |")
    mixed_table = "\n".join(lines)
    worst = {key: max(r[key]["max_abs_diff"] for r in results) for key in ("mixed_lora", "mixed_pfeiffer")}

    layers = [k for k in results[0]["attention"][TASK_NAMES[0]] if not k.endswith("@answer")]
    lines = ["| layer | " + " | ".join(f"{t} test prompts: p(sentiment) all tokens / answer token" for t in TASK_NAMES)
             + " |", "|---|" + "---|" * len(TASK_NAMES)]
    p_sentiment = {t: {layer: [r["attention"][t][layer][0] for r in results] for layer in layers} for t in TASK_NAMES}
    for layer in layers:
        cells = [f"{fmt_interval(p_sentiment[t][layer])} / "
                 f"{fmt_interval([r['attention'][t][f'{layer}@answer'][0] for r in results])}" for t in TASK_NAMES]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    attention_table = "\n".join(lines)

    verdicts = [
        f"one mixed batch gives every row {'exactly ' if max(worst.values()) == 0 else ''}what its adapter gives "
        f"alone: max |Δ logit| {worst['mixed_lora']:.2e} (LoRA pair) and {worst['mixed_pfeiffer']:.2e} (Pfeiffer "
        f"pair) over {len(results)} seeds, and every task score computed in the mixed batch "
        f"{'equals' if exact else 'does NOT equal'} the score of the adapter alone, answer for answer (base rows "
        f"included)"]
    for t in TASK_NAMES:
        verdicts.append(compare_verdict(series(f"fusion/{t}"), series(f"joint/{t}"), "fusion",
                                        "the jointly trained adapter", t)["text"])
    for t in TASK_NAMES:
        verdicts.append(compare_verdict(series(f"fusion/{t}"), series(f"{t}/{t}"), "fusion",
                                        f"the `{t}` adapter alone", t)["text"])
    for t in TASK_NAMES:
        other = [o for o in TASK_NAMES if o != t][0]
        verdicts.append(compare_verdict(series(f"{t}/{t}"), series(f"{other}/{t}"), f"the `{t}` adapter",
                                        f"the `{other}` adapter", t)["text"])
    # does sentiment's eval attend more to the sentiment adapter? Against the facts prompts, and against one half;
    # over all real tokens (the paper's average) and at the answer token (the last prompt token, whose logits answer)
    def above_zero(values: list[float]) -> bool:
        mean, h = interval(values)
        return len(values) >= MIN_SEEDS and mean - h > 0

    for where, suffix in (("averaged over the prompt's tokens", ""), ("at the answer token", "@answer")):
        p = {t: [[r["attention"][t][f"{layer}{suffix}"][0] for r in results] for layer in layers] for t in TASK_NAMES}
        more = [[x - y for x, y in zip(on_s, on_f, strict=True)]
                for on_s, on_f in zip(p["sentiment"], p["facts"], strict=True)]  # per layer, per seed
        over_half = [[x - 0.5 for x in on_s] for on_s in p["sentiment"]]
        if len(results) < MIN_SEEDS:
            head = f"fusion attention {where} is not compared (needs >= {MIN_SEEDS} seeds)"
        else:
            head = (f"{where}, sentiment's test prompts attend more to the sentiment adapter than facts' prompts do "
                    f"in {sum(map(above_zero, more))} of {len(layers)} fused layers, and give it more than half of "
                    f"the attention in {sum(map(above_zero, over_half))} of {len(layers)} (95% intervals above 0)")
        verdicts.append(f"{head}; per layer, p(sentiment | sentiment prompts) − p(sentiment | facts prompts) = "
                        + ", ".join(fmt_interval(v, "+.3f") for v in more)
                        + "; p(sentiment | sentiment prompts) = " + ", ".join(map(fmt_interval, p["sentiment"])))
    return {"score_table": score_table, "mixed_table": mixed_table, "attention_table": attention_table,
            "verdicts": verdicts, "mixed_exact_scores": exact, "max_abs_diff": worst}


def markdown_section(summary: dict, meta: dict) -> str:
    return "\n".join([
        f"## Many tasks on one base ({meta['device']}, {meta['date']})", "",
        f"{meta['date']} · {meta['machine']} · torch {meta['torch']} · `{meta['command']}` · base: {meta['base']} · "
        f"{meta['seeds']} seeds (adapter init and batch order; base and data fixed) · {meta['steps']} steps of 16 per "
        f"task adapter at compare's rates (LoRA {METHODS['lora'].lr:g}, Pfeiffer {METHODS['pfeiffer'].lr:g}), "
        f"joint Pfeiffer {2 * meta['steps']} steps of 8 + 8, fusion {meta['fusion_steps']} steps of 8 + 8 at "
        f"{meta['fusion_lr']:g} · test splits · intervals: mean ± 95% t-interval over seeds, [per seed] · "
        f"wall time {meta['seconds'] / 60:.1f} min.", "",
        "Task scores:", "", summary["score_table"], "",
        "One mixed batch serving both tasks (every test example of both tasks on its task's adapter, plus "
        "`__base__` rows), against each adapter alone on the same padded rows:", "", summary["mixed_table"], "",
        "AdapterFusion attention (weight of the `sentiment` adapter; the `facts` adapter gets 1 − p):", "",
        summary["attention_table"], "",
        "Verdicts (computed by the script from the numbers above):", "",
        *[f"- {v}" for v in summary["verdicts"]], "",
    ])


# ------------------------------------------------------------------------------------------ the command
def quick_base() -> GPT:
    """A tiny random GPT (no pretraining): what --quick runs on, so the smoke test needs no cached base."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()


QUICK = {"seeds": 2, "steps": 3, "fusion_steps": 3, "base_rows": 2, "max_eval": 16}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="training seeds (adapter init and batch order)")
    p.add_argument("--steps", type=int, default=150, help="steps of 16 per task adapter (compare's default)")
    p.add_argument("--fusion-steps", type=int, default=150, help="fusion training steps of 8 + 8 rows")
    p.add_argument("--fusion-lr", type=float, default=1e-3, help="fusion learning rate (see the module docstring)")
    p.add_argument("--base-rows", type=int, default=8, help="rows of each task on '__base__' in the mixed batch")
    p.add_argument("--max-eval", type=int, default=None, help="test examples per task (default: all)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--markdown", default=None, help="also write the RESULTS.md section to this file")
    p.add_argument("--json", default=None, help="also write every seed's numbers here (rewritten after each seed)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: a tiny random GPT (no pretraining) and these defaults: {QUICK}")
    if p.parse_known_args(argv)[0].quick:  # --quick changes the defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    for name in ("seeds", "steps", "fusion_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def _print_now(line: str) -> None:
    print(line, flush=True)  # progress shows at once even when stdout is a file


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = _print_now) -> dict:
    """Run the measurement; returns {"meta", "results" (per seed), "summary"} and prints the report."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    started = time.perf_counter()
    tok = ByteTokenizer()
    tasks = {t: load_task(t) for t in TASK_NAMES}
    base = quick_base() if args.quick else load_base("default")
    base = base.to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    setup = Setup(base, tasks, tok, args.steps, args.fusion_steps, args.fusion_lr, args.max_eval, args.base_rows)
    base_scores = {t: evaluate(base, tasks[t], tok, "test", max_examples=args.max_eval) for t in TASK_NAMES}
    results = []
    with kernels.use_backend("auto" if device.type == "cuda" else "reference"):  # as compare chooses
        for seed in range(args.seeds):
            results.append({**run_seed(setup, seed, log), "base_scores": base_scores})
            if args.json:  # a long run that is stopped keeps the seeds it finished
                save_json({"args": vars(args), "results": results}, args.json)
    summary = summarize(results, tasks)
    n_base = base.num_parameters()
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": device.type.upper(),
            "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"),
            "command": "python benchmarks/multi_task.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None
                                                                                      else argv)),
            "base": ("tiny random GPT" if args.quick else "the built-in default") + f" ({n_base:,} parameters)",
            "seeds": args.seeds, "steps": args.steps, "fusion_steps": args.fusion_steps, "fusion_lr": args.fusion_lr,
            "seconds": time.perf_counter() - started}
    section = markdown_section(summary, meta)
    log(section)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(section)
    if args.json:
        save_json({"args": vars(args), "meta": meta, "results": results, "summary": summary}, args.json)
    return {"meta": meta, "results": results, "summary": summary}


if __name__ == "__main__":
    main()
