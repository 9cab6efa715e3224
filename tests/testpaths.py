"""Paths the tests share."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
KERNEL_FORMATS = os.path.join(FIXTURES, "kernel-formats")
KERNEL_DESCRIPTIONS = os.path.join(FIXTURES, "kernel-descriptions")

# One saved kernel per version: real captures, and descriptions for versions no machine here booted.
KERNEL_ROOTS = {
    "5.4": os.path.join(KERNEL_DESCRIPTIONS, "5.4-like"),
    "5.10": os.path.join(KERNEL_FORMATS, "5.10.0-32-amd64"),
    "5.15": os.path.join(KERNEL_DESCRIPTIONS, "5.15-like"),
    "6.1": os.path.join(KERNEL_FORMATS, "6.1.0-50-amd64"),
    "6.8": os.path.join(KERNEL_DESCRIPTIONS, "6.8-like"),
    "6.12": os.path.join(KERNEL_FORMATS, "6.12.107+deb13-amd64"),
    # Debian 13's cloud flavor, ten point releases on: skb_drop_reason renumbered after 57
    "6.12-cloud": os.path.join(KERNEL_FORMATS, "6.12.117+deb13-cloud-amd64"),
    "6.18": os.path.join(KERNEL_FORMATS, "6.18.44-fc-v657"),
    "7.2": os.path.join(KERNEL_FORMATS, "7.2.13+deb14-amd64"),
}
