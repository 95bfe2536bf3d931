"""Host-to-device and device-to-host copies that do not make the host wait for the device.

A copy from pageable host memory to a GPU first waits for all the work queued on the device, and reading a
GPU value on the host waits for the step that computes it; either would stop the host from preparing the
next step while the device runs this one (async scheduling)."""
import torch


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values on the device, copied from pinned memory without blocking where the device is a GPU."""
    pinned = device.type == "cuda"
    if isinstance(values, torch.Tensor):
        return (values.pin_memory() if pinned else values).to(device, non_blocking=pinned)
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts the copy of a device tensor to (pinned) host memory; valid once the device has reached it
    (a recorded event). A CPU tensor is returned as it is."""
    return t.to("cpu", non_blocking=True)
