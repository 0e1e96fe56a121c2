"""End to end: training throughput and peak memory of minipeft against transformers + HF peft, GPT-2 small.

What is measured. One training step — forward with the loss under bf16 autocast, backward, fused AdamW
(`torch.optim.AdamW(params, lr=1e-4, fused=True)`), `zero_grad(set_to_none=True)` — on the GPT-2-small shape
(12 layers, 768 wide, 12 heads, vocab 50257, block 1024; random init from a config, no download), one batch of
B × T = 8 × 992 random token ids, dropout 0 everywhere. One row per (library, method, kernel backend, mode):

    hf full     transformers GPT2LMHeadModel, every parameter trainable (fp32 master weights)
    hf floor    bf16 base, frozen; only the token embedding (tied to lm_head) trainable: gradients still flow
                back through every block, so this is the least a PEFT step on a bf16 base can cost
    hf lora     peft LoRA r=16, α=32, c_attn/c_proj/c_fc (fan_in_fan_out), on a bf16 base; peft casts the
                adapter weights to fp32 by default (get_peft_model's autocast_adapter_dtype=True)
    hf prefix   peft prefix tuning, 20 virtual tokens, bf16 base
    hf prompt   peft prompt tuning, 20 virtual tokens, bf16 base
    hf qlora    peft LoRA as `hf lora`, on a bitsandbytes NF4 base (Linear4bit, double quantization, blocksize 64,
                bf16 compute): the random bf16 model saved to a temporary directory and loaded back with a
                `BitsAndBytesConfig`, as users load one; no gradient checkpointing (nor on any other row)
    hf lora8    the same on a bitsandbytes LLM.int8() base (Linear8bitLt, threshold 6.0)
    mp full     minipeft GPT, every parameter trainable (fp32 master weights)
    mp floor [compiled|graphs]
                bf16 base, frozen; only transformer.wte.weight (tied to lm_head) trainable; eager, or in
                the LoRA rows' compiled modes
    mp lora/<backend> <mode>
                minipeft LoRA r=16, α=32, "all-linear" (every Linear but lm_head) on a bf16 base; minipeft
                makes the adapters in the base layer's dtype (bf16). backend ∈ reference, auto, triton,
                chosen with `kernels.use_backend` around the whole row; mode eager, compiled
                (`torch.compile(model)`: forward and loss in one graph, backward through AOTAutograd) or
                graphs (`torch.compile(model, mode="reduce-overhead")`: the same, replayed as CUDA graphs)
    mp qlora/<backend> <mode>
                `mp lora` on an NF4 base: `quantize_model(model, "all-linear", bits=4)` (blocksize 64, double
                quantization) before the adapters; each layer saves its 4-bit codes for backward, never a
                dense weight (kernels.nf4_lora_linear; the fused NF4 + LoRA kernel on "triton")
    mp lora8/<backend> <mode>
                `mp lora` on an LLM.int8() base: `quantize_model(model, "all-linear", bits=8)` (threshold 6.0)
    mp prefix / mp prompt   minipeft prefix / prompt tuning, 20 virtual tokens, bf16 base, eager

HF rows compute the loss as `model(input_ids=idx, labels=idx)` (transformers shifts the labels itself); mp rows
as `model(idx, targets=targets, return_logits=False)` with targets = idx shifted left by one and the last
column -100 (the chunked loss: the whole fp32 logits never exist). Both average over the same B·(T−1) tokens.
Prefix/prompt rows add 20 virtual tokens in front (20 + 992 ≤ 1024 positions); tokens/s counts real tokens only.

How, and the statistic. Rows run in `--rounds` interleaved rounds (round 1 runs every row once, then round 2
every row again, ...), so a slow moment of a shared machine does not land on one row alone. In a round a row is
built from scratch (seed 0), runs `--warmup` untimed steps (which also compile), then `--steps` timed steps;
its time per step is the MEDIAN of those steps, each timed with the device synchronised around it
(minipeft.measure.median_ms, the project's one latency statistic), and

    tokens/s (round) = B·T / median step time.

Every time here is wall-clock with the host included (Python, launches, the optimizer's host work): an
end-to-end step is by definition what the user waits for, so there is no GPU-only column. (The `graphs`
rows replay CUDA graphs inside that wall-clock step: the host's share shrinks, but is not taken out.)

The table gives the median of the rounds' tokens/s and their min–max spread; with 2 rounds the median is the
mean of the two. Peak memory is `torch.cuda.max_memory_allocated` since a reset made before the row's model is
built (weights, gradients, optimizer state and activations), the max over rounds. Each row's model and
optimizer are freed, and the CUDA cache emptied, before the next row. Compiled rows are rebuilt and
recompiled every round (`torch._dynamo.reset()` first, so the recompile limit can never turn a row eager):
round 2 compiles faster from inductor's on-disk caches. The ratio columns pair rounds: in each round a row's
tokens/s is divided by the baseline's of the SAME round (`hf lora`, `mp floor` in that round's fastest mode,
...; > 1: faster than that baseline), and a cell gives the median of those per-round ratios with their
min–max, so a ratio's spread is the spread of the rounds' own ratios.

    python benchmarks/e2e.py                                    # the full run on a CUDA GPU (aim: < 8 min, H200)
    python benchmarks/e2e.py --rows "mp lora,hf lora"           # a subset: comma-separated name prefixes
    python benchmarks/e2e.py --quick --device cpu --rounds 2    # a smoke test on the CPU (tiny shape)

On the CPU, compiled rows are skipped and so is the triton backend (unless TRITON_INTERPRET=1 was set, when
it runs and fails on bf16, which the interpreter refuses); peak memory there is the growth of the process's
resident set (minipeft.measure), not comparable with the GPU's. JSON of every number goes to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minipeft import GPT, GPTConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model, kernels
from minipeft.checkpoint import save_json
from minipeft.measure import median_ms, peak_memory_mb, reset_peak_memory
from minipeft.quant import quantize_model


@dataclasses.dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int
    batch: int
    seq: int  # T: real tokens per sequence (n_virtual + T ≤ block_size)


GPT2_SMALL = Shape(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, block_size=1024, batch=8, seq=992)
QUICK = Shape(n_layer=2, n_embd=64, n_head=2, vocab_size=512, block_size=128, batch=2, seq=64)

LORA_R, LORA_ALPHA, N_VIRTUAL = 16, 32, 20
MP_BACKENDS = ("reference", "auto", "triton")


MODES = ("eager", "compiled", "graphs")  # graphs: torch.compile(mode="reduce-overhead"), CUDA graphs included


@dataclasses.dataclass(frozen=True)
class Row:
    side: str  # "hf" (transformers + peft) or "mp" (minipeft)
    method: str  # full | floor | lora | qlora | lora8 | prefix | prompt
    backend: str | None = None  # minipeft kernel backend (LoRA rows)
    mode: str = "eager"  # one of MODES (minipeft rows)

    @property
    def compiled(self) -> bool:
        return self.mode != "eager"

    @property
    def name(self) -> str:
        name = f"{self.side} {self.method}" + (f"/{self.backend}" if self.backend else "")
        return name + (f" {self.mode}" if self.backend or self.compiled else "")


ALL_ROWS = [Row("hf", m) for m in ("full", "floor", "lora", "qlora", "lora8", "prefix", "prompt")] + [
    Row("mp", "full"), *(Row("mp", "floor", mode=m) for m in MODES),
    *(Row("mp", "lora", b, m) for b in MP_BACKENDS for m in MODES),
    *(Row("mp", q, b, m) for q in ("qlora", "lora8") for b in MP_BACKENDS for m in ("eager", "graphs")),
    Row("mp", "prefix"), Row("mp", "prompt"),
]
QUANTIZED_BITS = {"qlora": 4, "lora8": 8}  # the LoRA rows on a quantized base: bits of quantize_model

# A build function returns (loss_of, trainable parameters): loss_of(idx) is the scalar loss of one batch.
LossOf = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ the two sides
def build_hf(row: Row, shape: Shape) -> tuple[LossOf, list[torch.nn.Parameter]]:
    """A transformers GPT-2 (random init), wrapped by HF peft as the row says, built on the current device."""
    import peft  # here, not at the top: optional (dev) dependencies, needed by the hf rows alone
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                        vocab_size=shape.vocab_size, n_positions=shape.block_size,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=shape.vocab_size - 1, eos_token_id=shape.vocab_size - 1)
    model = GPT2LMHeadModel(config)
    if row.method in QUANTIZED_BITS:
        model = _bnb_quantized(model, QUANTIZED_BITS[row.method])
    model.train()
    if row.method == "full":
        net = model
    else:
        if row.method not in QUANTIZED_BITS:  # a quantized model is bf16 already, and .to() would refuse it
            model.to(torch.bfloat16)
        model.requires_grad_(False)
        if row.method == "floor":
            model.transformer.wte.weight.requires_grad_(True)  # tied: lm_head.weight is the same tensor
            net = model
        else:
            cfg = {
                "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA,
                                                lora_dropout=0.0, fan_in_fan_out=True,
                                                target_modules=["c_attn", "c_proj", "c_fc"]),
                "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
                "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
            }["lora" if row.method in QUANTIZED_BITS else row.method]()
            net = peft.get_peft_model(model, cfg)  # autocast_adapter_dtype=True: LoRA weights become fp32
    params = [p for p in net.parameters() if p.requires_grad]
    return (lambda idx: net(input_ids=idx, labels=idx).loss), params


def _bnb_quantized(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """The random bf16 model saved and loaded back through bitsandbytes (NF4 with double quantization, or
    LLM.int8()), as a user loads a quantized checkpoint; the temporary directory is gone afterwards."""
    import tempfile

    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16) if bits == 4
             else BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0))
    device = torch.get_default_device()
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        del model
        return GPT2LMHeadModel.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16,
                                               device_map={"": device})


def build_mp(row: Row, shape: Shape) -> tuple[LossOf, list[torch.nn.Parameter]]:
    """A minipeft GPT (random init) with the row's method, built on the current device; compiled if asked."""
    model = GPT(GPTConfig(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                          vocab_size=shape.vocab_size, block_size=shape.block_size, dropout=0.0))
    model.train()
    if row.method == "full":
        net = model
    else:
        model.to(torch.bfloat16)
        if row.method in QUANTIZED_BITS:
            quantize_model(model, "all-linear", bits=QUANTIZED_BITS[row.method])
        if row.method == "floor":
            model.requires_grad_(False)
            model.transformer.wte.weight.requires_grad_(True)  # tied: lm_head.weight is the same tensor
            net = model
        else:
            cfg = {
                "lora": lambda: LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear"),
                "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL),
                "prompt": lambda: PromptTuningConfig(num_virtual_tokens=N_VIRTUAL),
            }["lora" if row.method in QUANTIZED_BITS else row.method]()
            net = get_peft_model(model, cfg)  # freezes the base; adapters in the base's dtype
    params = [p for p in net.parameters() if p.requires_grad]
    if row.mode == "eager":
        forward = net
    else:  # "graphs": Inductor also captures the forward and the backward graphs as CUDA graphs
        forward = torch.compile(net, mode="reduce-overhead" if row.mode == "graphs" else None)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        targets = idx.roll(-1, 1)
        targets[:, -1] = -100
        return forward(idx, targets=targets, return_logits=False)[1]

    return loss_of, params


