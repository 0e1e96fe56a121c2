"""Run by tests/test_fsdp_nf4.py under `torchrun --nproc_per_node 2` (CPU, gloo).

argv: OUT_DIR. Each rank writes:
  rank{R}.safetensors  the adapter after a few QLoRA steps under `minipeft finetune --fsdp` (tiny preset)
  rank{R}.json         for a QLoRA model sharded by shard_fsdp with a bf16 MixedPrecisionPolicy, once with
                       double quantization and once without: the 4-bit bytes this rank holds and the whole
                       model's, and what every NF4 layer held inside the forward pass (dtypes, bits)
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

from minipeft.checkpoint import save_safetensors
from minipeft.data import load_task, task_batch, task_loss
from minipeft.finetune import finetune, shard_fsdp
from minipeft.pretrain import load_base
from minipeft.quant import NF4Linear, quantize_model
from minipeft.tokenizer import ByteTokenizer
from minipeft.tuners import LoraConfig, LoraLinear, get_peft_model

STEPS, BATCH = 3, 4  # the test's 1-process run uses the same
STATISTICS = ("absmax", "absmax_scale", "absmax_offset")  # the fp32 fields of an NF4Weight


def resident_bytes(tensors) -> int:
    """Bytes of this rank's part: a sharded parameter's local shard, a buffer whole."""
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)


def check_sharded_qlora(double_quant: bool) -> dict:
    tok, task = ByteTokenizer(), load_task("sentiment")
    base = load_base("tiny", train_if_missing=False)
    model = get_peft_model(quantize_model(copy.deepcopy(base), double_quant=double_quant),
                           LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    whole = {name: {k: v.clone() for k, v in m.nf4_weight().tensors().items()} for name, m in layers.items()}
    dense = {name: m.dequantize_weight(torch.float32) for name, m in layers.items()}
    whole_bytes = sum(t.nbytes for state in whole.values() for t in state.values())

    shard_fsdp(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    rank_bytes = sum(resident_bytes([*m.parameters(recurse=False), *m.buffers(recurse=False)])
                     - (0 if m.bias is None else resident_bytes([m.bias])) for m in layers.values())  # fmt: skip
    rows = {name: list(m.codes.to_local().shape) for name, m in layers.items()}  # (blocks here, blocksize / 2)

    seen = {}  # what each NF4 layer holds while its block runs (gathered, under the bf16 policy)

    def look(wrapper: LoraLinear, args) -> None:
        name = next(n for n, m in layers.items() if m is wrapper.base_layer)
        q = wrapper.base_layer.nf4_weight()
        stats = {k: v for k, v in q.tensors().items() if k in STATISTICS}
        seen[name] = {
            "statistics_dtypes": sorted({str(v.dtype) for v in stats.values()}),
            "state_bits_equal": all(torch.equal(v, whole[name][k]) for k, v in q.tensors().items()),
            "weight_equal": torch.equal(wrapper.base_layer.dequantize_weight(torch.float32), dense[name]),
            "lora_dtype": str(wrapper.lora_A["default"].weight.dtype),
        }

    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.register_forward_pre_hook(look)
    idx, targets, mask = task_batch(task, tok, 4, base.config.block_size, torch.Generator().manual_seed(0))
    loss = task_loss(task, tok)(model, idx, targets, mask)
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad.full_tensor()).all().item()
                       for p in model.parameters() if p.requires_grad)  # fmt: skip
    return {"whole_bytes": whole_bytes, "rank_bytes": rank_bytes, "codes_rows": rows, "seen": seen,
            "loss": loss.item(), "grads_finite": grads_finite}  # fmt: skip


def main(out_dir: str) -> None:
    record = finetune("qlora", "sentiment", steps=STEPS, preset="tiny", device="cpu", batch_size=BATCH, fsdp=True,
                      progress=False)  # fmt: skip
    rank = dist.get_rank()
    save_safetensors(record.pop("trainable"), f"{out_dir}/rank{rank}.safetensors")
    report = {str(dq): check_sharded_qlora(dq) for dq in (True, False)}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
