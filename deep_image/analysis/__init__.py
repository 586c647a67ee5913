"""Analyses of compiled programs and their traces: no flags, no config, no printing.

hlo          the HLO text parser (computations, instructions, shape bytes, replica groups)
bytes_sent   bytes each device sends per step, per collective op
cross_host   which of them cross hosts: per device, against a device -> host map
overlap      async collectives and the compute scheduled inside their windows
trace        kernel timelines of a `jax.profiler` trace: collective time shared with compute
"""
