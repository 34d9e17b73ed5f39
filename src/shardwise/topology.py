"""Device partition configs: which devices form the mesh, threads per rank, and how devices are linked.

The file is the Qualcomm Cloud AI 100 partition-config JSON::

    {
      "partitions": [
        {"name": "p0", "devices": [{"deviceId": 0, "numCores": 4}, {"deviceId": 1, "numCores": 4}]}
      ],
      "connections": [{"devices": [0, 1], "type": "p2p"}]
    }

A partition's devices, in the order listed, are the ranks of the mesh (world size = their number).
On CPU each device is one rank process using ``numCores`` threads; on CUDA rank ``r`` runs on
``cuda:<deviceId>`` (``numCores`` host threads). A connection lists devices that reach each other
peer to peer; devices with no connection between them exchange data through the host (no
``connections`` at all means everything goes through the host). The capacity estimate uses that to pick the
link figures for collective traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ShardwiseError
from .settings import usable_cores
from .untrusted import read_json

CONNECTION_TYPES = ("p2p",)
P2P, HOST = "p2p", "host"


@dataclass(frozen=True)
class DeviceSpec:
    device_id: int
    num_cores: int


@dataclass(frozen=True)
class Partition:
    name: str
    devices: tuple[DeviceSpec, ...]

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def device_ids(self) -> tuple[int, ...]:
        return tuple(d.device_id for d in self.devices)


@dataclass(frozen=True)
class PartitionConfig:
    partitions: tuple[Partition, ...]
    connections: tuple[frozenset[int], ...]  # p2p cliques
    source: str = "<inline>"

    def partition(self, name: str | None = None) -> Partition:
        """The partition called ``name``; without a name, the only one (several need a name)."""
        names = [p.name for p in self.partitions]
        if name is None:
            if len(self.partitions) > 1:
                raise ShardwiseError(f"{self.source} has {len(names)} partitions ({', '.join(names)}); "
                                     "choose one with --partition NAME")
            return self.partitions[0]
        for p in self.partitions:
            if p.name == name:
                return p
        raise ShardwiseError(f"{self.source} has no partition {name!r}; its partitions are {', '.join(names)}")

    def link(self, a: int, b: int) -> str:
        """``p2p`` if a connection joins devices ``a`` and ``b``, else ``host``."""
        return P2P if any(a in c and b in c for c in self.connections) else HOST


@dataclass(frozen=True)
class Topology:
    """A partition resolved on this machine: per-rank devices and threads, and the ring's link kind."""

    partition: Partition
    kind: str  # "cpu" or "cuda"
    devices: tuple[str, ...]  # per rank: "cpu" or "cuda:<deviceId>"
    threads: tuple[int, ...]  # per rank: torch threads (numCores, capped to this machine's cores)
    link: str  # p2p if every hop of the rank ring is a p2p connection, else host
    capped: str = ""  # when numCores exceed this machine's cores: the line saying how they were capped

    @property
    def world_size(self) -> int:
        return len(self.devices)


def _fail(source: str, what: str) -> ShardwiseError:
    return ShardwiseError(f"{source}: {what}")


