"""Many LoRA adapters in one batch: minipeft's mixed-adapter pass against HF peft's and against one adapter.

GPT-2-small shape (12 × 768, vocab 50257; random weights, no download), bf16, eval mode; batch B = 64 rows of
256 prompt tokens; N ∈ {1, 4, 16, 64} LoRA adapters (r = 16, α = 32, every Linear but lm_head, random A and B),
row b using adapter b mod N. Rows, each timed wall-clock with the device synchronised (host included):

    prefill   one forward of the (64, 256) batch, `adapter_names=` one name per row
    decode    ms per generated token with the KV cache: (generate 1 + D new tokens − generate 1) / D, greedy
    train     (minipeft) one AdamW step on a (16, 256) batch of 4 adapters, mixed, against 4 single-adapter
              steps of 4 rows each (the same rows, the same adapters)

Sides: `mp mixed` (minipeft, `adapter_names=`, kernel backend "auto": for inference the gathered route of
kernels/multi_lora_routes.py, three launches a layer), `mp mixed/triton` (the same on backend "triton": the
segmented kernels of kernels/multi_lora_triton.py, one or two launches a layer for all adapters), `hf mixed` (HF
peft's `adapter_names=`: a loop over the adapters inside every LoRA layer, on the same weights loaded through
minipeft's peft-format export), `mp one` (minipeft, the whole batch on one adapter, unmerged — "auto"'s
merged-weight cache off, so the LoRA branch runs: the cost a mixed batch is measured against) and `mp one
merged` ("auto" as it comes, which serves one adapter at inference from a cached W + s·B·A: the frozen base's
cost). Each figure is the median over `--rounds` interleaved rounds of the median of `--repeats` calls; the
spread is the rounds' min–max.

On CUDA the prefill of `mp one` and `mp mixed` is also timed captured in a CUDA graph and replayed
(`minipeft.measure.cuda_graph`: the host's time gone), and the prefill target's ratio takes each side in its
best mode, round by round. Training also times 4 quarter-batch steps as a user writes them (`set_adapter`, then a
plain forward), and with `--train-graphs` both training sides as CUDA graphs (forward, backward and AdamW with
capturable=True, which the eager rows then use too).

    python benchmarks/multi_adapter.py [--ns 1 4 16 64] [--rounds 3] [--train-graphs]   # CUDA GPU
    python benchmarks/multi_adapter.py --quick --device cpu                   # smoke test, tiny shape
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import tempfile

import torch

from minipeft import GPT, GPTConfig, LoraConfig, get_peft_model, kernels
from minipeft.checkpoint import save_json
from minipeft.measure import cuda_graph, median_ms


def build(config: GPTConfig, n: int, device: torch.device, dtype: torch.dtype):
    """A minipeft PeftModel with adapters a0 … a{n-1} (random A and B), in eval mode."""
    torch.manual_seed(0)
    gpt = GPT(config).to(device=device, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    pm = get_peft_model(gpt, lora, adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", lora)
    return pm.eval()


def build_hf(pm, n: int, device: torch.device, dtype: torch.dtype):
    """The same base and adapters in transformers + HF peft, through the files each library writes."""
    import peft
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        plain = GPT(pm.base_model.config)  # GPT.save_pretrained refuses a model with adapters in it: a copy
        plain.load_state_dict(_plain_state(pm))
        plain.save_pretrained(f"{tmp}/base")
        for i in range(n):
            pm.save_adapter(f"{tmp}/a{i}", f"a{i}", format="peft")
        hf = GPT2LMHeadModel.from_pretrained(f"{tmp}/base", dtype=dtype).to(device)
        hf = peft.PeftModel.from_pretrained(hf, f"{tmp}/a0", adapter_name="a0")
        for i in range(1, n):
            hf.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
    return hf.eval()


def _plain_state(pm) -> dict[str, torch.Tensor]:
    """The base GPT's own tensors (wrapper segments and adapter tensors left out), in fp32."""
    out = {}
    for k, v in pm.base_model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.float().cpu()
    return out


@contextlib.contextmanager
def merged_cache_off():
    """One adapter unmerged: "auto"'s merged-weight cache (kernels/lora_routes.py) off for the block."""
    routes = kernels.lora_routes
    if routes is None:  # no Triton: "auto" is the reference, which never merges
        yield
        return
    kept, routes.MERGED_CACHE_BYTES = routes.MERGED_CACHE_BYTES, 0
    routes.clear_cache()
    try:
        yield
    finally:
        routes.MERGED_CACHE_BYTES = kept


