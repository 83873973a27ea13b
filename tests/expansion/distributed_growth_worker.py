"""Worker for test_distributed_growth: trains a small SeLoRA model across growths past capacity.

    python distributed_growth_worker.py OUT {single,ddp,accelerate}
(under `torchrun --nproc_per_node 2` for ddp/accelerate). Every process sees its half of one global batch;
`single` sees the whole batch in one process. Writes OUT/<mode>-<rank>.pt with ranks, weights, trial rows,
optimizer state and decisions.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selora_kernels import ExpansionController, SeLoRAAdamW, SeLoRAConfig, inject_selora

STEPS, GLOBAL_BATCH = 16, 8


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    accelerator = None
    if mode == "accelerate":
        from accelerate import Accelerator  # only this mode uses accelerate
        accelerator = Accelerator(cpu=True)
    elif mode == "ddp":
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(100)  # identical base and adapters on every process
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    modules = inject_selora(model, SeLoRAConfig(target_modules="all_linear", capacity=3), prefix="net")
    optimizer = SeLoRAAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2)
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif mode == "accelerate":
        model, optimizer = accelerator.prepare(model, optimizer)
    # threshold 1.0: every test grows every module, so capacity 3 is crossed twice (3 -> 7 -> 15)
    controller = ExpansionController(model, optimizer, SeLoRAConfig(threshold=1.0, interval=2), seed=7)
    generator = torch.Generator().manual_seed(1000)
    per_process = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator)
        x, y = x[rank * per_process:(rank + 1) * per_process], y[rank * per_process:(rank + 1) * per_process]
        controller.before_forward(step)
        loss = F.mse_loss(model(x), y)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.after_step(step)
    state = {name: {"rank": m.rank, "capacity": m.capacity, "A": m.lora_A.detach().clone(),
                    "B": m.lora_B.detach().clone(), "trial": m.trial_row.clone(),
                    "adam": {key: value.clone() for p in (m.lora_A, m.lora_B)
                             for key, value in optimizer.state[p].items() if torch.is_tensor(value)}}
             for name, m in modules.items()}
    state["decisions"] = [tuple(d) for d in controller.history]
    torch.save(state, os.path.join(out_dir, f"{mode}-{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
