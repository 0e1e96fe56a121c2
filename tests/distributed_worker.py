"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

argv: METHOD LAYOUT OUT_DIR, with LAYOUT "ddp" or "fsdp". Fine-tunes the method briefly through
minipeft.finetune (which joins the process group), and each rank writes the trainable weights it ends with.
"""

import sys

import torch.distributed as dist

from minipeft.checkpoint import save_safetensors
from minipeft.finetune import finetune


def main(method: str, layout: str, out_dir: str) -> None:
    record = finetune(method, "sentiment", steps=12, preset="default", device="cpu", out=f"{out_dir}/adapter",
                      batch_size=16, fsdp=layout == "fsdp", progress=False)
    rank = dist.get_rank()
    save_safetensors(record.pop("trainable"), f"{out_dir}/rank{rank}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
