"""The decoded-trial memory budget: per process, split between a host's processes."""

import os

import ml_collections
import pytest

from affjax.data import trials
from configs import common

RAM = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _data(gb=None):
  return ml_collections.ConfigDict({"memory_cache_gb": gb})


@pytest.mark.parametrize(
  "env, count",
  [
    ({}, 1),
    ({"AFFJAX_LOCAL_PROCESS_COUNT": "4", "SLURM_NTASKS_PER_NODE": "2"}, 4),
    ({"SLURM_NTASKS_PER_NODE": "2", "LOCAL_WORLD_SIZE": "8"}, 2),
    ({"SLURM_TASKS_PER_NODE": "4(x2),3"}, 4),
    ({"SLURM_TASKS_PER_NODE": "2,6(x3)"}, 6),
    ({"LOCAL_WORLD_SIZE": "3"}, 3),
  ],
)
def test_local_process_count(env, count):
  assert trials.local_process_count(env) == count


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_local_process_count_names_the_variable(value):
  with pytest.raises(ValueError, match="AFFJAX_LOCAL_PROCESS_COUNT"):
    trials.local_process_count({"AFFJAX_LOCAL_PROCESS_COUNT": value})


def test_default_budget_is_split_between_a_hosts_processes():
  one = trials.budget_bytes(_data(), env={})
  assert one == int(RAM * 0.4)
  four = trials.budget_bytes(_data(), env={"SLURM_NTASKS_PER_NODE": "4"})
  assert four == int(RAM * 0.4) // 4


def test_explicit_budget_is_per_process():
  env = {"AFFJAX_LOCAL_PROCESS_COUNT": "4"}
  assert trials.budget_bytes(_data(1.5), env=env) == 3 * 2**29


def test_schema_has_memory_cache_gb_and_it_overrides_from_a_float():
  config = common.base_config()
  assert config.data.memory_cache_gb is None
  config.data.memory_cache_gb = 2.5
  assert trials.budget_bytes(config.data, env={}) == int(2.5 * 2**30)
