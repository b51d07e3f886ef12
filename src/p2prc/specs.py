"""What this machine offers: CPU, memory, disk and GPUs."""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from functools import cache
from pathlib import Path

import psutil

from .models import CpuInfo, DiskInfo, GpuInfo, MemoryInfo, OsInfo, Specs

__all__ = ["collect_specs", "gpus", "interfaces"]

log = logging.getLogger(__name__)

_GPU_CACHE_SECONDS = 30.0
_gpu_cache: tuple[float, list[GpuInfo]] | None = None


@cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Processor", "cpu model")):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def _distribution() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        return ""


def gpus() -> list[GpuInfo]:
    """NVIDIA GPUs through NVML, or an empty list when there is no NVML or no GPU."""
    global _gpu_cache
    now = time.monotonic()
    if _gpu_cache is not None and now - _gpu_cache[0] < _GPU_CACHE_SECONDS:
        return _gpu_cache[1]
    found = _query_nvml()
    _gpu_cache = (now, found)
    return found


def _query_nvml() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound and friends: no driver here.
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            found.append(GpuInfo(index=index, name=name, memory_total=memory.total, driver=driver))
        return found
    except Exception as exc:
        log.warning("NVML query failed: %s", exc)
        return []
    finally:
        pynvml.nvmlShutdown()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def collect_specs(disk_path: Path) -> Specs:
    """A snapshot of this machine's resources."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    uname = platform.uname()
    return Specs(
        hostname=socket.gethostname(),
        os=OsInfo(
            system=uname.system,
            release=uname.release,
            machine=uname.machine,
            distribution=_distribution(),
        ),
        cpu=CpuInfo(
            model=_cpu_model(),
            cores=os.cpu_count() or 1,
            physical_cores=psutil.cpu_count(logical=False),
            load_1m=os.getloadavg()[0],
        ),
        memory=MemoryInfo(total=memory.total, available=memory.available),
        disk=DiskInfo(path=str(disk_path), total=disk.total, free=disk.free),
        gpus=gpus(),
    )


def interfaces() -> list[dict[str, str]]:
    """Every interface address: name, family, address, netmask."""
    rows = []
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            family = "ipv4" if address.family == socket.AF_INET else "ipv6"
            rows.append(
                {
                    "interface": name,
                    "family": family,
                    "address": address.address,
                    "netmask": address.netmask or "",
                }
            )
    return rows


_ADDRESS_CACHE_SECONDS = 10.0
_address_cache: tuple[float, list[str]] | None = None


def own_addresses() -> list[str]:
    """This machine's IP addresses, loopback and link-local excluded (cached for 10 s)."""
    global _address_cache
    now = time.monotonic()
    if _address_cache is None or now - _address_cache[0] > _ADDRESS_CACHE_SECONDS:
        _address_cache = (now, _scan_addresses())
    return list(_address_cache[1])


def _scan_addresses() -> list[str]:
    found = []
    for row in interfaces():
        address = row["address"].split("%")[0]
        if address.startswith(("127.", "fe80:")) or address == "::1":
            continue
        found.append(address)
    return found
