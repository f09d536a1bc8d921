"""Derived seeds: stable across processes, distinct per name, of the requested width."""

import subprocess
import sys

from synthtrial.util.seeding import derive_seed, derived_rng


def test_stable_across_processes():
    here = derive_seed("render", 0, "P01", 3, "frontal")
    there = subprocess.run([sys.executable, "-c", "from synthtrial.util.seeding import derive_seed;"
                            "print(derive_seed('render', 0, 'P01', 3, 'frontal'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert str(here) == there


def test_distinct_and_sized():
    seeds = {derive_seed("lesions", s, p) for s in range(5) for p in ("P01", "P02", "P10")}
    assert len(seeds) == 15
    assert derive_seed("a", bits=32) < 2**32 <= max(derive_seed("a", i) for i in range(50))
    assert derive_seed("a", 1) != derive_seed("a", "1", "")
    assert derived_rng("x", 1).random() == derived_rng("x", 1).random() != derived_rng("x", 2).random()
