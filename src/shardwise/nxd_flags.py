"""NxD Inference's ``inference_demo run`` flags that tune a Neuron build, and what each does here.

NxD Inference's documented commands (e.g. the Llama-3.1-405B command of its weights-sharding guide)
carry flags that pick compiler kernels and graph shapes. A user should be able to paste such a command
with only the paths and TP degree changed, so every such flag is accepted: those with a real
counterpart here switch it on (fused projections, on-device sampling); the others are accepted and
logged once, saying they change nothing on this device. Bucketing (``--enable-bucketing`` and its
bucket lists) is a real mechanism here (decode_buckets.py) and is parsed with the other run flags.
One table drives the parser, the run options and docs/nxd_flags.md (a test checks the document lists
every flag).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

log = logging.getLogger("shardwise")


@dataclass(frozen=True)
class NxdFlag:
    flag: str
    effect: str  # what it does here, one line (also the --help text)
    option: str | None = None  # the RunOptions field it sets to True; None: accepted, changes nothing here
    nargs: str | None = None  # flags that take values: "1" (one value) or "+" (several)
    value_type: type = str


NXD_FLAGS: tuple[NxdFlag, ...] = (
    NxdFlag("--on-device-sampling", "each rank reduces its own vocabulary shard (greedy: max and index; top-k: its "
            "top k) and only those candidates are gathered, not the whole vocabulary's logits",
            "on_device_sampling"),
    NxdFlag("--fused-qkv", "each rank's q, k and v slices are concatenated at load into one weight: one matmul, "
            "split after", "fused_qkv"),
    NxdFlag("--qkv-kernel-enabled", "NxD's fused QKV kernel: here, the same fused q/k/v matmul as --fused-qkv",
            "fused_qkv"),
    NxdFlag("--mlp-kernel-enabled", "NxD's fused MLP kernel: here, each rank's gate and up slices concatenated at "
            "load into one weight, one matmul, split after", "fused_gate_up"),
    NxdFlag("--attn-kernel-enabled", "attention already runs through torch's scaled_dot_product_attention (the "
            "fused attention kernel of this device) with or without this flag"),
    NxdFlag("--cc-pipeline-tiling-factor", "a Neuron compiler setting (collective/compute overlap tiling); there is "
            "no compiler here, so it changes nothing", nargs="1", value_type=int),
    NxdFlag("--logical-neuron-cores", "Neuron cores per logical core (LNC); ranks here are processes, so it changes "
            "nothing (threads per rank come from the machine or --partition-config)", nargs="1", value_type=int),
    NxdFlag("--do-sample", "sampling follows --top-k/--top-p/--temperature as in NxD (top-k 1 is greedy), so this "
            "flag changes nothing by itself"),
)


def add_nxd_flags(parser: argparse.ArgumentParser, add, options: set[str] | None = None) -> None:
    """Add the flags of ``NXD_FLAGS`` to ``parser`` through ``add`` (cli._add: NxD's underscore spellings too):
    all of them, or only those that set one of ``options`` (``shardwise serve`` takes the ones its engine
    honours, so that no flag there is accepted and silently ignored)."""
    group = parser.add_argument_group("NxD Inference flags", "accepted as inference_demo spells them; see "
                                                              "docs/nxd_flags.md")
    for f in NXD_FLAGS:
        if options is not None and f.option not in options:
            continue
        dest = "nxd_" + f.flag[2:].replace("-", "_")
        if f.nargs is None:
            add(group, f.flag, dest=dest, action="store_true", help=f.effect)
        else:
            add(group, f.flag, dest=dest, default=None, type=f.value_type, metavar="N",
                nargs=None if f.nargs == "1" else f.nargs, help=f.effect)


def nxd_options(args: argparse.Namespace) -> dict[str, bool]:
    """The run options the given NxD flags switch on; logs one line per flag that changes nothing here."""
    options: dict[str, bool] = {}
    for f in NXD_FLAGS:
        value = getattr(args, "nxd_" + f.flag[2:].replace("-", "_"), None)
        if value is None or value is False:
            continue
        if f.option is not None:
            options[f.option] = True
        else:
            log.info("%s: accepted; %s", f.flag, f.effect)
    return options
