"""Launchers for ramp on clusters.

- ``python -m launch.run``: torchrun on one node of a job, single- or multi-node, with the environment,
  rendezvous, per-rank logs and signal handling clusters need (reads a Slurm allocation by itself).
- ``python -m launch.submit``: writes a Slurm batch script from ``launch/slurm/ramp.sbatch`` and
  submits it; the job checkpoints before its time limit and requeues itself.
- ``launch/slurm/local_cluster_up.sh`` / ``local_cluster_down.sh``: a real one-node Slurm cluster on
  localhost for trying and testing all of this.
"""
