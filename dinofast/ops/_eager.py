"""When an op may skip the dispatcher and run its implementation directly.

Each public op is registered with torch.library (opaque to torch.compile / torch.export, with fake
and autograd kernels), but a call through the dispatcher costs tens of microseconds of Python on
the way in and out, more than a small kernel. A plain eager call that needs no autograd runs the
same implementation directly; everything else (compiling, exporting, fake/meta tensors, tensor
subclasses, torch function/dispatch modes, functorch transforms, autograd) goes through the
registered op.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

_PLAIN = (Tensor, Parameter)
# bound once: this runs on every op call
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.peek_interpreter_stack
_grad_enabled = torch.is_grad_enabled


def direct_call_ok(*tensors) -> bool:
    """True when the implementation may run without the dispatcher for these (optional) tensors."""
    if _is_compiling():  # first: the rest is not traceable
        return False
    if _dispatch_modes() or _function_modes() or _functorch_level() is not None:
        return False
    grad = _grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or not (t.is_cpu or t.is_cuda) or (grad and t.requires_grad):
            return False
    return True
