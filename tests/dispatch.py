"""Recording the ATen operators a block of code dispatches, to count host syncs and kernel launches on the CPU."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Operators that read device data on the host: a GPU stream stalls until they return. `.item()`,
# `bool(t)`, `int(t)` and `float(t)` all arrive as `_local_scalar_dense`.
HOST_READING_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.unique_dim_consecutive",
        "aten.equal",
        "aten.repeat_interleave",
    }
)
# Indexing with a boolean mask computes the mask's `nonzero` inside the kernel, out of the dispatcher's sight.
MASK_INDEXING_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
# Operators that run no kernel: views, metadata and the wrapping of Python scalars.
NO_KERNEL_OPS = frozenset(
    {
        "aten.lift_fresh",
        "aten.view",
        "aten._unsafe_view",
        "aten.alias",
        "aten.as_strided",
        "aten.detach",
        "aten.expand",
        "aten.permute",
        "aten.t",
        "aten.transpose",
        "aten.unsqueeze",
        "aten.squeeze",
        "aten.slice",
        "aten.select",
        "aten.diagonal",
        "aten.unbind",
        "aten.split",
        "aten.split_with_sizes",
        "aten.narrow",
        "aten.reshape",
        "aten.flatten",
        "aten.unfold",
        "aten.sym_size",
        "aten.sym_stride",
        "aten.sym_numel",
        "aten.sym_storage_offset",
        "aten.is_same_size",
        "aten._reshape_alias",
    }
)


@dataclass(frozen=True)
class Call:
    """One dispatched operator: its name (``aten.<op>``), overload, and the shapes and dtypes of its tensors."""

    op: str
    overload: str
    signature: tuple[tuple[tuple[int, ...], str], ...]

    @property
    def reads_host(self) -> bool:
        """Whether the operator makes the host wait for the device."""
        if self.op in HOST_READING_OPS:
            return True
        return self.op in MASK_INDEXING_OPS and any(
            dtype in ("torch.bool", "torch.uint8") for _, dtype in self.signature
        )

    @property
    def launches_kernel(self) -> bool:
        """Whether the operator is expected to launch work on the device (not a view or metadata)."""
        return self.op not in NO_KERNEL_OPS


class DispatchRecorder(TorchDispatchMode):
    """A dispatch mode that records every operator reaching the dispatcher, in order.

    Example:
        >>> with DispatchRecorder() as recorder:
        ...     _ = torch.ones(3).sum().item()
        >>> recorder.host_syncs()
        Counter({'aten._local_scalar_dense': 1})
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        signature = tuple((tuple(t.shape), str(t.dtype)) for t in tensors)
        self.calls.append(Call(str(func.overloadpacket), str(func._overloadname), signature))
        return func(*args, **kwargs)

    def host_syncs(self) -> Counter[str]:
        """How many times each host-reading operator ran."""
        return Counter(call.op for call in self.calls if call.reads_host)

    def kernels(self) -> int:
        """How many operators that launch a kernel ran."""
        return sum(call.launches_kernel for call in self.calls)


# A kernel launch in the ``call`` function of the code Inductor generates: its own fused kernels (C++ on the
# CPU, Triton on GPUs), library kernels (``extern_kernels.addmm``) and ATen fallbacks.
_GENERATED_LAUNCH = re.compile(r"^\s+(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|aten\.\w+(\.\w+)?)\(", re.M)


def generated_launches(code: str) -> int:
    """How many kernels one run of a function compiled by ``torch.compile`` launches, from its generated code."""
    start = code.index("def call(")
    rest = code[start:].partition("\n")[2]
    # The function ends at the first line indented no more than its ``def``.
    indent = len(code[:start].rpartition("\n")[2])
    end = re.search(rf"^ {{0,{indent}}}\S", rest, re.M)
    return len(_GENERATED_LAUNCH.findall(rest[: end.start() if end else None]))