def _int(value: object, where: str, source: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(source, f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_partition_config(data: object, source: str = "<inline>") -> PartitionConfig:
    """Validate the JSON structure (types, duplicates, references); machine limits come later."""
    if not isinstance(data, dict):
        raise _fail(source, "a partition config is a JSON object with a `partitions` list")
    unknown = sorted(set(data) - {"partitions", "connections"})
    if unknown:
        raise _fail(source, f"unknown key {unknown[0]!r}; expected partitions, connections")
    raw_parts = data.get("partitions")
    if not isinstance(raw_parts, list) or not raw_parts:
        raise _fail(source, "`partitions` must be a non-empty list")
    partitions: list[Partition] = []
    owner: dict[int, str] = {}
    for i, raw in enumerate(raw_parts):
        where = f"partitions[{i}]"
        if not isinstance(raw, dict):
            raise _fail(source, f"{where} must be an object with `name` and `devices`")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(source, f"{where}.name must be a non-empty string, got {name!r}")
        if any(p.name == name for p in partitions):
            raise _fail(source, f"partition name {name!r} appears twice")
        raw_devices = raw.get("devices")
        if not isinstance(raw_devices, list):
            raise _fail(source, f"partition {name!r}: `devices` must be a list")
        if not raw_devices:
            raise _fail(source, f"partition {name!r} has no devices")
        devices = []
        for j, dev in enumerate(raw_devices):
            dwhere = f"partition {name!r} devices[{j}]"
            if not isinstance(dev, dict) or set(dev) != {"deviceId", "numCores"}:
                raise _fail(source, f"{dwhere} must be {{\"deviceId\": int, \"numCores\": int}}, got {dev!r}")
            device_id = _int(dev["deviceId"], f"{dwhere}.deviceId", source, 0)
            cores = _int(dev["numCores"], f"{dwhere}.numCores", source, 1)
            if device_id in owner:
                raise _fail(source, f"device {device_id} is listed twice (in partition {owner[device_id]!r} and "
                                    f"{name!r})")
            owner[device_id] = name
            devices.append(DeviceSpec(device_id, cores))
        partitions.append(Partition(name, tuple(devices)))
    raw_conns = data.get("connections", [])
    if not isinstance(raw_conns, list):
        raise _fail(source, "`connections` must be a list")
    connections = []
    for i, conn in enumerate(raw_conns):
        where = f"connections[{i}]"
        if not isinstance(conn, dict) or set(conn) != {"devices", "type"}:
            raise _fail(source, f"{where} must be {{\"devices\": [ids], \"type\": \"p2p\"}}, got {conn!r}")
        if conn["type"] not in CONNECTION_TYPES:
            raise _fail(source, f"{where}.type {conn['type']!r} is not one of {', '.join(CONNECTION_TYPES)} "
                                "(devices without a connection talk through the host)")
        ids = conn["devices"]
        if not isinstance(ids, list) or len(ids) < 2:
            raise _fail(source, f"{where}.devices must list at least two device ids, got {ids!r}")
        for d in ids:
            _int(d, f"{where}.devices entry", source, 0)
            if d not in owner:
                raise _fail(source, f"{where} names device {d}, which no partition lists "
                                    f"(devices: {', '.join(map(str, sorted(owner)))})")
        if len(set(ids)) != len(ids):
            raise _fail(source, f"{where} lists a device twice: {ids}")
        connections.append(frozenset(ids))
    return PartitionConfig(tuple(partitions), tuple(connections), source)


def load_partition_config(path: str | Path) -> PartitionConfig:
    return parse_partition_config(read_json(path, "partition config", object), str(path))


def cuda_device_count() -> int:
    """CUDA devices on this machine; with device checks on and no CUDA, as many as asked for (simulated)."""
    import torch

    from .parallel.devices import simulating

    if simulating("cuda"):
        return 1 << 30
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ring_link(config: PartitionConfig, partition: Partition) -> str:
    """The link a ring collective over ``partition`` runs on: p2p only if every hop is p2p."""
    ids = partition.device_ids
    if len(ids) < 2:
        return P2P  # nothing to send
    hops = [(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))]
    return P2P if all(config.link(a, b) == P2P for a, b in hops) else HOST


def resolve_topology(config: PartitionConfig, device: str = "cpu", partition: str | None = None) -> Topology:
    """Check the chosen partition fits this machine and return per-rank devices and threads."""
    part = config.partition(partition)
    total_cores = sum(d.num_cores for d in part.devices)
    available = usable_cores()
    if device.startswith("cuda"):
        count = cuda_device_count()
        missing = [d.device_id for d in part.devices if d.device_id >= count]
        if missing:
            raise ShardwiseError(f"{config.source}: partition {part.name!r} needs cuda:{missing[0]}, but this machine "
                                 f"has {count} CUDA device{'s' if count != 1 else ''}")
        devices = tuple(f"cuda:{d.device_id}" for d in part.devices)
        kind = "cuda"
    elif device == "cpu":
        devices = ("cpu",) * part.world_size
        kind = "cpu"
    else:
        raise ShardwiseError(f"--device {device!r} is not cpu or cuda")
    threads = tuple(d.num_cores for d in part.devices)
    capped = ""
    if total_cores > available:
        # A config written for accelerator cores (Cloud AI 100's 16 per device) still runs here: the
        # ranks share this machine's cores, each at most its even share, never below one thread.
        share = max(1, available // part.world_size)
        threads = tuple(min(t, share) for t in threads)
        capped = (f"partition {part.name!r} asks for {total_cores} cores in all but this process may use "
                  f"{available}: numCores capped, the {part.world_size} ranks share them "
                  f"({','.join(map(str, threads))} threads)")
    return Topology(part, kind, devices, threads, ring_link(config, part), capped)