def _prefill_and_decode(out: dict[str, float], side: str, pm, idx, new: int, repeats: int, **kw) -> None:
    """out[side + " prefill"]: one forward; out[side + " decode"]: ms per new token of generate."""
    out[f"{side} prefill"] = median_ms(lambda: pm(idx, **kw), repeats)
    g1 = median_ms(lambda: pm.generate(idx, max_new_tokens=1, **kw), repeats)
    gd = median_ms(lambda: pm.generate(idx, max_new_tokens=1 + new, **kw), repeats)
    out[f"{side} decode"] = (gd - g1) / new


def time_rows(pm, hf, n: int, B: int, T: int, new: int, repeats: int, device: torch.device) -> dict[str, float]:
    vocab = pm.base_model.config.vocab_size
    idx = torch.randint(0, vocab, (B, T), device=device, generator=torch.Generator(device).manual_seed(1))
    names = [f"a{b % n}" for b in range(B)]
    out: dict[str, float] = {}
    with torch.no_grad():
        pm.set_adapter("a0")
        with merged_cache_off():
            _prefill_and_decode(out, "mp one", pm, idx, new, repeats)
        _prefill_and_decode(out, "mp one merged", pm, idx, new, repeats)
        _prefill_and_decode(out, "mp mixed", pm, idx, new, repeats, adapter_names=names)
        if device.type == "cuda":
            with kernels.use_backend("triton"):
                _prefill_and_decode(out, "mp mixed/triton", pm, idx, new, repeats, adapter_names=names)
            # The prefill in its other mode: captured once in a CUDA graph and replayed (host time gone).
            with merged_cache_off():
                out["mp one graph prefill"] = median_ms(cuda_graph(lambda: pm(idx)), repeats)
            out["mp mixed graph prefill"] = median_ms(cuda_graph(lambda: pm(idx, adapter_names=names)), repeats)
            torch.cuda.empty_cache()  # the graphs' pools (their logits: B·T·vocab values each) go with them
        if hf is not None:
            out["hf mixed prefill"] = median_ms(lambda: hf(input_ids=idx, adapter_names=names), repeats)
            kw = dict(do_sample=False, pad_token_id=0, adapter_names=names)
            g1 = median_ms(lambda: hf.generate(input_ids=idx, max_new_tokens=1, min_new_tokens=1, **kw), repeats)
            gd = median_ms(lambda: hf.generate(input_ids=idx, max_new_tokens=1 + new, min_new_tokens=1 + new, **kw),
                           repeats)
            out["hf mixed decode"] = (gd - g1) / new
    return out