# ------------------------------------------------------------------------------------------ one timing loop
def run_row(row: Row, shape: Shape, device: torch.device, steps: int, warmup: int) -> dict:
    """Build the row, train `warmup` + `steps` steps; its tokens/s (from the median step) and peak GiB."""
    cuda = device.type == "cuda"
    backend = kernels.use_backend(row.backend) if row.backend is not None else contextlib.nullcontext()
    with backend:  # around the whole row: build, warm-up (compile) and timing
        torch._dynamo.reset()  # a fresh compile: no earlier row's graphs, no recompile limit reached
        torch.manual_seed(0)
        before_mb = reset_peak_memory(device)
        with torch.device(device):  # build every tensor where it will train
            loss_of, params = (build_hf if row.side == "hf" else build_mp)(row, shape)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        idx = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_of(idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = median_ms(step, repeats=steps, warmup=warmup)
        # On CUDA the allocator's peak since the reset (the allocated memory before the build was freed
        # by the previous row); on the CPU the process's resident set grows from `before_mb`.
        peak_mb = peak_memory_mb(device) - (0.0 if cuda else before_mb)
    return {"tokens_per_s": shape.batch * shape.seq / (ms / 1000), "step_ms": ms, "peak_gib": peak_mb / 1024}


def free(device: torch.device) -> None:
    """Release what the row just run left behind, before the next row's peak is measured."""
    torch._dynamo.reset()  # drop compiled graphs (and what their guards hold) of the row just run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def failure(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"failed: {type(e).__name__}: {first[:160]}"


# ------------------------------------------------------------------------------------------ report
def versions(device: torch.device) -> dict[str, str]:
    def version_of(module: str) -> str:
        try:
            return __import__(module).__version__
        except Exception as e:  # not installed, or fails to import on this platform
            return f"none ({type(e).__name__})"

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    return {"device": name, "torch": torch.__version__, "triton": version_of("triton"),
            "transformers": version_of("transformers"), "peft": version_of("peft"),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "minipeft commit": commit}


def summarise(rounds: list[dict]) -> dict:
    """The rounds' results of one row → median tokens/s, min–max, max peak; or the first failure."""
    ok = [r for r in rounds if "tokens_per_s" in r]
    if not ok:
        return {"error": next((r["error"] for r in rounds if "error" in r), "not run")}
    tps = [r["tokens_per_s"] for r in ok]
    out = {"tokens_per_s": statistics.median(tps), "min": min(tps), "max": max(tps),
           "peak_gib": max(r["peak_gib"] for r in ok), "rounds_ok": len(ok)}
    if len(ok) < len(rounds):
        out["error"] = next(r["error"] for r in rounds if "error" in r)
    return out


BASELINES = ("hf lora", "mp floor (best mode)", "hf same method", "mp lora, same backend")  # the × columns


def paired_ratios(per_round: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """row name → baseline → the row's tokens/s over the baseline's, one ratio per round both ran.

    Baselines: `hf lora`; `mp floor` in that round's fastest mode; the transformers row of the same method
    (`hf qlora` for `mp qlora/…`); and, for the quantized rows, minipeft's LoRA on a bf16 base with the same
    backend and mode."""
    def tps(name: str) -> dict[int, float]:  # round → tokens/s of that round, rounds that failed left out
        return {r["round"]: r["tokens_per_s"] for r in per_round.get(name, []) if "tokens_per_s" in r}

    floors: dict[int, float] = {}
    for name in per_round:
        if name.startswith("mp floor"):
            for rnd, v in tps(name).items():
                floors[rnd] = max(floors.get(rnd, 0.0), v)
    baselines = dict(zip(BASELINES, (
        lambda n: tps("hf lora"),
        lambda n: floors,
        lambda n: tps("hf " + n.split()[1].split("/")[0]),
        lambda n: tps(n.replace("qlora/", "lora/").replace("lora8/", "lora/")) if n.startswith(("mp qlora", "mp lora8"))
        else {},
    ), strict=True))
    out: dict[str, dict[str, list[float]]] = {}
    for name in per_round:
        row = tps(name)
        out[name] = {b: [row[k] / base[k] for k in sorted(row) if k in base]
                     for b, of in baselines.items() if (base := of(name))}
    return out


def print_table(results: dict[str, dict], ratios: dict[str, dict[str, list[float]]]) -> None:
    """One line per row; each ratio cell is the median of the per-round ratios [their min–max] (paired_ratios)."""
    baselines = BASELINES

    def cell(rs: list[float] | None) -> str:
        return f"{statistics.median(rs):.2f} [{min(rs):.2f}–{max(rs):.2f}]" if rs else ""

    width = max(len(n) for n in results)
    print(f"\n| {'row':<{width}} | tokens/s (median) | spread (min–max) | peak GiB | "
          + " | ".join(f"× {b}" for b in baselines) + " |")
    print(f"|{'-' * (width + 2)}|---|---|---|" + "---|" * len(baselines))
    for name, s in results.items():
        if "tokens_per_s" not in s:
            print(f"| {name:<{width}} | {s['error']} | | |" + " |" * len(baselines))
            continue
        note = f" ({s['rounds_ok']} round(s) ok; {s['error']})" if "error" in s else ""
        cells = [cell(ratios.get(name, {}).get(b)) for b in baselines]
        print(f"| {name:<{width}} | {s['tokens_per_s']:,.0f}{note} | {s['min']:,.0f}–{s['max']:,.0f} | "
              f"{s['peak_gib']:.2f} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (they also compile)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (≥ 2)")
    p.add_argument("--rows", default="", help='comma-separated row-name prefixes, each ending at a space or "/" '
                   '(e.g. "mp lora,hf lora": "hf lora" is not "hf lora8")')
    p.add_argument("--quick", action="store_true",
                   help="tiny shape (2 layers, 64 wide, vocab 512, 2 × 64 tokens), 3 steps, 1 warm-up")
    default_out = os.path.join(os.environ["OUT"], "e2e.json") if os.environ.get("OUT") else "runs/e2e.json"
    p.add_argument("--out", default=default_out, help=f"JSON of every number (default: {default_out})")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2: the spread needs two rounds")
    shape = QUICK if args.quick else GPT2_SMALL
    if args.quick:
        args.steps, args.warmup = 3, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device needs an index ("cuda" alone is refused)
        torch.cuda.set_device(device)

    prefixes = [s.strip() for s in args.rows.split(",") if s.strip()]
    # a prefix ends at a word: "hf lora" is the row "hf lora", not "hf lora8"; "mp lora" is every "mp lora/…"
    rows = [r for r in ALL_ROWS if not prefixes or any(
        r.name == x or (r.name.startswith(x) and (x[-1] in " /" or r.name[len(x)] in " /")) for x in prefixes)]
    if not rows:
        p.error(f"--rows {args.rows!r} matches no row; rows: {[r.name for r in ALL_ROWS]}")
    skipped: dict[str, str] = {}
    if device.type == "cpu":
        triton_why = kernels.available_backends()["triton"]
        for r in rows:
            if r.compiled:
                skipped[r.name] = "skipped: compiled rows run on CUDA only"
            elif r.backend == "triton" and triton_why != "ok":
                skipped[r.name] = f"skipped: triton backend unavailable ({triton_why})"

    header = versions(device)
    print(" | ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    print(f"shape: {shape.n_layer} layers × {shape.n_embd} wide, {shape.n_head} heads, vocab {shape.vocab_size}, "
          f"block {shape.block_size}; batch {shape.batch} × {shape.seq} tokens; bf16 autocast, fused AdamW; "
          f"{args.warmup} warm-up + {args.steps} timed steps per row, {args.rounds} rounds; "
          "step time wall-clock (host included)", flush=True)
    for name, why in skipped.items():
        print(f"{name}: {why}", flush=True)

    per_round: dict[str, list[dict]] = {r.name: [] for r in rows}
    start = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        round_start = time.perf_counter()
        for row in rows:
            if row.name in skipped:
                continue
            if any("error" in r for r in per_round[row.name]):  # failed before: do not pay for it again
                continue
            t0 = time.perf_counter()
            try:
                result = run_row(row, shape, device, args.steps, args.warmup)
            except Exception as e:  # a failing row (triton raising, compile failing, OOM) must not stop the run
                result = {"error": failure(e)}
            free(device)
            result["round"] = rnd  # ratios pair a row's round with the baseline's same round
            result["seconds"] = time.perf_counter() - t0
            per_round[row.name].append(result)
            cell = result.get("error") or f"{result['tokens_per_s']:,.0f} tok/s, {result['peak_gib']:.2f} GiB"
            print(f"  round {rnd} | {row.name} | {cell} | {result['seconds']:.1f} s", flush=True)
        print(f"round {rnd}/{args.rounds} done in {time.perf_counter() - round_start:.0f} s "
              f"({time.perf_counter() - start:.0f} s so far)", flush=True)

    results = {r.name: ({"error": skipped[r.name]} if r.name in skipped else summarise(per_round[r.name]))
               for r in rows}
    ratios = paired_ratios(per_round)
    print("\n" + " | ".join(f"{k} {v}" for k, v in header.items()))
    print(f"step time: wall-clock, host included; tokens/s: median over {args.rounds} rounds of B·T / (median step); "
          "× columns: the median [min–max] of the per-round ratios of tokens/s to that baseline's in the same round; "
          f"peak: {'max_memory_allocated' if device.type == 'cuda' else 'RSS growth'}, max over rounds")
    print_table(results, ratios)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")

    written = save_json({"header": header, "shape": dataclasses.asdict(shape),
                         "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                                      "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "num_virtual_tokens": N_VIRTUAL},
                         "rows": results, "ratios_per_round": ratios, "rounds": per_round}, args.out)
    print(f"wrote {args.out} ({written.size} bytes)")


if __name__ == "__main__":
    main()
