"""Command-line lists that also come as one comma-separated argument.

A Kubernetes manifest passes a list from its release ConfigMap as `--preload=$(SWIFTD_CONTROLNETS)`,
and `$(VAR)` expands to one argument: `--preload a b`, `--preload a,b` and `--preload=a,b` must
all mean [a, b].
"""

from __future__ import annotations

import argparse


class ExtendList(argparse.Action):
    """nargs="*"/"+" list whose values may each hold several items separated by commas; repeating
    the flag adds to the list. `item_type` converts each item (argparse's `type` sees whole values)."""

    def __init__(self, option_strings, dest, item_type=str, **kwargs):
        self.item_type = item_type
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        for value in values:
            for item in value.split(","):
                if not item.strip():
                    continue
                try:
                    items.append(self.item_type(item.strip()))
                except ValueError:
                    parser.error(f"argument {option_string}: invalid value {item!r}")
        setattr(namespace, self.dest, items)