def time_training(pm, B: int, T: int, repeats: int, device: torch.device, graphs: bool = False
                  ) -> dict[str, float]:
    """One AdamW step on 4 adapters: a mixed batch of B rows against 4 steps of B/4 rows, one adapter each.
    With `graphs` (CUDA), also each side's whole step captured in a CUDA graph and replayed (its best mode
    where host time dominates)."""
    names4 = ["a0", "a1", "a2", "a3"]
    pm.train()
    pm.set_adapter(names4)  # makes the four trainable
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, capturable=graphs)  # capturable: its step count on the device
    vocab = pm.base_model.config.vocab_size
    idx = torch.randint(0, vocab, (B, T), device=device, generator=torch.Generator(device).manual_seed(2))
    names = [names4[b % 4] for b in range(B)]
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def mixed():
        with autocast:
            loss = pm(idx, targets=targets, return_logits=False, adapter_names=names)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def separate():
        for i, name in enumerate(names4):
            rows = slice(i, B, 4)
            with autocast:
                loss = pm(idx[rows], targets=targets[rows], return_logits=False, adapter_names=[name] * (B // 4))[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def separate_active():  # the same steps as a user would write them: set_adapter, then a plain forward
        for i, name in enumerate(names4):
            pm.set_adapter(name)
            rows = slice(i, B, 4)
            with autocast:
                loss = pm(idx[rows], targets=targets[rows], return_logits=False)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        pm.set_adapter(names4)

    out = {"mp train mixed (4 adapters)": median_ms(mixed, repeats),
           "mp train 4 separate steps": median_ms(separate, repeats),
           "mp train 4 separate steps, set_adapter": median_ms(separate_active, repeats)}
    if graphs:  # the steps above as CUDA graphs: forward, backward and the optimizer's step, replayed as one
        out["mp train mixed (4 adapters), CUDA graph"] = median_ms(cuda_graph(mixed), repeats)
        out["mp train 4 separate steps, set_adapter, CUDA graph"] = median_ms(cuda_graph(separate_active), repeats)
        torch.cuda.empty_cache()
    pm.eval()
    return out


def _ratio(per_round: dict[str, list[float]], med: dict[str, float], top: str, bottom: str
           ) -> tuple[float, float, float]:
    """top / bottom: the ratio of the medians, and the least and greatest of the rounds' own ratios."""
    each = [a / b for a, b in zip(per_round[top], per_round[bottom], strict=True)]
    return med[top] / med[bottom], min(each), max(each)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16, help="D: decode steps timed per generate call")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers + peft side")
    ap.add_argument("--train-graphs", action="store_true", help="also time the training steps as CUDA graphs")
    ap.add_argument("--quick", action="store_true", help="tiny shape (2 × 64, vocab 512), batch 8 × 32")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "multi_adapter.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        config, B, T, train_B = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=128), 8, 32, 8
    else:
        config = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, dropout=0.0)
        B, T, train_B = 64, 256, 16
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {device} "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} | torch {torch.__version__} | "
          f"B={B}, T={T}, {dtype}", flush=True)
    models = {}
    for n in args.ns:
        print(f"building N={n}", flush=True)
        pm = build(config, n, device, dtype)
        models[n] = (pm, None if args.no_hf else build_hf(pm, n, device, dtype))
    per_round: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for n, (pm, hf) in models.items():
            for k, v in time_rows(pm, hf, n, B, T, args.new_tokens, args.repeats, device).items():
                per_round.setdefault(f"N={n} {k}", []).append(v)
                print(f"  N={n} {k}: {v:.2f} ms", flush=True)
        pm4 = next((pm for n, (pm, _) in models.items() if n >= 4), None)
        if pm4 is not None:
            graphs = args.train_graphs and device.type == "cuda"
            for k, v in time_training(pm4, train_B, T, args.repeats, device, graphs).items():
                per_round.setdefault(k, []).append(v)
                print(f"  {k}: {v:.2f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in per_round.items()}
    print("\n| row | ms (median) | spread (min–max) |\n|---|---|---|")
    for k, v in per_round.items():
        print(f"| {k} | {med[k]:.2f} | {min(v):.2f}–{max(v):.2f} |")
    print("\nratios (same run): of the medians, and [min–max] of the rounds' own ratios")
    ratios = {}
    for n in args.ns:
        for phase in ("prefill", "decode"):
            mp, one, hf, tri = (f"N={n} {side} {phase}" for side in ("mp mixed", "mp one", "hf mixed",
                                                                    "mp mixed/triton"))
            ratios[f"N={n} {phase} mixed / one adapter"] = _ratio(per_round, med, mp, one)
            if tri in med:
                ratios[f"N={n} {phase} mixed/triton / one adapter"] = _ratio(per_round, med, tri, one)
            if hf in med:
                ratios[f"N={n} {phase} hf mixed / mp mixed"] = _ratio(per_round, med, hf, mp)
    for n in args.ns:  # each side in its best mode (eager or CUDA graph), round by round
        for side in ("mp mixed", "mp one"):
            eager, graph = per_round[f"N={n} {side} prefill"], per_round.get(f"N={n} {side} graph prefill")
            if graph is not None:
                per_round[f"N={n} {side} best prefill"] = [min(e, g) for e, g in zip(eager, graph, strict=True)]
                med[f"N={n} {side} best prefill"] = statistics.median(per_round[f"N={n} {side} best prefill"])
        if f"N={n} mp mixed best prefill" in med:
            ratios[f"N={n} prefill mixed / one adapter, each in its best mode"] = _ratio(
                per_round, med, f"N={n} mp mixed best prefill", f"N={n} mp one best prefill")
            ratios[f"N={n} prefill mixed / one adapter, both in CUDA graphs"] = _ratio(
                per_round, med, f"N={n} mp mixed graph prefill", f"N={n} mp one graph prefill")
    for baseline in ("mp train 4 separate steps", "mp train 4 separate steps, set_adapter"):
        if baseline in med:
            ratios[f"training: {baseline[9:]} / one mixed step"] = _ratio(
                per_round, med, baseline, "mp train mixed (4 adapters)")
    graph = ", CUDA graph"
    if f"mp train mixed (4 adapters){graph}" in med:
        ratios["training, both in CUDA graphs: 4 separate steps, set_adapter / one mixed step"] = _ratio(
            per_round, med, f"mp train 4 separate steps, set_adapter{graph}", f"mp train mixed (4 adapters){graph}")
    for name, (r, lo, hi) in ratios.items():
        print(f"  {name}: {r:.2f}× [{lo:.2f}–{hi:.2f}]")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save_json({"rounds": per_round, "median": med, "ratios": ratios, "B": B, "T": T}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
