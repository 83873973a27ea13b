"""AdamW that knows capacity buffers: one step counter per slot.

torch's Adam keeps one `step` per Parameter, so a slot that goes live at step k would get the bias
corrections of step k: its first updates come out 3-6x too large (docs/algorithm.md). Here every slot
of an adapter buffer counts its own steps from the moment it goes live, so a slot grown at step k moves
exactly as a fresh Adam would. Dead slots are never touched (no moments, no decay, no update).

Adapter Parameters are recognised through `nn/slots.py` (SeLoRALinear registers its A and B there);
any other Parameter gets the ordinary AdamW update. With weight_decay=0 this is Adam.
"""
from __future__ import annotations

import math
import weakref

import torch

from ..nn.slots import live_rank_of, owner_of, slot_dim_of
from ..ops.capacity import adam_step_


class SeLoRAAdamW(torch.optim.Optimizer):
    """AdamW with per-slot step counts for SeLoRA adapter buffers (fused in the C++ extension)."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _slot_state(self, param):
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["slot_steps"] = torch.zeros(param.shape[slot_dim_of(param)], dtype=torch.float32,
                                              device=param.device)
        return state

    # Instances whose state came from load_state_dict (held weakly): optim/state_growth.py grows their
    # state on expansion even before their first step, which its step pre-hook registry waits for.
    _loaded_state = weakref.WeakSet()

    def load_state_dict(self, state_dict) -> None:
        """torch casts every floating state tensor but "step" to the parameter's dtype: slot step counters
        must stay fp32 (bf16 counts exactly only to 256), so they are put back from the saved copy.

        Before anything is loaded, the saved state of every capacity buffer is checked against the buffer
        (shapes; slot steps present; moments and slot steps of dead slots, beyond the module's live rank,
        all zero): a state saved at another rank or capacity raises ValueError naming the parameter and
        its module, instead of being kept stale or failing only at step()."""
        self._check_saved_state(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        slot_steps = {i: state_dict["state"][i]["slot_steps"] for i in saved_ids
                      if "slot_steps" in state_dict["state"].get(i, {})}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id in slot_steps:
                self.state[param]["slot_steps"] = slot_steps[saved_id].to(device=param.device,
                                                                          dtype=torch.float32, copy=True)
        SeLoRAAdamW._loaded_state.add(self)

    def _check_saved_state(self, state_dict) -> None:
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(group["params"])
                for saved, group in zip(saved_groups, self.param_groups)):
            return  # torch's load_state_dict raises its own ValueError for groups that do not match
        saved_ids = [i for group in saved_groups for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, (saved_id, param) in enumerate(zip(saved_ids, params)):
            state = state_dict.get("state", {}).get(saved_id)
            if state:
                self._check_saved_param_state(index, param, state)

    @staticmethod
    def _describe_parameter(index: int, param, owner) -> str:
        if owner is None:
            return f"parameter {index}"
        attribute = next((name for name in ("lora_A", "lora_B") if getattr(owner, name, None) is param),
                         "capacity buffer")
        return f"parameter {index} ({attribute} of {getattr(owner, 'selora_name', type(owner).__name__)})"

    @staticmethod
    def _check_saved_param_state(index: int, param, state: dict) -> None:
        """ValueError when the saved state of one parameter does not fit it (see load_state_dict)."""
        dim = slot_dim_of(param)
        owner = owner_of(param) if dim is not None else None
        label = SeLoRAAdamW._describe_parameter(index, param, owner)
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or (key == "step" and value.dim() == 0):
                continue
            if key == "slot_steps":
                if dim is None:
                    raise ValueError(f"SeLoRAAdamW.load_state_dict: the saved state of {label} has slot_steps, "
                                     f"but the parameter (shape {tuple(param.shape)}) is not a SeLoRA capacity buffer")
                expected = (param.shape[dim],)
            else:
                expected = tuple(param.shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"SeLoRAAdamW.load_state_dict: saved state {key!r} of {label} has shape "
                                 f"{tuple(value.shape)}, the parameter needs {expected} (parameter shape "
                                 f"{tuple(param.shape)}): the state was saved at another capacity or for another "
                                 "model")
        if dim is None:
            return
        if "slot_steps" not in state:
            raise ValueError(f"SeLoRAAdamW.load_state_dict: the saved state of {label} has no slot_steps (keys "
                             f"{sorted(state)}): not a SeLoRAAdamW state of a capacity buffer")
        if owner is None:
            return
        # the host mirror of the live rank where the owner keeps one (no device read)
        live = owner.rank if isinstance(getattr(owner, "rank", None), int) else int(owner.live_rank)
        capacity = param.shape[dim]
        if live >= capacity:
            return
        name = getattr(owner, "selora_name", type(owner).__name__)
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            dead = value[live:] if key == "slot_steps" else value.narrow(dim, live, capacity - live)
            if dead.any():
                raise ValueError(f"SeLoRAAdamW.load_state_dict: {name} has live rank {live}, but the saved state "
                                 f"{key!r} of {label} is non-zero in dead slots {live}..{capacity - 1}: the state "
                                 "was saved at another rank (load the matching adapter first); dead slots must stay "
                                 "empty")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            buffers = {key: [] for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "slot_steps",
                                           "live_ranks", "slot_dims")}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("SeLoRAAdamW does not support sparse gradients")
                dim = slot_dim_of(param)
                if dim is None:
                    self._plain_adamw(param, lr, beta1, beta2, eps, wd)
                    continue
                state = self._slot_state(param)
                buffers["params"].append(param)
                buffers["grads"].append(param.grad)
                buffers["exp_avgs"].append(state["exp_avg"])
                buffers["exp_avg_sqs"].append(state["exp_avg_sq"])
                buffers["slot_steps"].append(state["slot_steps"])
                buffers["live_ranks"].append(live_rank_of(param))
                buffers["slot_dims"].append(dim)
            if buffers["params"]:
                adam_step_(buffers["params"], buffers["grads"], buffers["exp_avgs"], buffers["exp_avg_sqs"],
                           buffers["slot_steps"], buffers["live_ranks"], buffers["slot_dims"],
                           lr, beta1, beta2, eps, wd)
        return loss

    def _plain_adamw(self, param, lr, beta1, beta2, eps, wd):
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        grad = param.grad
        param.mul_(1 - lr * wd)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))
