"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2`: a short DDP training on CPU (gloo).

Each rank writes its final weights and losses to OUT_DIR, so the test can check that the ranks agree.
Optional argv[2] = "diverge": rank 1's loss is NaN from step 3 on; every rank must stop there together (each
writes the step it stopped at), none left waiting in a collective.
"""

import json
import sys

import torch
import torch.distributed as dist

from minipeft.checkpoint import save_safetensors
from minipeft.data import load_task, task_batch
from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, TrainingDivergedError, train


def diverge(out_dir: str, rank: int, model: GPT, get_batch) -> None:
    calls = []

    def loss_fn(net, idx, targets, mask):
        calls.append(1)
        loss = net(idx, targets=targets, attention_mask=mask, return_logits=False)[1]
        return loss * float("nan") if rank == 1 and len(calls) >= 3 else loss

    try:
        train(model, get_batch, TrainConfig(steps=10, lr=3e-3, batch_size=16, seed=0), progress=False, loss_fn=loss_fn)
        stopped = None
    except TrainingDivergedError as e:
        stopped = e.step
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"stopped_at": stopped}, f)
    dist.destroy_process_group()


def main(out_dir: str, mode: str = "") -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = GPT(GPTConfig(block_size=96, n_layer=2, n_head=2, n_embd=32))
    tok, task = ByteTokenizer(), load_task("sentiment")
    if mode == "diverge":
        return diverge(out_dir, rank, model, lambda g: task_batch(task, tok, 16, 96, g))
    result = train(model, lambda g: task_batch(task, tok, 16, 96, g),
                   TrainConfig(steps=30, lr=3e-3, batch_size=16, warmup_steps=3, seed=0), progress=False)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    save_safetensors(weights, f"{out_dir}/rank{rank}.safetensors")
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result.losses, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
