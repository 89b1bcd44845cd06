"""Launchers for affjax runs: Cloud TPU VMs, multi-GPU hosts and SLURM.

Run them from the repository root as modules, e.g. `python -m launch.tpu_vm`;
see launch/README.md.
"""
