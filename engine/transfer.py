"""Host-to-device and device-to-host copies that do not make the host wait for the device.

A copy from pageable host memory to a GPU first waits for all the work queued on the device, and reading a
GPU value on the host waits for the step that computes it; either would stop the host from preparing the
next step while the device runs this one (async scheduling)."""
import numpy as np
import torch

_NUMPY_DTYPES = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values on the device, copied from pinned memory without blocking where the device is a GPU."""
    pinned = device.type == "cuda"
    if not isinstance(values, torch.Tensor):
        # numpy reads a list of Python numbers 2-4x faster than torch.tensor (a 32k-token step's ids: 0.4 ms
        # against 1.7 ms)
        values = torch.from_numpy(np.fromiter(values, dtype=_NUMPY_DTYPES[dtype], count=len(values)))
    return (values.pin_memory() if pinned else values).to(device, non_blocking=pinned)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts the copy of a device tensor to (pinned) host memory; valid once the device has reached it
    (a recorded event). A CPU tensor is returned as it is."""
    return t.to("cpu", non_blocking=True)
